"""Local model folders for the optional backends (landmark detectors, speech models).

Weights are never downloaded: the user points a setting at a folder holding them. These
helpers find the expected files there, name the model by the content of those files (the
digest enters the stage's key, so replacing the weights in place reruns the stage), and turn
a missing package, folder or file into an ``error:`` / ``fix:`` before any stage work starts.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import ModuleType

from .errors import ConfigError
from .storage.base import sha256_file


def model_folder(path: str, setting: str, user: str) -> Path:
    """The existing, non-empty folder that ``setting`` (e.g. ``track.model_dir``) names for ``user``."""
    folder = Path(path).expanduser() if path else None
    if folder is None or not folder.is_dir():
        raise ConfigError(f"{user} needs its weights in a local folder, but {setting}={path!r} is not a directory",
                          f"set {setting} to the folder holding the model files (they are never downloaded)")
    if not any(folder.iterdir()):
        raise ConfigError(f"{setting}={path!r} is an empty folder; {user} needs its weights there",
                          f"copy the model files into {folder} (see the README, 'Optional backends')")
    return folder


def require_files(folder: Path, names: list[str], setting: str, user: str) -> list[Path]:
    """``folder``/name for each of ``names``; a ConfigError naming the missing ones and what is there."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise ConfigError(f"{setting}={str(folder)!r} lacks {', '.join(missing)} for {user} "
                          f"(it holds: {', '.join(present) or 'nothing'})",
                          f"copy {', '.join(missing)} into {folder}, or point {setting} at the folder that holds them")
    return [folder / name for name in names]


def files_digest(paths: list[Path]) -> str:
    """Content identity of a model's files (names and bytes), 16 hex characters."""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()[:16]


def import_optional(module: str, package: str, user: str) -> ModuleType:
    """``module`` of the optional ``package``, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{user} needs the Python package {package!r}, which is not installed ({e})",
                          "install the optional backends' pinned packages with `bash scripts/install.sh --backends` "
                          "(requirements/backends.txt), then run again") from None
