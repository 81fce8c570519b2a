"""Artifact storage: ``open_store`` picks the backend from the URL."""

from __future__ import annotations

from ..config import PipelineConfig
from .base import ArtifactStore, sha256_file
from .local import LocalStore
from .stages import StageManifest, StageRun, StageWork, PartInfo, content_key, find_stage, publish_stage, run_stage, fetch_part, fetch_stage


def open_store(cfg: PipelineConfig) -> ArtifactStore:
    url = cfg.store_url
    if url.startswith("s3://"):
        from .s3 import S3Store  # boto3 import is slowish; local users never pay it

        return S3Store(url, cfg.store)
    return LocalStore(url.removeprefix("file://"))


__all__ = ["ArtifactStore", "LocalStore", "open_store", "sha256_file", "StageManifest", "StageRun", "PartInfo",
           "StageWork", "content_key", "find_stage", "publish_stage", "run_stage", "fetch_part", "fetch_stage"]
