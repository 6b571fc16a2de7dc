"""``python -m flux_lightning.wizard [--config-dir DIR] [--name NAME]``: the interactive wizard.

It asks for the flavour, the GPU memory (detected where it can be: quantization and memory settings
follow from it), the image folder and its captions, the trigger phrase, the adapter (LoRA rank/alpha
or LoKr factor), an optimizer and a learning rate suited to the adapter, the steps and the validation
prompts; warns about the quickstart's pitfalls as they appear (:func:`flux_lightning.wizard.plan.pitfalls`);
writes ``<DIR>/experiment/<NAME>.yaml`` (default DIR ``./flux_lightning_configs``) in the form of
``conf/experiment/*.yaml``; validates it with the library's own validation (composed from the
project's config with DIR on Hydra's search path) and prints the command that runs it::

    python -m flux_lightning --config-dir DIR +experiment=NAME

Plain ``input()`` prompts with the default in brackets (Enter keeps it), so it works in any terminal.
The questions are :func:`interview`, which takes an ``ask(question, default) -> answer`` callable.
Like the quickstart's ``configure``, it sets up one image folder, not a multi-backend dataloader.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from ..data.config import DatasetConfig
from ..errors import Problem
from ..model.flavours import FLAVOURS
from ..run.hardware import QUANTIZATION_NEEDS_GB, Accelerator, detect_accelerators, memory_suggestion
from ..training.optim import OPTIMIZERS
from .plan import (
    Plan,
    experiment_yaml,
    pitfalls,
    resolution_problem,
    suggested_lr,
    write_prompt_library,
)

Ask = Callable[[str, str], str]
Say = Callable[[str], None]

DEFAULT_CONFIG_DIR = "flux_lightning_configs"
CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt")
ADAPTERS = ("lora", "lokr")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Questions:
    """Typed questions over ``ask``: a bad answer is said and asked again."""

    def __init__(self, ask: Ask, say: Say):
        self.ask, self.say = ask, say

    def text(self, question: str, default: str = "", *, required: bool = False) -> str:
        while True:
            answer = (self.ask(question, default) or "").strip() or default
            if answer or not required:
                return answer
            self.say("  an answer is needed here")

    def choice(self, question: str, choices, default: str) -> str:
        while True:
            answer = self.text(f"{question} ({', '.join(choices)})", default)
            if answer in choices:
                return answer
            self.say(f"  {answer!r} is not one of: {', '.join(choices)}")

    def number(self, question: str, default, kind=int, *, low=None):
        while True:
            answer = self.text(question, f"{default:g}" if isinstance(default, float) else str(default))
            try:
                value = kind(answer)
            except ValueError:
                self.say(f"  {answer!r} is not {'an integer' if kind is int else 'a number'}")
                continue
            if low is not None and value < low:
                self.say(f"  must be >= {low}")
                continue
            return value

    def yes(self, question: str, default: bool) -> bool:
        while True:
            answer = self.text(f"{question} (y/n)", "y" if default else "n").lower()
            if answer in ("y", "yes", "n", "no"):
                return answer.startswith("y")
            self.say("  answer y or n")


def _scan(folder: Path) -> tuple[int, int, bool]:
    """(images, images without a .txt caption beside them, any .txt there) in ``folder``."""
    from ..data.discovery import find_images

    images = find_images(folder)
    uncaptioned = sum(1 for p in images if not p.with_suffix(".txt").is_file())
    return len(images), uncaptioned, uncaptioned < len(images)


def interview(
    ask: Ask,
    say: Say = print,
    *,
    name: str | None = None,
    accelerators: list[Accelerator] | None = None,
    config_dir: Path | None = None,
) -> Plan:
    """Ask every question and return the :class:`Plan`; pitfalls are said as soon as they appear.
    ``accelerators`` default to :func:`flux_lightning.run.hardware.detect_accelerators`."""
    q = _Questions(ask, say)
    plan = Plan()
    said: set[str] = set()

    def warn() -> None:
        for line in pitfalls(plan):
            if line not in said:
                said.add(line)
                say(f"  warning: {line}")

    while True:
        plan.name = name or q.text("Experiment name (file name, +experiment=<name>)", "my_lora", required=True)
        target = (config_dir / "experiment" / f"{plan.name}.yaml") if config_dir is not None else None
        if not _NAME.match(plan.name):
            say("  use letters, digits, _ . - (no spaces or slashes)")
        elif target is not None and target.exists() and not q.yes(f"{target} exists; overwrite it?", False):
            pass
        else:
            break
        name = None

    found = detect_accelerators() if accelerators is None else accelerators
    for a in found:
        say(f"  GPU {a.index}: {a.name}, {a.memory_gib:.1f} GiB")
    if not found:
        say("  no CUDA GPU detected")
    plan.gpus = len(found)
    plan.flavour = q.choice("Flavour", list(FLAVOURS), "krea" if found else "tiny")
    detected = min((a.memory_gib for a in found), default=0.0)
    plan.memory_gib = q.number("GPU memory in GiB (0 = no GPU)", round(detected, 1), float, low=0)
    if len(found) > 1:
        plan.devices = len(found) if q.yes(f"Train on all {len(found)} GPUs (trainer.devices=auto, DDP)?", True) else 1
    hint = memory_suggestion(plan.memory_gib, plan.flavour)
    say(f"  suggestion: quantization={hint['quantization']} ({hint['note']})")
    plan.quantization = q.choice("Quantization", list(QUANTIZATION_NEEDS_GB), hint["quantization"])
    if plan.quantization == hint["quantization"]:
        plan.memory_overrides = dict(hint["overrides"])
    warn()

    while True:
        folder = Path(q.text("Dataset folder (images, searched recursively)", required=True)).expanduser()
        try:
            plan.image_count, plan.uncaptioned, has_txt = _scan(folder)
        except Exception as err:  # noqa: BLE001 - DataError (missing folder) or an unreadable one: ask again
            say(f"  {err}")
            continue
        if plan.image_count:
            break
        say(f"  no images in {folder}")
    plan.data_dir = str(folder.resolve())
    say(f"  {plan.image_count} image(s)")
    if plan.image_count < DatasetConfig.eval_min_images:
        say(
            f"  fewer than {DatasetConfig.eval_min_images}: no eval split, so the eval loss is off (callbacks.eval_loss=null)"
        )
    plan.caption_strategy = q.choice("Caption strategy", CAPTION_STRATEGIES, "textfile" if has_txt else "filename")
    plan.instance_prompt = (
        q.text(
            "Trigger phrase (dataset.instance_prompt; empty = none)", required=plan.caption_strategy == "instanceprompt"
        )
        or None
    )
    if FLAVOURS[plan.flavour].reference_conditioning:
        ref = Path(q.text("Reference images folder (same file names as the dataset)", required=True)).expanduser()
        plan.reference_dir = str(ref.resolve())
    while True:
        plan.resolution = q.number("Training resolution in px", hint["resolution"], low=16)
        problem = resolution_problem(plan.resolution)
        if not problem:
            break
        say(f"  {problem}")
    plan.batch_size = q.number("Batch size per GPU (the quickstart keeps 1)", 1, low=1)
    warn()

    plan.adapter = q.choice("Adapter", ADAPTERS, "lora")
    if plan.adapter == "lora":
        plan.rank = q.number("LoRA rank (start small: 4-16)", 16, low=1)
        plan.alpha = q.number("LoRA alpha (= rank: scale 1)", float(plan.rank), float, low=0)
    else:
        plan.factor = q.number("LoKr factor (-1 = as square as possible)", 16, low=-1)
    suggested = hint["optimizer"] if plan.quantization == hint["quantization"] else None
    default_opt = suggested or ("adamw_bf16" if plan.adapter == "lora" else "adamw")
    plan.optimizer = q.choice("Optimizer", list(OPTIMIZERS), default_opt)
    plan.lr = q.number("Learning rate", suggested_lr(plan.adapter, plan.optimizer, plan.flavour), float, low=0)
    warn()
    _say_forecast(plan, say)
    plan.max_steps = q.number("Training steps", 300 if plan.flavour == "tiny" else 2000, low=1)

    default_prompt = (
        f"a photo of {plan.instance_prompt}" if plan.instance_prompt else "a red circle on a white background"
    )
    plan.prompts = [q.text("Validation prompt (<token> = the trigger phrase)", default_prompt, required=True)]
    while extra := q.text("Another validation prompt (empty = done)"):
        plan.prompts.append(extra)
    plan.compile = q.yes("Compile the transformer blocks (torch.compile)?", False)
    warn()
    return plan


def _say_forecast(plan: Plan, say: Say) -> None:
    """The plan's VRAM forecast (:mod:`flux_lightning.model.forecast`), and a warning when it exceeds the GPU."""
    from ..model.forecast import GIB, forecast_plan

    try:
        fc = forecast_plan(plan)
    except Exception:  # noqa: BLE001 - a forecast never stops the wizard
        return
    say(f"  {fc.line()}")
    if plan.memory_gib > 0:
        warning = fc.warning(int(plan.memory_gib * GIB), f"{plan.memory_gib:g} GiB")
        if warning:
            say(f"  {warning}")


# -- writing and checking ------------------------------------------------------------------------
def run_command(config_dir: Path, name: str) -> str:
    import shlex

    return f"python -m flux_lightning --config-dir {shlex.quote(str(config_dir))} +experiment={name}"


def write_experiment(plan: Plan, config_dir: Path) -> Path:
    """Write ``<config_dir>/experiment/<name>.yaml`` (and ``prompts/<name>.json`` for extra prompts)."""
    library = write_prompt_library(plan, (config_dir / "prompts" / f"{plan.name}.json").resolve())
    path = config_dir / "experiment" / f"{plan.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(experiment_yaml(plan, run_command(config_dir, plan.name), library), encoding="utf-8")
    return path


def compose_experiment(config_dir: Path, name: str, overrides: list[str] | tuple = ()):
    """The run's config as ``python -m flux_lightning --config-dir DIR +experiment=NAME`` composes it."""
    from ..config.compose import composed

    with composed(["--config-dir", str(Path(config_dir).resolve()), f"+experiment={name}", *overrides]) as cfg:
        return cfg


def experiment_problems(config_dir: Path, name: str) -> list[Problem]:
    """Every problem the library's validation finds in the written experiment (the data folders
    included; the model source is probed when the run starts, not here: it may need the Hub)."""
    from ..config.validation import data_folder_problems, validate
    from ..errors import ConfigError

    try:  # the paths are the run's (Hydra's run dir, <cwd>/cache): not needed to check the values
        cfg = compose_experiment(config_dir, name, [f"paths.output_dir=outputs/runs/{name}", "paths.cache_dir=cache"])
        run = validate(cfg, check_sources=False)
    except ConfigError as err:
        return err.problems
    except Exception as err:  # noqa: BLE001 - a composition error (Hydra) names the file's mistake
        return [Problem(f"experiment/{name}.yaml", f"{type(err).__name__}: {str(err).splitlines()[0]}")]
    return data_folder_problems(run.dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flux_lightning.wizard",
        description=(
            "Interactive wizard: asks about the model, GPU, data, adapter and schedule, writes "
            "<config-dir>/experiment/<name>.yaml, validates it and prints the command that trains it."
        ),
    )
    parser.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, help="where experiment/<name>.yaml is written")
    parser.add_argument("--name", default=None, help="the experiment's name (asked when not given)")
    args = parser.parse_args(argv)
    config_dir = Path(args.config_dir).expanduser()

    def ask(question: str, default: str) -> str:
        return input(f"{question} [{default}]: ")

    print("flux_lightning configure: Enter keeps the [default]; Ctrl-C quits without writing anything.")
    try:
        plan = interview(ask, print, name=args.name, accelerators=None, config_dir=config_dir)
    except (EOFError, KeyboardInterrupt):
        print("\naborted; nothing written", file=sys.stderr)
        return 1
    path = write_experiment(plan, config_dir)
    print(f"wrote {path}")
    problems = experiment_problems(config_dir, plan.name)
    if problems:
        print(
            "the library's validation found problems; fix them in the file (or run the wizard again):", file=sys.stderr
        )
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 2
    warnings = pitfalls(plan)
    print(
        f"validated: the experiment composes and passes the library's checks{' (with the warnings above)' if warnings else ''}"
    )
    print("run it with:")
    print(f"  {run_command(config_dir, plan.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
