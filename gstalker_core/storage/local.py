"""Artifact store on a local (or mounted) directory: the embedded default."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import StorageError
from .base import ArtifactStore, check_key


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the local store at {self.root}: {e.strerror}",
                               "choose a writable directory with --store or GSTALKER_STORE__URL") from None
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _atomic_write(self, dest: Path, writer) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self._atomic_write(self._path(key), lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def get_file(self, key: str, path: Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"{key} is not in the store {self.url}", "run the stage that produces it first")
        path = Path(path)
        with open(src, "rb") as s:
            self._atomic_write(path, lambda f: shutil.copyfileobj(s, f, 1 << 20))
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{key} is not in the store {self.url}", "run the stage that produces it first") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix.rstrip("/") else self.root
        start = base if base.is_dir() else base.parent
        keys = []
        for p in start.rglob("*"):
            if p.is_file() and not p.name.endswith(".part"):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        p = self._path(key)
        return p if p.is_file() else None
