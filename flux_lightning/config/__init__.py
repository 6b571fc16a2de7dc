"""The configuration: the schema registered with Hydra (schema.py), ``validate()`` (validation.py),
the plain-dict groups' checks (run_checks.py), the one in-process Hydra composition (compose.py)."""
