"""End-to-end tests: the CLI, the README's commands, examples, notebook, packaging."""
