"""The refdir command line."""

from refdir.cli.main import app, main

__all__ = ["app", "main"]
