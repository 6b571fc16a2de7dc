"""``python -m flux_lightning [overrides]``: train with the Hydra config tree (see conf/train.yaml)."""

from .run.heap import startup_imports

with startup_imports():  # torch, Lightning, Hydra ... without the collector's full walks (heap.py)
    from .run import timings
    from .run.train import main

timings.mark("imported")

if __name__ == "__main__":
    main()
