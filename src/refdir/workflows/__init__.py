"""Workflows: the staged run, extract, search driver, the run report."""
