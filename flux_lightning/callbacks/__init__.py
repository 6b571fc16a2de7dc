"""Lightning callbacks: validation images (with previews), CLIP score, stable eval loss, LoRA export,
model card and a sync-free progress bar."""

from .clip_score import CLIPScoreCallback
from .eval_loss import EvalLoss
from .lora_export import LoRAExport
from .model_card import ModelCard
from .progress import LossProgressBar
from .validation import ValidationImages

__all__ = ["CLIPScoreCallback", "EvalLoss", "LoRAExport", "LossProgressBar", "ModelCard", "ValidationImages"]
