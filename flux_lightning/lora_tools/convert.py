"""``convert``: a LoRA file in another layout (``diffusers`` / ``comfyui`` / ``kohya``), same update.

Reads every layout ``adapters/lora_layouts.py`` reads (ours, sd-scripts/kohya, ComfyUI, ai-toolkit/diffusers)
and writes with the project's own writer (the same module), so a converted file is exactly
what a training run would have exported in that layout.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.lora_checks import check_out
from ..adapters.lora_files import LoraFile, check_flux_modules, read_lora, write_lora


def convert_file(lora, to: str, out, overwrite: bool = False) -> tuple[LoraFile, Path]:
    """Write the LoRA file ``lora`` in layout ``to`` as ``out``; returns the file as read and ``out``.
    An existing ``out`` is replaced only with ``overwrite``, the input never (:func:`.checks.check_out`)."""
    check_out(out, [lora], overwrite)
    adapter = read_lora(lora)
    check_flux_modules(adapter)
    path = write_lora(adapter.modules, to, out, {"lora_converted_from": adapter.layout}, source=adapter.path)
    return adapter, path
