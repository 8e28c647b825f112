"""The `copd` command and its subcommands."""

from copd.cli.main import main

__all__ = ["main"]
