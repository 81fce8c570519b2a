"""gstalker core library: every stage of the data path, with no orchestration import.

Prefect lives in ``tasks/`` and ``flows/``; this package must stay importable and usable
without it (the CLI's local mode and the tests use it directly).
"""

__version__ = "0.1.0"
