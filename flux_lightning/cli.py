"""The ``flux-lightning`` console script: ``flux-lightning ui ...`` serves the web UI,
``flux-lightning configure ...`` runs the wizard, ``flux-lightning lora merge|resize|convert ...`` the LoRA
tools, anything else is the Hydra training app
(``flux-lightning +experiment=x`` is ``python -m flux_lightning +experiment=x``)."""

from __future__ import annotations

import sys

from .run.heap import resume_full_collections, startup_imports


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    with startup_imports():  # the chosen command's imports without the collector's full walks (heap.py)
        if command == "ui":
            from .ui.__main__ import main as ui_main
        elif command == "configure":
            from .wizard.configure import main as configure_main
        elif command == "lora":
            from .lora_tools.cli import main as lora_main
        else:
            from .run.train import main as train_main
    if command in ("ui", "configure", "lora"):  # no training: the collector as usual from here (heap.py)
        resume_full_collections()
    if command == "ui":
        ui_main(sys.argv[2:])
    elif command == "configure":
        sys.exit(configure_main(sys.argv[2:]))
    elif command == "lora":
        sys.exit(lora_main(sys.argv[2:]))
    else:
        train_main()  # Hydra reads sys.argv itself


if __name__ == "__main__":
    main()
