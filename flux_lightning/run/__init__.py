"""The Hydra application: ``train()``/``main`` (train.py), run dirs and their lock, resume, sweeps,
timings, console filters, device choice."""
