"""Lightning callbacks: adapter EMA, validation images (with previews), CLIP score, stable eval loss, adapter export,
model card and a sync-free progress bar."""

from .adapter_export import AdapterExport
from .clip_score import CLIPScoreCallback
from .ema import AdapterEMA
from .eval_loss import EvalLoss
from .model_card import ModelCard
from .progress import LossProgressBar
from .validation import ValidationImages

__all__ = [
    "AdapterEMA",
    "AdapterExport",
    "CLIPScoreCallback",
    "EvalLoss",
    "LossProgressBar",
    "ModelCard",
    "ValidationImages",
]
