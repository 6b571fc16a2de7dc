"""Lightning callbacks: validation images (with previews), CLIP score, stable eval loss, LoRA export."""

from .clip_score import CLIPScoreCallback
from .eval_loss import EvalLoss
from .lora_export import LoRAExport
from .validation import ValidationImages

__all__ = ["CLIPScoreCallback", "EvalLoss", "LoRAExport", "ValidationImages"]
