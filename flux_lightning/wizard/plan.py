"""What the configure wizard decided (:class:`Plan`), the quickstart's pitfalls it warns about
(:func:`pitfalls`), the learning rate it suggests (:func:`suggested_lr`) and the experiment file it
writes (:func:`experiment_yaml`). No prompts, no Hydra: :mod:`flux_lightning.wizard.configure` asks the
questions and validates the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.config import DatasetConfig
from ..errors import Problem
from ..run.hardware import QUANTIZATION_NEEDS_GB
from ..training.optim import OPTIMIZER_FAMILIES, OPTIMIZERS

#: (adapter, optimizer family: ``optim.OptimizerSpec.family``) -> (suggested lr, lowest sensible, highest sensible) on a 12B Flux:
#: LoRA with AdamW 1e-4..4e-4 (quickstart: 1e-3 can burn a LoRA entirely, 1e-5 does almost
#: nothing), Lion 3-10x lower; LoKr wants AdamW 1e-3, Lion 2e-4 (conf/experiment/krea_lokr.yaml).
LR_RANGES = {
    ("lora", "adamw"): (1e-4, 2e-5, 4e-4),
    ("lora", "lion"): (3e-5, 5e-6, 1.5e-4),
    ("lokr", "adamw"): (1e-3, 3e-4, 3e-3),
    ("lokr", "lion"): (2e-4, 6e-5, 6e-4),
}
TINY_LR = 1e-3  # the embedded demo's (conf/demo/tiny_demo.yaml): the tiny random Flux learns fast


def optimizer_family(optimizer: str) -> str:
    """How ``optimizer`` takes a learning rate (:attr:`~flux_lightning.training.optim.OptimizerSpec.family`;
    an unknown name is advised like AdamW)."""
    spec = OPTIMIZERS.get(optimizer)
    return spec.family if spec is not None else "adamw"


def suggested_lr(adapter: str, optimizer: str, flavour: str) -> float:
    """The learning rate to start from for ``adapter`` (lora/lokr) trained with ``optimizer``."""
    family = optimizer_family(optimizer)
    if family == "prodigy":
        return 1.0  # Prodigy estimates the step size; lr scales the estimate
    if flavour == "tiny":
        return TINY_LR
    return LR_RANGES[(adapter, family)][0]


@dataclass
class Plan:
    """The wizard's answers: one experiment on one image folder.

    Attributes:
        name: the experiment's name: ``<config dir>/experiment/<name>.yaml``, ``+experiment=<name>``.
        flavour: ``model=<flavour>``.
        memory_gib: GPU memory per device in GiB (0 = no GPU).
        gpus: GPUs visible to the wizard; devices: how many the run uses (``trainer.devices=auto``
            when more than one).
        quantization: ``quantization=<option>``; memory_overrides: dotted config keys the memory
            suggestion adds (``model.quantization.quantize_via``, ``trainer.gradient_clip_val``, ...).
        data_dir: the image folder (absolute); image_count: images found in it;
            uncaptioned: images without a ``.txt`` beside them (``textfile`` captions).
        caption_strategy: ``filename``, ``textfile`` or ``instanceprompt``.
        instance_prompt: the trigger phrase (``dataset.instance_prompt``), or None.
        reference_dir: kontext's reference images (``dataset.conditioning_data_dir``), or None.
        resolution, batch_size: ``dataset.resolution``, ``dataset.batch_size``.
        adapter: ``lora`` or ``lokr``; rank/alpha (LoRA), factor (LoKr).
        optimizer, lr: ``optimizer=<name>``, ``optimizer.lr``.
        max_steps: ``trainer.max_steps``.
        prompts: validation prompts (``<token>`` = the trigger phrase).
        compile: regional ``torch.compile`` of the transformer blocks.
    """

    name: str = "my_lora"
    flavour: str = "krea"
    memory_gib: float = 0.0
    gpus: int = 0
    devices: int = 1
    quantization: str = "none"
    memory_overrides: dict = field(default_factory=dict)
    data_dir: str = ""
    image_count: int = 0
    uncaptioned: int = 0
    caption_strategy: str = "filename"
    instance_prompt: str | None = None
    reference_dir: str | None = None
    resolution: int = 1024
    batch_size: int = 1
    adapter: str = "lora"
    rank: int = 16
    alpha: float | None = None
    factor: int = 16
    optimizer: str = "adamw_bf16"
    lr: float = 1e-4
    max_steps: int = 2000
    prompts: list[str] = field(default_factory=list)
    compile: bool = False

    @property
    def every_n_steps(self) -> int:
        """Validation and eval-loss interval: 250 (the experiments') or a quarter of a short run."""
        return max(1, min(250, self.max_steps // 4))


def resolution_problem(resolution: int) -> Problem | None:
    if resolution > 0 and resolution % 16 == 0:
        return None
    up = max(16, -(-resolution // 16) * 16)
    return Problem(
        "dataset.resolution",
        f"dataset.resolution={resolution} is not a multiple of 16 (Flux packs 2x2 patches of the 8x-downsampled "
        f"latents); use {up} (or 1024 / 512)",
    )


def pitfalls(plan: Plan) -> list[Problem]:
    """The quickstart's pitfalls in ``plan``, one line each naming the setting and the fix: an lr that
    burns a LoRA (or barely moves it), a LoKr lr far from AdamW 1e-3 / Lion 2e-4, NF4 with
    torch.compile, a resolution that is no multiple of 16, fewer images than one batch, a
    quantization too large for the GPU memory. The tiny flavour is exempt from the lr advice."""
    out = []
    family = optimizer_family(plan.optimizer)
    if family == "prodigy" and plan.lr != 1.0:
        out.append(
            Problem(
                "optimizer.lr",
                f"optimizer.lr={plan.lr:g} with prodigy: Prodigy estimates the step size itself; keep optimizer.lr=1.0",
            )
        )
    elif family != "prodigy" and plan.flavour != "tiny":
        good, low, high = LR_RANGES[(plan.adapter, family)]
        name = OPTIMIZER_FAMILIES[family]
        if plan.adapter == "lora" and plan.lr > high:
            out.append(
                Problem(
                    "optimizer.lr",
                    f"optimizer.lr={plan.lr:g} will likely burn the LoRA: a 12B Flux wants {good:g}..{high:g} with "
                    f"{name} (the quickstart: 1e-3 can burn a LoRA entirely); use optimizer.lr={good:g}",
                )
            )
        elif plan.adapter == "lora" and plan.lr < low:
            out.append(
                Problem(
                    "optimizer.lr",
                    f"optimizer.lr={plan.lr:g} barely moves a LoRA (the quickstart: 1e-5 does almost nothing); "
                    f"use optimizer.lr={good:g}",
                )
            )
        elif plan.adapter == "lokr" and not low <= plan.lr <= high:
            out.append(
                Problem(
                    "optimizer.lr",
                    f"optimizer.lr={plan.lr:g} is {'too low' if plan.lr < low else 'too high'} for a LoKr: LoKr trains "
                    f"at higher rates than LoRA, AdamW 1e-3 and Lion 2e-4 (the quickstart); use optimizer.lr={good:g}",
                )
            )
    if plan.quantization == "nf4_bnb" and plan.compile:
        out.append(
            Problem(
                "compile",
                "compile=true with quantization=nf4_bnb: NF4 does not work with torch.compile (the blocks run eager); "
                "set compile=false, or quantization=int8_quanto where it fits (int8 + compile is the fastest)",
            )
        )
    if plan.quantization == "nf4_bnb" and family == "lion":
        out.append(
            Problem(
                "optimizer",
                f"optimizer={plan.optimizer} on an NF4 base can collapse the model (the quickstart); adamw8bit or "
                "adamw_bf16 keep NF4 stable if it does",
            )
        )
    problem = resolution_problem(plan.resolution)
    if problem:
        out.append(problem)
    global_batch = plan.batch_size * max(plan.devices, 1)
    if plan.data_dir and plan.image_count < global_batch:
        per = f"dataset.batch_size={plan.batch_size}" + (f" x {plan.devices} GPUs" if plan.devices > 1 else "")
        out.append(
            Problem(
                "dataset.batch_size",
                f"{plan.image_count} image(s) in {plan.data_dir} cannot fill one batch of {global_batch} ({per}); "
                "add images or lower dataset.batch_size",
            )
        )
    if plan.caption_strategy == "textfile" and plan.uncaptioned:
        out.append(
            Problem(
                "dataset.caption_strategy",
                f"{plan.uncaptioned} image(s) have no .txt caption beside them and will be skipped; write them or "
                "use dataset.caption_strategy=filename",
            )
        )
    need = QUANTIZATION_NEEDS_GB.get(plan.quantization)
    if plan.flavour != "tiny" and plan.memory_gib > 0 and need is not None and plan.memory_gib * 1.0737 < need:
        out.append(
            Problem(
                "quantization",
                f"quantization={plan.quantization} needs a bit over {need} GB for a rank-16 LoRA but the GPU has "
                f"{plan.memory_gib:g} GiB; pick a smaller quantization (int8_quanto 18 GB, int4_quanto 13, nf4_bnb 9)",
            )
        )
    return out


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def experiment_values(plan: Plan, prompt_library: str | None = None) -> dict:
    """The experiment as a config tree: the defaults list overriding groups, then the values."""
    tree: dict = {
        "defaults": [
            {"override /model": plan.flavour},
            {"override /quantization": plan.quantization},
            {"override /adapter": plan.adapter},
            {"override /optimizer": plan.optimizer},
            {"override /dataset": "local"},
        ]
    }
    if plan.flavour == "tiny":
        _set(tree, "model.gradient_checkpointing", False)  # as the demo: the tiny model fits anywhere
    else:
        _set(tree, "model.dtype", "bf16")
    if plan.adapter == "lora":
        _set(tree, "adapter.rank", plan.rank)
        _set(tree, "adapter.alpha", plan.rank if plan.alpha is None else plan.alpha)
    else:
        _set(tree, "adapter.factor", plan.factor)
    _set(tree, "dataset.instance_data_dir", plan.data_dir)
    _set(tree, "dataset.caption_strategy", plan.caption_strategy)
    _set(tree, "dataset.instance_prompt", plan.instance_prompt or None)
    if plan.reference_dir:
        _set(tree, "dataset.conditioning_data_dir", plan.reference_dir)
    _set(tree, "dataset.resolution", plan.resolution)
    _set(tree, "dataset.batch_size", plan.batch_size)
    _set(tree, "optimizer.lr", plan.lr)
    _set(tree, "trainer.max_steps", plan.max_steps)
    if plan.flavour != "tiny":
        _set(tree, "trainer.precision", "bf16-mixed")
    if plan.devices > 1:
        _set(tree, "trainer.devices", "auto")  # every visible GPU, with DDP (flux_lightning.run.hardware)
    for key, value in plan.memory_overrides.items():
        _set(tree, key, value)
    if plan.prompts:
        _set(tree, "callbacks.validation.validation_prompt", plan.prompts[0])
    if prompt_library:
        _set(tree, "callbacks.validation.user_prompt_library", prompt_library)
    _set(tree, "callbacks.validation.every_n_steps", plan.every_n_steps)
    if plan.image_count >= DatasetConfig.eval_min_images:  # else no backend can give an eval split
        _set(tree, "callbacks.eval_loss.every_n_steps", plan.every_n_steps)
    else:
        _set(tree, "callbacks.eval_loss", None)
    if plan.compile:
        tree["compile"] = True
    return tree


def prompt_library(plan: Plan) -> dict[str, str]:
    """The validation prompts after the first (``validation_prompt``), as a JSON prompt library."""
    return {f"prompt_{i}": p for i, p in enumerate(plan.prompts[1:], start=2)}


def experiment_yaml(plan: Plan, command: str, prompt_library_path: str | None = None) -> str:
    """The text of ``<config dir>/experiment/<name>.yaml``, in the form of ``conf/experiment/*.yaml``."""
    head = [
        "# @package _global_",
        f"# {plan.flavour} {plan.adapter} on {plan.data_dir}, written by python -m flux_lightning.wizard.configure.",
        f"#   {command}",
        "# Every value below can be overridden on that command line (e.g. trainer.max_steps=500).",
    ]
    body = yaml.safe_dump(experiment_values(plan, prompt_library_path), sort_keys=False, allow_unicode=True)
    return "\n".join(head) + "\n" + body


def write_prompt_library(plan: Plan, path: Path) -> str | None:
    """Write the extra validation prompts as JSON (nickname -> prompt); None when there are none."""
    library = prompt_library(plan)
    if not library:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(library, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return str(path)
