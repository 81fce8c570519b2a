"""The artifact store interface: one API over a local directory and S3.

Keys are '/'-separated relative paths (``stages/ingest/<key>/MANIFEST.json``). Every
write of one object is atomic: a reader sees the old object, the new one, or none, never
a partial one (local: write to a temporary file then rename; S3: a PUT or a completed
multipart upload is atomic by the protocol).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

from ..errors import StorageError


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root or prefix."""
    parts = key.split("/")  # not PurePosixPath: it silently collapses "a//b" and "a/./b"
    if not key or key.startswith("/") or "\\" in key or any(p in ("..", ".", "") for p in parts):
        raise StorageError(f"refusing unsafe storage key {key!r}",
                           "keys are relative '/'-separated paths without '.' or '..' parts")
    return key


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore(ABC):
    """put/get/exists/list/delete of objects and directory trees."""

    url: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path) -> Path:
        """Download ``key`` to ``path`` (atomically); raise ``StorageError`` if missing."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    def local_path(self, key: str) -> Path | None:
        """A path to read ``key`` in place, when the store is on this filesystem."""
        return None

    # Trees are built from the single-object primitives above, so both backends share them.
    def put_dir(self, prefix: str, directory: Path) -> list[str]:
        keys = []
        for p in sorted(Path(directory).rglob("*")):
            if p.is_file():
                key = f"{prefix.rstrip('/')}/{p.relative_to(directory).as_posix()}"
                self.put_file(key, p)
                keys.append(key)
        return keys

    def get_dir(self, prefix: str, directory: Path) -> list[Path]:
        prefix = prefix.rstrip("/") + "/"
        out = []
        for key in self.list(prefix):
            out.append(self.get_file(key, Path(directory) / key[len(prefix):]))
        return out

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix.rstrip("/") + "/")
        for key in keys:
            self.delete(key)
        return len(keys)
