"""Artifact store on any S3-compatible endpoint (AWS, MinIO, Ceph, SeaweedFS) via boto3.

Credentials come only from boto3's standard chain (environment, shared config, instance
role); they are never part of our config and never logged. Transient errors are retried
by botocore's ``standard`` retry mode (exponential backoff with jitter); large objects go
through boto3's managed multipart transfer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from ..config import StoreConfig
from ..errors import StorageError
from .base import ArtifactStore, check_key

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
               "ExpiredToken", "AuthorizationHeaderMalformed", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Store(ArtifactStore):
    def __init__(self, url: str, cfg: StoreConfig):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"{url!r} is not an s3://bucket[/prefix] URL", "write the store URL as s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = cfg.endpoint_url or "AWS S3"
        botocfg = Config(
            retries={"mode": "standard", "max_attempts": cfg.max_attempts},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            s3={"addressing_style": cfg.addressing_style},
            # S3-compatible servers differ in flexible-checksum support; we verify our own
            # sha256 from the stage manifest instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self.client = boto3.session.Session().client(
                "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region or os.environ.get("AWS_REGION") or "us-east-1",
                config=botocfg,
            )
        except (BotoCoreError, ValueError) as e:
            raise StorageError(f"cannot configure the S3 client for {self.url}: {e}",
                               "check store.endpoint_url (e.g. http://127.0.0.1:8333) and store.region") from None
        self._bucket_checked = False
        mb = 1024 * 1024
        self.transfer = TransferConfig(multipart_threshold=cfg.multipart_threshold_mb * mb,
                                       multipart_chunksize=cfg.multipart_chunk_mb * mb, use_threads=False)

    # -- helpers -----------------------------------------------------------------------
    def _k(self, key: str) -> str:
        check_key(key)
        if not self._bucket_checked:
            self._check_bucket()
        return f"{self.prefix}/{key}" if self.prefix else key

    def _check_bucket(self) -> None:
        """Fail early and clearly on a missing bucket or refused credentials: a HEAD on a key of a
        missing bucket reads as "no such key", and some S3-compatible servers create buckets on PUT."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if self._missing(e) or str(e.response.get("Error", {}).get("Code", "")) == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist on {self.endpoint}",
                                   f"create it (e.g. `aws s3 mb s3://{self.bucket}`) or fix store.url") from None
            raise self._error(e, "open the bucket") from None
        except BotoCoreError as e:
            raise self._error(e, "open the bucket") from None
        self._bucket_checked = True

    def _error(self, err: Exception, what: str) -> StorageError:
        """Translate boto errors into a message naming the problem and the fix."""
        if isinstance(err, NoCredentialsError):
            return StorageError(f"no S3 credentials found while trying to {what} on {self.url}",
                                "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE (never put them in config files)")
        if isinstance(err, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
            return StorageError(f"cannot reach the S3 endpoint {self.endpoint} to {what} ({type(err).__name__})",
                                "check store.endpoint_url and that the object store is running and reachable")
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _AUTH_CODES:
                return StorageError(f"the S3 endpoint {self.endpoint} refused our credentials to {what} ({code})",
                                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this bucket")
            if code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist on {self.endpoint}",
                                    f"create it (e.g. `aws s3 mb s3://{self.bucket}`) or fix store.url")
            return StorageError(f"S3 error {code} while trying to {what} on {self.url}: {err}",
                                "check the bucket, its policy and the endpoint")
        return StorageError(f"S3 failure while trying to {what} on {self.url}: {err}",
                            "check store.endpoint_url and the network")

    def _missing(self, err: Exception) -> bool:
        return isinstance(err, ClientError) and str(err.response.get("Error", {}).get("Code", "")) in _MISSING_CODES

    # -- interface ---------------------------------------------------------------------
    def put_file(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._k(key), Config=self.transfer)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, f"upload {key}") from None
        except Exception as e:  # boto3's S3UploadFailedError wraps the ClientError
            raise self._error(e.__cause__ or e, f"upload {key}") from None

    def get_file(self, key: str, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._k(key), tmp, Config=self.transfer)
            os.replace(tmp, path)
        except (BotoCoreError, ClientError) as e:
            if self._missing(e):
                raise StorageError(f"{key} is not in the store {self.url}", "run the stage that produces it first") from None
            raise self._error(e, f"download {key}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, f"write {key}") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except (BotoCoreError, ClientError) as e:
            if self._missing(e):
                raise StorageError(f"{key} is not in the store {self.url}", "run the stage that produces it first") from None
            raise self._error(e, f"read {key}") from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except (BotoCoreError, ClientError) as e:
            if self._missing(e):
                return False
            raise self._error(e, f"check {key}") from None

    def list(self, prefix: str = "") -> list[str]:
        if prefix.rstrip("/"):
            full = self._k(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "")
        else:
            if not self._bucket_checked:
                self._check_bucket()
            full = f"{self.prefix}/" if self.prefix else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, f"list {prefix or '/'}") from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except (BotoCoreError, ClientError) as e:
            if not self._missing(e):
                raise self._error(e, f"delete {key}") from None
