"""Where Prefect keeps task results: beside the artifacts when the store is S3.

Prefect's cache lookups and retries read a task's persisted result. Its default storage is
the worker's own disk (``$PREFECT_HOME/storage``), which vanishes with a Docker or Kubernetes
worker and which another worker cannot see, so a stage finished on one pod would run again
(or its cached lookup fail) on the next. With an ``s3://`` store the results go to the same
bucket under ``<prefix>/prefect-results/`` through prefect-aws's ``S3Bucket``, with the
store's endpoint and addressing and boto3's standard credential chain (never credentials in a
block). A local store keeps Prefect's default: a local store has one machine anyway.
"""

from __future__ import annotations

import hashlib
import os
from typing import TypeVar
from urllib.parse import urlparse

from prefect import Task

from gstalker_core.config import PipelineConfig

RESULTS_FOLDER = "prefect-results"
T = TypeVar("T", bound=Task)


def result_storage(cfg: PipelineConfig):
    """The prefect-aws ``S3Bucket`` for an ``s3://`` store, saved on the server (Prefect reads
    results through saved blocks), else None (Prefect's default)."""
    if not cfg.store_url.startswith("s3://"):
        return None
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
    from prefect.exceptions import ObjectAlreadyExists

    url = urlparse(cfg.store_url)
    folder = "/".join(p for p in (url.path.strip("/"), RESULTS_FOLDER) if p)
    client = AwsClientParameters(endpoint_url=cfg.store.endpoint_url,
                                 config={"s3": {"addressing_style": cfg.store.addressing_style},
                                         "retries": {"mode": "standard", "max_attempts": cfg.store.max_attempts}})
    bucket = S3Bucket(bucket_name=url.netloc, bucket_folder=folder,
                      credentials=AwsCredentials(region_name=cfg.store.region or os.environ.get("AWS_REGION") or "us-east-1",
                                                 aws_client_parameters=client))
    # One block per distinct storage, named by its settings: every run on it shares the block.
    name = "gstalker-results-" + hashlib.sha256(bucket.model_dump_json().encode()).hexdigest()[:16]
    try:
        return S3Bucket.load(name)
    except ValueError:  # not saved yet
        pass
    try:
        bucket.save(name)
    except ObjectAlreadyExists:  # another run saved it meanwhile
        return S3Bucket.load(name)
    return bucket


def with_results_in_store(cfg: PipelineConfig, *tasks: T) -> list[T]:
    """``tasks`` persisting their results where ``result_storage`` says."""
    storage = result_storage(cfg)
    return [t.with_options(result_storage=storage) if storage is not None else t for t in tasks]
