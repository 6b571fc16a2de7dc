"""Lightning callbacks: validation images and LoRA export."""

from .lora_export import LoRAExport
from .validation import ValidationImages

__all__ = ["LoRAExport", "ValidationImages"]
