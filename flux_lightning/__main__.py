"""``python -m flux_lightning [overrides]``: train with the Hydra config tree (see conf/train.yaml)."""

from . import timings
from .train import main

timings.mark("imported")

if __name__ == "__main__":
    main()
