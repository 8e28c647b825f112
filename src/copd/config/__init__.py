"""Configuration: the typed schema (the one source of truth), YAML loading with overrides, the generated reference."""
