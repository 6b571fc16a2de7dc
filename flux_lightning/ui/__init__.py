"""The local web UI (`python -m flux_lightning.ui`): forms from the config schemas, dataset check,
hardware choice, runs as subprocesses of `python -m flux_lightning`. Needs the `ui` extra."""
