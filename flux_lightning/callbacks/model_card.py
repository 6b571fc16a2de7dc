"""The LoRA's model card, resolved config and sample images; optional upload to the Hugging Face Hub.

The card is built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData`` (so prompts with quotes
or colons survive the YAML header), carries the base model's license, and neither the card nor the
saved ``config.yaml`` holds a secret or a local path (see :func:`redact`).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L

from ..errors import Problem
from ..training.hooks import ConfigChecked, RecordsRunConfig, raise_problems
from .adapter_export import STEP_DIR_PREFIX, AdapterExport
from .redaction import REDACTED, redact, redact_yaml  # noqa: F401 (redact_yaml: used by tests and tools)
from .validation import ValidationImages

log = logging.getLogger(__name__)

_DEV_LICENSE = "flux-1-dev-non-commercial-license"
# flavour -> (license, license_name, license_link); FLUX.1 [dev] derivatives carry BFL's non-commercial
# license, schnell (and LibreFlux, de-distilled from it) Apache-2.0; the tiny flavour's weights are random
# numbers made by this library (Apache-2.0).
LICENSES: dict[str, tuple[str, str | None, str | None]] = {
    "dev": ("other", _DEV_LICENSE, "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "krea": ("other", _DEV_LICENSE, "https://huggingface.co/black-forest-labs/FLUX.1-Krea-dev/blob/main/LICENSE.md"),
    "kontext": (
        "other",
        _DEV_LICENSE,
        "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md",
    ),
    "fluxbooru": ("other", _DEV_LICENSE, "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "schnell": ("apache-2.0", None, None),
    "libreflux": ("apache-2.0", None, None),
    "tiny": ("apache-2.0", None, None),
}
TAGS = ["flux", "lora", "diffusers", "text-to-image", "template:sd-lora", "flux-lightning"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(facts: dict) -> str | None:
    """The hub repo the LoRA applies to: the configured source if it is a hub id, else the flavour's
    usual repo (a local folder is never named); None for the tiny flavour (no hub repo)."""
    for candidate in (facts.get("model_source"), facts.get("flavour_source")):
        if candidate and _HUB_ID.match(candidate) and not Path(candidate).expanduser().exists():
            return candidate
    return None


def card_data(facts: dict, samples: list[tuple[str, str]]):
    """``huggingface_hub.ModelCardData`` of the LoRA: base model, license, tags, instance prompt and a
    widget entry per sample image (``(prompt, relative image path)``)."""
    from huggingface_hub import ModelCardData

    license_, name, link = LICENSES.get(facts["flavour"], ("other", None, None))
    extra = {"instance_prompt": facts["instance_prompt"]} if facts.get("instance_prompt") else {}
    if samples:
        extra["widget"] = [{"text": prompt, "output": {"url": path}} for prompt, path in samples]
    return ModelCardData(
        base_model=base_model_id(facts),
        library_name="diffusers",
        license=license_,
        license_name=name,
        license_link=link,
        pipeline_tag="text-to-image",
        tags=list(TAGS),
        **extra,
    )


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_card(facts: dict, samples: list[tuple[str, str]]):
    """The ``huggingface_hub.ModelCard`` (YAML header + Markdown) from the run facts and the sample
    images ``(prompt, relative path)``. Facts are shown redacted (no local paths)."""
    from huggingface_hub import ModelCard

    data = card_data(facts, samples)
    shown = redact({k: v for k, v in facts.items() if k not in ("model_source", "flavour_source")})
    base = data.base_model or "<the base model you trained on>"
    rows = "\n".join(f"| {k.replace('_', ' ')} | {_cell(v)} |" for k, v in shown.items())
    gallery = "\n".join(f"![{Path(p).stem}]({p})" for _, p in samples)
    usage = (
        "```python\nimport torch\nfrom diffusers import FluxPipeline\n\n"
        f"pipe = FluxPipeline.from_pretrained({base!r}, torch_dtype=torch.bfloat16).to('cuda')\n"
        "pipe.load_lora_weights('<this repo or folder>')\n"
        f"image = pipe({(facts.get('instance_prompt') or 'your prompt')!r}, "
        f"guidance_scale={facts['validation_guidance']}).images[0]\n```"
    )
    license_note = (
        f"\n\n## License\n\nThis LoRA is a derivative of {base} and falls under its license: "
        f"[{data.license_name}]({data.license_link}).\n"
        if data.license_link
        else ""
    )
    body = (
        f"# Flux LoRA ({facts['flavour']})\n\nTrained with flux_lightning.\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n\n## Samples\n\n{gallery or '(validation was off)'}\n\n"
        f"## Use\n\n{usage}\n{license_note}"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


class ModelCard(L.Callback):
    """At the end of training: ``<dirpath>/README.md``, ``config.yaml`` (redacted: no secrets, no local
    paths) and ``images/`` beside the LoRA.

    With ``push_to_hub`` the folder is uploaded with ``huggingface_hub`` to ``hub_model_id``
    (private unless ``private: false``). The token comes only from ``hf auth login`` or the
    ``HF_TOKEN`` environment variable; it is never a config field, so it never reaches a saved
    config or a log line.
    """

    implements = (ConfigChecked, RecordsRunConfig)  # hooks.py; tests/callbacks/test_hooks.py checks them

    def __init__(self, dirpath: str, push_to_hub: bool = False, hub_model_id: str | None = None, private: bool = True):
        raise_problems(self.config_problems({"push_to_hub": push_to_hub, "hub_model_id": hub_model_id}))
        self.dirpath = Path(dirpath)
        self.push_to_hub, self.hub_model_id, self.private = push_to_hub, hub_model_id, private
        self._run_config: str | Callable[[], str] | None = None  # the resolved run config (set_run_config)

    @classmethod
    def config_problems(cls, args, *, field: str = "callbacks.model_card", run=None) -> list[Problem]:
        """A push to the hub without a repo id."""
        if args.get("push_to_hub") and not args.get("hub_model_id"):
            return [Problem(f"{field}.hub_model_id", f"{field}.push_to_hub needs {field}.hub_model_id=<user>/<name>")]
        return []

    def set_run_config(self, config_yaml: str | Callable[[], str]) -> None:
        """The run's resolved config (``train()`` calls this on every callback that has it); written,
        redacted, as ``config.yaml`` beside the card. A callable is called when the card is written
        (``train()`` passes one: serialising the config is work the start of a run does not need)."""
        self._run_config = config_yaml

    @property
    def config_yaml(self) -> str | None:
        """The run's resolved config as YAML (from :meth:`set_run_config`; computed once, on first use)."""
        if callable(self._run_config):
            self._run_config = self._run_config()
        return self._run_config

    def facts(self, trainer: L.Trainer, module) -> dict:
        m, a, t = module.model_cfg, module.adapter_cfg, module.timesteps
        validation = next((cb for cb in trainer.callbacks if isinstance(cb, ValidationImages)), None)
        instance = validation.instance_prompt if validation is not None else None
        shift = "auto (resolution-dependent)" if t.flow_schedule_auto_shift else (t.flow_schedule_shift or "none")
        return {
            "model_source": m.pretrained_model_name_or_path,  # for base_model_id; not shown
            "flavour_source": m.spec.source,  # for base_model_id; not shown
            "base_model": m.pretrained_model_name_or_path or m.spec.source,  # shown redacted
            "flavour": m.flavour,
            "transformer": m.pretrained_transformer_model_name_or_path or "(from base model)",
            "instance_prompt": instance,
            "rank": a.rank,
            "alpha": a.lora_alpha,
            "target": a.target if isinstance(a.target, str) else ", ".join(map(str, a.target)),
            "init": a.init,
            "training_guidance": m.training_guidance,
            "validation_guidance": m.spec.validation_guidance,
            "timestep_sampling": f"{t.weighting} (scale {t.sigmoid_scale})",
            "shift": shift,
            "steps": trainer.global_step,
        }

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        samples = []
        validation = next((cb for cb in trainer.callbacks if isinstance(cb, ValidationImages)), None)
        if validation is not None and validation.last_records:
            (self.dirpath / "images").mkdir(exist_ok=True)
            for record in validation.last_records:
                shutil.copy2(record.path, self.dirpath / "images" / record.path.name)
                samples.append((record.prompt, f"images/{record.path.name}"))
        render_card(self.facts(trainer, pl_module), samples).save(self.dirpath / "README.md")
        if self.config_yaml:
            (self.dirpath / "config.yaml").write_text(redact_yaml(self.config_yaml), encoding="utf-8")
        if self.push_to_hub:
            failed = next((cb.error for cb in trainer.callbacks if isinstance(cb, AdapterExport) and cb.error), None)
            if failed:
                log.error("push_to_hub to %s skipped: the adapter export failed (%s)", self.hub_model_id, failed)
                return
            self.upload()

    def upload(self) -> str | None:
        """Create the repo (private by default) and upload the folder; errors are logged, not raised."""
        from huggingface_hub import HfApi

        try:
            api = HfApi()
            api.create_repo(self.hub_model_id, private=self.private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=self.hub_model_id,
                folder_path=str(self.dirpath),
                repo_type="model",
                ignore_patterns=[f"{STEP_DIR_PREFIX}*/*"],  # the per-checkpoint copies stay local
                commit_message="Upload Flux LoRA trained with flux_lightning",
            )
        except Exception as err:  # network, auth, quota: the files stay on disk
            log.error(
                "push_to_hub to %s failed (%s); the LoRA is saved in %s. Log in with `hf auth login` "
                "or set HF_TOKEN, then upload that folder with `hf upload %s %s`",
                self.hub_model_id,
                type(err).__name__,
                self.dirpath,
                self.hub_model_id,
                self.dirpath,
            )
            return None
        log.info("uploaded %s to https://huggingface.co/%s", self.dirpath, self.hub_model_id)
        return self.hub_model_id
