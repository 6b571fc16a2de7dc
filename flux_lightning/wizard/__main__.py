"""``python -m flux_lightning.wizard [--dir DIR] ...``: the terminal wizard (:mod:`.configure`)."""

from __future__ import annotations

import sys

from .configure import main

if __name__ == "__main__":
    sys.exit(main())
