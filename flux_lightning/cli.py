"""The ``flux-lightning`` console script: ``flux-lightning ui ...`` serves the web UI,
``flux-lightning configure ...`` runs the wizard, ``flux-lightning lora merge|resize|convert ...`` the LoRA
tools, anything else is the Hydra training app
(``flux-lightning +experiment=x`` is ``python -m flux_lightning +experiment=x``)."""

from __future__ import annotations

import sys


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "ui":
        from .ui.__main__ import main as ui_main

        ui_main(sys.argv[2:])
    elif command == "configure":
        from .wizard.configure import main as configure_main

        sys.exit(configure_main(sys.argv[2:]))
    elif command == "lora":
        from .lora_tools.cli import main as lora_main

        sys.exit(lora_main(sys.argv[2:]))
    else:
        from .run.train import main as train_main

        train_main()  # Hydra reads sys.argv itself


if __name__ == "__main__":
    main()
