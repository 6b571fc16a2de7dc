"""``python -m flux_lightning.lora_tools merge|resize|convert ...``: the LoRA file tools
(:mod:`flux_lightning.lora_tools.cli`; the PEFT adapter used in training is :mod:`flux_lightning.adapters.lora`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
