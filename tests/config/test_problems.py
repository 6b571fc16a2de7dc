"""Problems are data: validate() raises one ConfigError carrying Problem(field, message) records, whose
text is the CLI's one line per problem; the web UI and the wizard place them by field."""

import pickle

import pytest
from hydra import compose, initialize_config_dir

from flux_lightning.config.validation import validate
from flux_lightning.errors import ConfigError, Problem
from flux_lightning.run.train import config_dir

# each set touches different checks: the groups' own problems(), the plain trainer values, the
# callbacks' own (through their _target_s), the cross-group checks (known flavour), the sources
BAD = {
    "groups": [
        "dataset.resolution=70",
        "adapter.rank=0",
        "adapter.init=magic",
        "optimizer.lr=-1",
        "lr_scheduler.num_warmup_steps=-1",
        "timesteps.weighting_scheme=lognorm",
        "loss.loss_type=bad",
        "scheduled_sampling.grid_steps=0",
        "model.quantization.base_model_precision=int3",
        "+tread.routes=[{selection_ratio:1.5,start_layer_idx:3,end_layer_idx:1}]",
        "model.group_offload_blocks_per_group=2",
        "trainer.max_steps=0",
        "nonfinite_max_consecutive=0",
        "callbacks.eval_loss.every_n_steps=-1",
        "callbacks.validation.every_n_steps=-1",
        "callbacks.model_checkpoint.save_top_k=-5",
        "callbacks.ema.decay=2",
        "callbacks.adapter_export.dtype=fp8",
        "+callbacks.eval_loss.eval_fraction=0.2",
    ],
    "flavour": ["model.flavour=turbo", "model.tiny_like=dev"],
    "cross": [
        "model=schnell",
        "timesteps.weighting=uniform",
        "callbacks.adapter_export.lora_format=kohya",
        "adapter.use_dora=true",
        "dataset.eval_fraction=0",
        "lr_scheduler=cosine",
        "trainer.max_steps=-1",
        "trainer.max_epochs=1",
    ],
    "sources": ["dataset.instance_data_dir=/no/such/folder"],
}


def _problems(tmp_path, overrides) -> list:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", *overrides]
        )
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return info.value.problems


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict[str, list]:
    """Each set's problems, composed and validated once for the tests below."""
    return {name: _problems(tmp_path_factory.mktemp(name), overrides) for name, overrides in BAD.items()}


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_problem_validate_finds_is_a_problem_naming_its_field(found, name):
    problems = found[name]
    assert problems
    stragglers = [p for p in problems if not isinstance(p, Problem) or not p.field]
    assert stragglers == [], stragglers
    top = {"model", "adapter", "dataset", "timesteps", "optimizer", "lr_scheduler", "tread", "loss",
           "scheduled_sampling", "trainer", "callbacks", "nonfinite_max_consecutive", "compile"}  # fmt: skip
    assert {p.field.split(".")[0].split("[")[0] for p in problems} <= top
    for p in problems:  # the message names the field it is about (the CLI's line is the whole story)
        leaf = p.field.rsplit(".", 1)[-1]
        assert leaf.split("[")[0] in p.message, p


def test_fields_of_the_bad_settings(found):
    fields = {p.field for p in found["groups"]}
    assert {
        "dataset.resolution", "adapter.rank", "optimizer.lr", "model.quantization.base_model_precision",
        "tread.routes[0].selection_ratio", "tread.routes[0].start_layer_idx", "trainer.max_steps",
        "callbacks.eval_loss.every_n_steps", "callbacks.validation.every_n_steps", "callbacks.model_checkpoint.save_top_k",
        "callbacks.ema.decay", "callbacks.adapter_export.dtype", "callbacks.eval_loss.eval_fraction",
    } <= fields  # fmt: skip
    cross = {p.field for p in found["cross"]}
    assert {
        "timesteps.weighting",
        "adapter.use_dora",
        "lr_scheduler",
    } <= cross  # DoRA in a kohya file: adapter_export says so
    assert {p.field for p in found["sources"]} == {"dataset.instance_data_dir"}


def test_each_check_runs_once(found):
    """The eval-loss interval was checked twice (the plain-dict checks and the callback); now once."""
    problems = found["groups"]  # callbacks.eval_loss.every_n_steps=-1, callbacks.validation.every_n_steps=-1
    assert [p.field for p in problems].count("callbacks.eval_loss.every_n_steps") == 1
    assert [p.field for p in problems].count("callbacks.validation.every_n_steps") == 1


def test_a_callback_under_another_name_is_checked_through_its_target(tmp_path):
    """The checks follow the _target_, not the key: a second EvalLoss under callbacks.eval2 is checked too."""
    problems = _problems(
        tmp_path, ["+callbacks.eval2._target_=flux_lightning.callbacks.EvalLoss", "+callbacks.eval2.num_sigmas=0"]
    )
    assert [p.message for p in problems if p.field == "callbacks.eval2.num_sigmas"] == [
        "callbacks.eval2.num_sigmas=0 must be >= 1"
    ]


def test_the_error_text_is_the_clis_one_line_per_problem():
    err = ConfigError(
        [Problem("adapter.rank", "adapter.rank=0 must be >= 1"), Problem("loss.huber_c", "loss.huber_c=0 bad")]
    )
    assert str(err) == "invalid config:\n  - adapter.rank=0 must be >= 1\n  - loss.huber_c=0 bad"
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and [(p.field, p.message) for p in copy.problems] == [
        (p.field, p.message) for p in err.problems
    ]
    problem = err.problems[0]
    assert problem == "adapter.rank=0 must be >= 1" and "rank=0" in problem and str(problem) == problem.message
    one = ConfigError(
        Problem("resume_from_checkpoint", "resume_from_checkpoint: x does not exist")
    )  # found outside validate()
    assert str(one) == "resume_from_checkpoint: x does not exist" and one.problems[0].field == "resume_from_checkpoint"


def test_the_ui_places_problems_by_their_field(tmp_path):
    from flux_lightning.ui.forms import compose_run

    result = compose_run({}, {"adapter.rank": 0, "callbacks.ema.decay": 2}, workdir=tmp_path, check_sources=False)
    fields = {p["field"]: p["message"] for p in result["problems"]}
    assert fields["adapter.rank"].startswith("adapter.rank=0") and fields["callbacks.ema.decay"].startswith(
        "callbacks.ema.decay=2"
    )
    missing = compose_run({"model": "turbo"}, {}, workdir=tmp_path, check_sources=False)
    assert [p["field"] for p in missing["problems"]] == ["model"]
    misspelt = compose_run({}, {}, extra=["adapter.rnk=4"], workdir=tmp_path, check_sources=False)
    assert [p["field"] for p in misspelt["problems"]] == ["adapter.rnk"]


def test_the_wizard_reads_the_problems_not_their_text(tmp_path):
    from flux_lightning.wizard.configure import experiment_problems

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "bad.yaml").write_text("# @package _global_\nadapter:\n  rank: 0\n")
    problems = experiment_problems(tmp_path, "bad")
    assert [(p.field, p.message) for p in problems] == [("adapter.rank", "adapter.rank=0 must be >= 1")]
