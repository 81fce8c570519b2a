"""User media copied into the store so that any worker can read it.

A local video submitted to a queue must be readable by a worker on another machine, so
it is uploaded once under ``uploads/<sha256 prefix>/<file name>`` (content-addressed: the
same file is never uploaded twice) and the job refers to it by URL.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .base import ArtifactStore, sha256_file

ROOT = "uploads"


def upload_media(store: ArtifactStore, path: Path) -> str:
    """Upload ``path`` unless already stored; return a URL/path that ``ingest.fetch_source`` reads."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file", "check the path of the video")
    safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.name)
    key = f"{ROOT}/{sha256_file(path)[:24]}/{safe_name}"
    if not store.exists(key):
        store.put_file(key, path)
    local = store.local_path(key)
    return str(local) if local is not None else f"{store.url}/{key}"
