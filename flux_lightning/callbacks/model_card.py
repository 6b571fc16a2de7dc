"""The LoRA's model card, resolved config and sample images; optional upload to the Hugging Face Hub."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


def render_card(facts: dict, images: list[str]) -> str:
    """Markdown model card (with the Hub's YAML header) from a dict of run facts."""
    header = [
        "---",
        f"base_model: {facts['base_model']}",
        "library_name: diffusers",
        "license: other",
        "tags: [flux, lora, text-to-image, flux-lightning]",
    ]
    if facts.get("instance_prompt"):
        header.append(f"instance_prompt: {facts['instance_prompt']!r}")
    header.append("---")
    rows = "\n".join(f"| {k.replace('_', ' ')} | {v} |" for k, v in facts.items())
    gallery = "\n".join(f"![{Path(p).stem}]({p})" for p in images)
    usage = (
        "```python\nimport torch\nfrom diffusers import FluxPipeline\n\n"
        f"pipe = FluxPipeline.from_pretrained({facts['base_model']!r}, torch_dtype=torch.bfloat16).to('cuda')\n"
        "pipe.load_lora_weights('<this repo or folder>')\n"
        f"image = pipe({(facts.get('instance_prompt') or 'your prompt')!r}, "
        f"guidance_scale={facts['validation_guidance']}).images[0]\n```"
    )
    return "\n".join(header) + (
        f"\n\n# Flux LoRA ({facts['flavour']})\n\nTrained with flux_lightning.\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n\n## Samples\n\n{gallery or '(validation was off)'}\n\n"
        f"## Use\n\n{usage}\n"
    )


class ModelCard(L.Callback):
    """At the end of training: ``<dirpath>/README.md``, ``config.yaml`` and ``images/`` beside the LoRA.

    With ``push_to_hub`` the folder is uploaded with ``huggingface_hub`` to ``hub_model_id``
    (private unless ``private: false``). The token comes only from ``hf auth login`` or the
    ``HF_TOKEN`` environment variable; it is never a config field, so it never reaches a saved
    config or a log line.
    """

    def __init__(self, dirpath: str, push_to_hub: bool = False, hub_model_id: str | None = None, private: bool = True):
        if push_to_hub and not hub_model_id:
            raise ValueError("callbacks.model_card.push_to_hub needs callbacks.model_card.hub_model_id=<user>/<name>")
        self.dirpath = Path(dirpath)
        self.push_to_hub, self.hub_model_id, self.private = push_to_hub, hub_model_id, private
        self.config_yaml: str | None = None  # the resolved run config, set by train()

    def facts(self, trainer: L.Trainer, module) -> dict:
        from .validation import ValidationImages

        m, a, t = module.model_cfg, module.adapter_cfg, module.timesteps
        validation = next((cb for cb in trainer.callbacks if isinstance(cb, ValidationImages)), None)
        instance = validation.instance_prompt if validation is not None else None
        shift = "auto (resolution-dependent)" if t.flow_schedule_auto_shift else (t.flow_schedule_shift or "none")
        return {
            "base_model": m.pretrained_model_name_or_path or m.spec.source,
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
        from .validation import ValidationImages

        self.dirpath.mkdir(parents=True, exist_ok=True)
        images = []
        validation = next((cb for cb in trainer.callbacks if isinstance(cb, ValidationImages)), None)
        if validation is not None and validation.last_records:
            (self.dirpath / "images").mkdir(exist_ok=True)
            for record in validation.last_records:
                shutil.copy2(record.path, self.dirpath / "images" / record.path.name)
                images.append(f"images/{record.path.name}")
        (self.dirpath / "README.md").write_text(render_card(self.facts(trainer, pl_module), images), encoding="utf-8")
        if self.config_yaml:
            (self.dirpath / "config.yaml").write_text(self.config_yaml, encoding="utf-8")
        if self.push_to_hub:
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
                commit_message="Upload Flux LoRA trained with flux_lightning",
            )
        except Exception as err:  # network, auth, quota: the files stay on disk
            log.error(
                "push_to_hub to %s failed (%s); the LoRA is saved in %s. Log in with `hf auth login` "
                "or set HF_TOKEN, then upload that folder with `hf upload %s %s`",
                self.hub_model_id, type(err).__name__, self.dirpath, self.hub_model_id, self.dirpath,
            )
            return None
        log.info("uploaded %s to https://huggingface.co/%s", self.dirpath, self.hub_model_id)
        return self.hub_model_id
