"""The ``flux-lightning`` console script: ``flux-lightning ui ...`` serves the web UI,
``flux-lightning configure ...`` runs the wizard, ``flux-lightning lora merge|resize|convert ...`` the LoRA
tools, anything else is the Hydra training app
(``flux-lightning +experiment=x`` is ``python -m flux_lightning +experiment=x``)."""

from __future__ import annotations

import importlib
import sys

from .run.heap import resume_full_collections, startup_imports

# first argument -> the module whose ``main(argv)`` runs it; anything else trains
TOOLS = {"ui": ".ui.__main__", "configure": ".wizard.configure", "lora": ".lora_tools.cli"}


def main() -> None:
    tool = TOOLS.get(sys.argv[1] if len(sys.argv) > 1 else None)
    with startup_imports():  # the chosen command's imports without the collector's full walks (heap.py)
        entry = importlib.import_module(tool or ".run.train", __package__)
    if tool is None:
        entry.main()  # Hydra reads sys.argv itself
        return
    resume_full_collections()  # no training: the collector as usual from here (heap.py)
    sys.exit(entry.main(sys.argv[2:]) or 0)


if __name__ == "__main__":
    main()
