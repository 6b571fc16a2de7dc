"""``python -m flux_lightning.wizard``: the terminal wizard (configure.py) and its plan (plan.py)."""
