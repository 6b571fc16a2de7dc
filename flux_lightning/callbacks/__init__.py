"""Lightning callbacks: validation images, LoRA export and the model card."""

from .lora_export import LoRAExport
from .model_card import ModelCard
from .validation import ValidationImages

__all__ = ["LoRAExport", "ModelCard", "ValidationImages"]
