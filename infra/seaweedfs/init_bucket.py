"""One-shot: create the gstalker bucket (admin identity), then prove the store is ready.

Readiness is a real write, read and delete by the *worker* identity under the store prefix:
right after a (re)start SeaweedFS can fail reads for a few seconds, and only a round trip
shows both the server and the worker's credentials work. Transient failures are retried
until S3_READY_TIMEOUT_S; wrong credentials or permissions fail at once. Secrets come from
the environment only and are never printed.

Environment: S3_ENDPOINT_URL, GSTALKER_BUCKET (gstalker), GSTALKER_PREFIX (prod),
GSTALKER_S3_ADMIN_ACCESS_KEY_ID/_SECRET_ACCESS_KEY, GSTALKER_S3_ACCESS_KEY_ID/_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

FATAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName"}


def s3_client(endpoint: str, key_var: str, secret_var: str):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=os.environ[key_var], aws_secret_access_key=os.environ[secret_var],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                      connect_timeout=3, read_timeout=10),
    )


def ensure_bucket(admin, bucket: str) -> None:
    try:
        admin.create_bucket(Bucket=bucket)
    except ClientError as err:
        if err.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def round_trip(worker, bucket: str, prefix: str) -> None:
    key = f"{prefix}/.ready/{uuid.uuid4().hex}"
    body = uuid.uuid4().bytes
    worker.put_object(Bucket=bucket, Key=key, Body=body)
    try:
        got = worker.get_object(Bucket=bucket, Key=key)["Body"].read()
    finally:
        worker.delete_object(Bucket=bucket, Key=key)
    if got != body:
        raise RuntimeError(f"read back {len(got)} bytes that differ from the {len(body)} written")


def main() -> int:
    endpoint = os.environ["S3_ENDPOINT_URL"]
    bucket = os.environ.get("GSTALKER_BUCKET", "gstalker")
    prefix = os.environ.get("GSTALKER_PREFIX", "prod").strip("/")
    deadline = time.monotonic() + float(os.environ.get("S3_READY_TIMEOUT_S", "120"))
    admin = s3_client(endpoint, "GSTALKER_S3_ADMIN_ACCESS_KEY_ID", "GSTALKER_S3_ADMIN_SECRET_ACCESS_KEY")
    worker = s3_client(endpoint, "GSTALKER_S3_ACCESS_KEY_ID", "GSTALKER_S3_SECRET_ACCESS_KEY")
    while True:
        try:
            ensure_bucket(admin, bucket)
            round_trip(worker, bucket, prefix)
        except ClientError as err:
            code = err.response["Error"]["Code"]
            if code in FATAL_CODES:
                print(f"error: {endpoint} refused {err.operation_name} ({code})", file=sys.stderr)
                print("fix: check the GSTALKER_S3_* keys in infra/.env match what SeaweedFS was started "
                      "with (restart the seaweedfs service after changing them)", file=sys.stderr)
                return 2
            last = f"{err.operation_name}: {code}"
        except (BotoCoreError, RuntimeError) as err:
            last = f"{type(err).__name__}: {err}"
        else:
            print(f"s3://{bucket}/{prefix}/ is ready at {endpoint}")
            return 0
        if time.monotonic() > deadline:
            print(f"error: {endpoint} not ready ({last})", file=sys.stderr)
            print("fix: look at the seaweedfs service's log: docker compose logs seaweedfs", file=sys.stderr)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
