"""Core: models, architecture, chat format, data, directions, hooks, forward passes, edits, file formats."""
