"""Prefect tasks: thin wrappers over gstalker_core stages (caching, retries, run names)."""
