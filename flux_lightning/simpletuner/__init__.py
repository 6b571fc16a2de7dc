"""SimpleTuner's config.json as overrides: the key table (table.py) built from rules.py,
``to_overrides`` (overrides.py), ``simpletuner_config=`` expanded on the command line (cli.py)."""
