"""``python -m flux_lightning [overrides]``: train with the Hydra config tree (see conf/train.yaml)."""

from .train import main

if __name__ == "__main__":
    main()
