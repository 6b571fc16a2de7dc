"""CLIP score of every validation image against its prompt (torchmetrics ``CLIPScore``).

``score = max(100 * cos(E_img(image), E_txt(prompt)), 0)`` with the CLIP image/text embeddings.
Per round it logs ``clip/mean``, ``clip/min``, ``clip/max``, ``clip/std`` over all images and
``clip/prompt/<name>`` (the mean over that prompt's resolutions; ``<name>`` is the nickname as in the
validation file names, unique per prompt).
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from ..errors import ConfigError, Problem
from ..model.memory import park
from ..model.tiny import resolve_tiny_source
from ..training.hooks import ConfigChecked, RendersImages, ValidationImagesListener, raise_problems
from ..training.rng import preserved_rng

log = logging.getLogger(__name__)

_FIELD = "callbacks.clip_score"


class _FeatureModel(torch.nn.Module):
    """A CLIP model whose ``get_*_features`` return tensors, as torchmetrics expects.

    transformers >= 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the
    projected features; older versions return the tensor itself.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids, attention_mask))


class _OpenClipModel(torch.nn.Module):
    """An open_clip model behind the ``get_image_features`` / ``get_text_features`` interface."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = None  # torchmetrics reads the text length from a transformers config only

    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids)


class _OpenClipProcessor:
    """open_clip's image transform and tokenizer behind a ``CLIPProcessor``-like call."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, text=None, images=None, **_):
        from torchvision.transforms.functional import to_pil_image

        if images is not None:
            return {"pixel_values": torch.stack([self.preprocess(to_pil_image(i)) for i in images])}
        ids = self.tokenizer(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load_clip(model_name_or_path: str, open_clip_pretrained: str | None = None):
    """``(model, processor)`` for torchmetrics' ``CLIPScore``.

    ``open_clip:<architecture>`` (e.g. ``open_clip:ViT-L-14``) loads an open_clip model with weights
    ``open_clip_pretrained`` (a tag such as ``openai`` or a checkpoint file); anything else is a
    transformers CLIP folder or hub id.
    """
    if model_name_or_path.startswith("open_clip:"):
        try:
            import open_clip
        except ImportError:
            raise ImportError(
                'an open_clip: CLIP model needs open_clip: pip install "flux-lightning[open_clip]"'
            ) from None
        name = model_name_or_path.split(":", 1)[1]
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=open_clip_pretrained)
        return _OpenClipModel(model.eval()), _OpenClipProcessor(preprocess, open_clip.get_tokenizer(name))
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_name_or_path).eval()
    return _FeatureModel(model), CLIPProcessor.from_pretrained(model_name_or_path)


class CLIPScoreCallback(L.Callback):
    """Score each round of :class:`~flux_lightning.callbacks.ValidationImages` with CLIP.

    Args:
        model_name_or_path: transformers CLIP folder or hub id, or ``open_clip:<architecture>``;
            null = the flavour's (``openai/clip-vit-large-patch14``; the tiny flavour builds a tiny
            random CLIP locally). A model given here must load (else the run stops at start-up);
            the flavour's default is optional: when it cannot be loaded (offline, not in the hub
            cache) the run warns once and trains without CLIP score.
        open_clip_pretrained: open_clip weights (tag or file) for an ``open_clip:`` model.
    """

    implements = (ConfigChecked, ValidationImagesListener)  # hooks.py; tests/callbacks/test_hooks.py checks them

    def __init__(self, model_name_or_path: str | None = None, open_clip_pretrained: str | None = None):
        raise_problems(self.config_problems({"model_name_or_path": model_name_or_path}, field=_FIELD))
        self.model_name_or_path = model_name_or_path
        self.open_clip_pretrained = open_clip_pretrained
        self.metric = None
        self.history: dict[int, dict[str, float]] = {}

    @classmethod
    def config_problems(cls, args, *, field: str = _FIELD, run=None) -> list[Problem]:
        """An empty model name (null picks the flavour's)."""
        name = args.get("model_name_or_path")
        if name is not None and not str(name).strip():
            return [
                Problem(f"{field}.model_name_or_path", f"{field}.model_name_or_path is empty; give a model or null")
            ]
        return []

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Load CLIP at start-up (rank 0), so a bad model path fails before training, not hours in."""
        if self.metric is None and trainer.is_global_zero:
            self.load(pl_module.model_cfg)

    def load(self, model_cfg) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        from ..model.components import may_load

        explicit = self.model_name_or_path is not None
        source = resolve_tiny_source(self.model_name_or_path or model_cfg.spec.clip_model, model_cfg.cache_dir)
        try:
            if not explicit and not may_load(source):
                raise OSError("the hub is unreachable (offline) and the model is not in the local hub cache")
            with preserved_rng():
                model, processor = load_clip(source, self.open_clip_pretrained)
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if explicit:
                raise ConfigError(
                    Problem(
                        f"{_FIELD}.model_name_or_path",
                        f"{_FIELD}.model_name_or_path: cannot load CLIP model {source!r} ({reason}); point it at "
                        f"a local CLIP folder or set {_FIELD}=null",
                    )
                ) from None
            log.warning(
                "CLIP score is off for this run: the flavour's CLIP model %r cannot be loaded (%s); set "
                "%s.model_name_or_path=<local CLIP folder> to score, or %s=null to silence this",
                source,
                reason,
                _FIELD,
                _FIELD,
            )
            return
        self.metric = CLIPScore(model_name_or_path=lambda: (model, processor))

    @torch.no_grad()
    def scores(self, records, device=None) -> list[float]:
        """CLIP score of each validation record's image against its prompt."""
        import numpy as np

        metric = self.metric.to(device or "cpu")
        out = []
        for r in records:
            image = torch.from_numpy(np.array(r.image.convert("RGB"))).permute(2, 0, 1).to(metric.device)
            metric.reset()
            metric.update(image, r.prompt)
            out.append(float(metric.compute()))
        return out

    def on_validation_images(self, trainer, pl_module, step: int, records) -> None:
        if not records or self.metric is None:
            return
        with preserved_rng():
            values = self.scores(records, pl_module.device)
        park(
            self.metric, pl_module.model_cfg if isinstance(pl_module, RendersImages) else None
        )  # model.enable_model_cpu_offload
        metrics = summarize(values, [r.name or r.nickname for r in records])
        self.history[step] = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        log.info("step %d: CLIP score mean %.3f", step, metrics["clip/mean"])


def summarize(values: list[float], nicknames: list[str]) -> dict[str, float]:
    """``clip/mean|min|max|std`` (population std) and ``clip/prompt/<nickname>`` means."""
    t = torch.tensor(values, dtype=torch.float64)
    metrics = {
        "clip/mean": t.mean().item(),
        "clip/min": t.min().item(),
        "clip/max": t.max().item(),
        "clip/std": t.std(unbiased=False).item() if len(values) > 1 else 0.0,
    }
    per_prompt: dict[str, list[float]] = {}
    for nick, v in zip(nicknames, values):
        per_prompt.setdefault(nick, []).append(v)
    for nick, vs in per_prompt.items():
        metrics[f"clip/prompt/{nick}"] = math.fsum(vs) / len(vs)
    return metrics
