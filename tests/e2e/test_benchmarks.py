"""The benchmark scripts run (they are measured by hand, see benchmarks/README.md; nothing here is timed)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ..conftest import REPO

BENCH = REPO / "benchmarks"


def _run(script, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real benchmark")
def test_gpu_benchmark_skips_cleanly_without_cuda():
    proc = _run("gpu_flux_step.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped: no CUDA device" in proc.stdout


@pytest.mark.slow
def test_gpu_benchmark_code_path_runs_on_a_tiny_architecture(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run(
        "gpu_flux_step.py", "--smoke", "--bases", "bf16", "int8_quanto", "--resolutions", "512", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["base"] for c in result["cases"]] == ["bf16", "int8_quanto"]
    assert all(c["s_per_step"] > 0 for c in result["cases"])


@pytest.mark.slow
def test_cpu_benchmarks_run_and_print_their_tables(tmp_path):
    proc = _run(
        "step_overhead.py", "--steps", "4", "--rounds", "1", "--threads", "1", "--json", str(tmp_path / "o.json")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| flux_lightning (Lightning Trainer) |" in proc.stdout
    assert json.loads((tmp_path / "o.json").read_text())["ratio"] > 0
    proc = _run("tread.py", "--tokens", "64", "--steps", "1", "--threads", "1", "--json", str(tmp_path / "t.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 64 |" in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text())["cases"][0]["speedup"] > 0


@pytest.mark.slow
def test_soak_short_mode_samples_memory_fds_and_disk(tmp_path):
    out = tmp_path / "soak.json"
    proc = _run("soak.py", "--short", "--dir", str(tmp_path / "soak"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rss_mib |" in proc.stdout and "| fds |" in proc.stdout and "| disk_mib |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["steps"] == 30 and result["samples_training"] >= 2
    assert all(s["rss_mib"] > 0 and s["fds"] > 0 for s in result["samples"])
    assert result["summary"]["disk_mib"]["max"] > 0


@pytest.mark.slow
def test_startup_benchmark_breaks_down_command_to_first_step(tmp_path):
    out = tmp_path / "startup.json"
    proc = _run(
        "startup.py", "--quick", "--warm-runs", "1", "--steps", "1", "--json", str(out), "--dir", str(tmp_path / "w")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **command -> first optimizer step** |" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["warm_runs"][0]["rows"]
    for phase in (
        "interpreter + imports",
        "datamodule.prepare_data",
        "module.configure_model",
        "ValidationImages.on_train_start",
        "EvalLoss.on_train_start",
        "first optimizer step",
    ):
        assert rows[phase] >= 0, phase
    first = result["warm_runs"][0]["first_step_s"]
    assert abs(sum(rows.values()) - first) < 0.05 * first  # the rows add up to command -> first step


def _vs_reference():
    """benchmarks/vs_reference.py as a module (its pure parts; no process is started)."""
    sys.path.insert(0, str(BENCH))
    try:
        import vs_reference
    finally:
        sys.path.remove(str(BENCH))
    return vs_reference


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vs_reference_flux_lightning_command_has_the_reference_settings(tmp_path, checkpointing):
    """The side-by-side benchmark's flux_lightning command composes to the diffusers script's settings
    (a renamed config field fails here, not in a 10-minute benchmark)."""
    from hydra import compose, initialize_config_dir

    from flux_lightning.config.validation import validate
    from flux_lightning.run.train import config_dir

    vs = _vs_reference()
    cmd = vs.flux_lightning_command(tmp_path / "model", tmp_path / "data", tmp_path / "run", 20, checkpointing)
    overrides = [o for o in cmd[cmd.index("flux_lightning") + 1 :] if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}/run"])
    run = validate(cfg, check_sources=False)
    spec = run.model.spec
    assert (spec.t5_max_length, spec.guidance_embeds, spec.attention_masked) == (512, True, False)
    assert run.model.training_guidance == 3.5 and run.model.gradient_checkpointing is checkpointing
    assert run.model.pretrained_model_name_or_path == str(tmp_path / "model") and run.model.dtype == "fp32"
    a = run.adapter
    assert (a.type, a.rank, a.lora_alpha, a.dropout, a.init) == ("lora", 4, 4.0, 0.0, "gaussian")
    assert list(a.target) == vs.REFERENCE_TARGETS and len(vs.REFERENCE_TARGETS) == 12
    o = run.optimizer
    assert (o.name, o.lr, o.weight_decay) == ("adamw", 1e-4, 1e-4)
    assert run.lr_scheduler.name == "constant" and cfg.trainer.gradient_clip_val == 1.0
    assert (cfg.trainer.max_steps, cfg.trainer.precision) == (20, "32-true")
    assert all(cfg.callbacks.get(c) is None for c in ("validation", "clip_score", "eval_loss", "model_checkpoint"))
    d = cfg.dataset
    assert (d.resolution, d.batch_size, d.caption_dropout_probability, d.num_workers) == (64, 1, 0, 0)
    assert (d.caption_strategy, d.instance_prompt) == ("instanceprompt", vs.PROMPT)


def test_vs_reference_interleaves_rounds_and_reports_ratios():
    vs = _vs_reference()
    rounds = vs.schedule(["reference", "flux_lightning"], pairs=3, n1=20, n2=220)
    forward = [("reference", 20), ("reference", 220), ("flux_lightning", 20), ("flux_lightning", 220)]
    assert rounds == [forward, forward[::-1], forward]
    # per step = (long wall - short wall) / (n2 - n1); start-up = short wall - n1 * per step
    row = vs.per_round({"wall_s": 12.0, "cpu_s": 10.0}, {"wall_s": 32.0, "cpu_s": 28.0}, 20, 220)
    assert row["s_per_step"] == pytest.approx(0.1) and row["startup_s"] == pytest.approx(10.0)
    assert row["cpu_s_per_step"] == pytest.approx(0.09)

    def rounds_at(*per_step):
        return [
            vs.per_round({"wall_s": 10.0, "cpu_s": 9.0}, {"wall_s": 10.0 + 200 * s, "cpu_s": 9.0 + 100 * s}, 20, 220)
            for s in per_step
        ]

    summary = vs.summarise(
        {"reference": rounds_at(0.2, 0.1, 0.3), "flux_lightning": rounds_at(0.1, 0.1, 0.1)}, "reference"
    )
    assert summary["reference"]["s_per_step"] == pytest.approx({"median": 0.2, "min": 0.1, "max": 0.3})
    assert summary["flux_lightning"]["ratio_of_medians"] == pytest.approx(0.5)
    assert summary["flux_lightning"]["ratio_per_round"]["max"] == pytest.approx(1.0)
    assert summary["flux_lightning"]["cpu_ratio_of_medians"] == pytest.approx(0.5)
    text = vs.markdown(summary, 20)
    label = vs.TRAINERS["flux_lightning"]
    assert f"| {label} | 0.100 (0.100-0.100) | 0.50x |" in text


def test_rollout_benchmark_runs_in_process(tmp_path, monkeypatch, capsys):
    """benchmarks/rollout.py on 16 image tokens, one timed step per setting (in this process: cheap)."""
    import runpy

    monkeypatch.syspath_prepend(str(BENCH))
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["rollout.py", "--tokens", "16", "--steps", "1", "--json", str(out)])
    runpy.run_path(str(BENCH / "rollout.py"), run_name="__main__")
    assert "| 16 | 1 |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["ratio"] > 0 and result["rollout"]["max_step_offset"] == 5 and result["rollout"]["probability"] == 0.5


def test_host_probe_splits_a_window_of_steps_into_host_and_kernel_time(tmp_path):
    """``_host_probe.py`` runs a script unchanged and profiles windows of steps of any optimizer after
    ``skip``: host + kernel = the profiled wall, the ops counted, then one unprofiled window."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, time, torch\n"
        "assert sys.argv[1:] == ['--steps', '30']\n"
        "m = torch.nn.Linear(8, 8)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for _ in range(30):\n"
        "    loss = m(torch.ones(4, 8)).square().mean()\n"
        "    loss.backward()\n"
        "    time.sleep(0.01)  # host work: no aten op\n"
        "    opt.step()\n"
        "    opt.zero_grad()\n"
    )
    out = tmp_path / "probe.json"
    env = {
        **os.environ,
        "HOST_PROBE_OUT": str(out),
        "HOST_PROBE_SKIP": "2",
        "HOST_PROBE_STEPS": "3",
        "HOST_PROBE_WINDOWS": "3",
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / "_host_probe.py"), str(script), "--steps", "30"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["host_s_per_step"] + r["kernel_s_per_step"] == pytest.approx(r["profiled_s_per_step"])
    assert r["host_s_per_step"] >= 0.01  # the sleep is host time
    assert r["kernel_s_per_step"] > 0 and r["outermost_aten_ops_per_step"] >= 5
    assert r["aten_ops_per_step"] >= r["outermost_aten_ops_per_step"]
    assert r["plain_s_per_step"] >= 0.01
    assert len(r["windows"]) == 3 and r["host_s_per_step_min"] <= r["host_s_per_step"]
