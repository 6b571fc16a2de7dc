"""Lightning callbacks: validation images, LoRA export and a sync-free progress bar."""

from .lora_export import LoRAExport
from .progress import LossProgressBar
from .validation import ValidationImages

__all__ = ["LoRAExport", "LossProgressBar", "ValidationImages"]
