"""User media in and out of the store: uploads for queued jobs, and fetching a job's media.

A local video submitted to a queue must be readable by a worker on another machine, so
it is uploaded once under ``uploads/<sha256 prefix>/<file name>`` (content-addressed: the
same file is never uploaded twice) and the job refers to it by URL.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse

from ..config import PipelineConfig
from ..errors import InputError
from .base import ArtifactStore, check_key, sha256_file

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


def fetch_media(source: str, cfg: PipelineConfig) -> Path:
    """A local path for ``source``: the path itself, or an ``s3://`` object downloaded to the cache."""
    if not source.startswith("s3://"):
        return Path(source).expanduser()
    from .s3 import S3Store

    parsed = urlparse(source)
    key = parsed.path.lstrip("/")
    if not key:
        raise InputError(f"{source} names a bucket, not a file", "give the full URL: s3://bucket/path/file.mp4")
    dest = cfg.cache_dir / "sources" / hashlib.sha256(source.encode()).hexdigest()[:16] / Path(key).name
    bucket = S3Store(f"s3://{parsed.netloc}", cfg.store)
    if not bucket.exists(key):
        raise InputError(f"{source} does not exist", "check the URL, e.g. with `aws s3 ls` on its folder")
    return bucket.get_file(key, dest)


def resolve_media(store: ArtifactStore, ref: str, cfg: PipelineConfig) -> str:
    """A media reference (local path, s3:// URL, or a key inside ``store``) as a path/URL ``fetch_media`` reads."""
    if ref.startswith("s3://") or Path(ref).expanduser().is_file():
        return ref
    check_key(ref)
    if not store.exists(ref):
        raise InputError(f"{ref} is not in the store {store.url}", "upload the file first (e.g. `aws s3 cp`)")
    local = store.local_path(ref)
    return str(local if local is not None else store.get_file(ref, cfg.cache_dir / "media" / ref))
