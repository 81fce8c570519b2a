"""Prefect flows chaining the stage tasks, and the `gstalker` CLI."""
