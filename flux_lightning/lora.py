"""``python -m flux_lightning.lora merge|resize|convert ...`` (the LoRA tools, :mod:`flux_lightning.lora_tools`;
the PEFT adapter used in training is :mod:`flux_lightning.adapters.lora`)."""

from __future__ import annotations

import sys

from .lora_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
