"""Dubbing job queue in the artifact store: ``jobs/inbox/<id>.json`` -> ``done/`` or ``failed/``.

The inbox is the user's interface: drop a job file in, find its outcome in ``done/`` or
``failed/``. Who renders which job is Prefect's business (flows/nightly.py makes each job
its own run of the ``dub`` deployment, once, by idempotency key); this module only reads
jobs and records outcomes.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError
from .naming import validate_speaker
from .storage import ArtifactStore

INBOX, DONE, FAILED = "jobs/inbox", "jobs/done", "jobs/failed"
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class DubJob(BaseModel):
    """One dubbing request: which speaker says which audio."""

    model_config = ConfigDict(extra="forbid")
    speaker: str
    audio: str = Field(description="s3:// URL or a key in this store, e.g. uploads/news-0412.mp3")
    profile: str = "preview"

    @field_validator("speaker")
    @classmethod
    def _speaker(cls, v: str) -> str:
        try:
            return validate_speaker(v)
        except InputError as err:  # pydantic collects ValueErrors, so every bad field is reported
            raise ValueError(f"{err.problem} ({err.fix})") from None

    @field_validator("audio")
    @classmethod
    def _audio(cls, v: str) -> str:
        if not v.startswith("s3://") and (v.startswith("/") or ".." in v.split("/") or not v.strip()):
            raise ValueError("must be an s3:// URL or a key inside the store (no leading '/', no '..')")
        return v


class JobOutcome(BaseModel):
    job_id: str
    status: Literal["done", "failed"]
    owner: str
    finished_at: datetime
    job: dict
    output: str | None = None
    reason: str | None = None


def validate_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.fullmatch(job_id):
        raise InputError(f"invalid job id {job_id!r}",
                         "name job files with letters, digits, '.', '_' and '-' only, e.g. jobs/inbox/news-0412.json")
    return job_id


def inbox(store: ArtifactStore) -> list[str]:
    """Ids of the jobs waiting in the inbox, oldest name first."""
    ids = []
    for key in store.list(f"{INBOX}/"):
        name = key.removeprefix(f"{INBOX}/")
        if name.endswith(".json") and "/" not in name:
            ids.append(name.removesuffix(".json"))
    return sorted(ids)


def submit(store: ArtifactStore, job_id: str, job: DubJob) -> str:
    key = f"{INBOX}/{validate_job_id(job_id)}.json"
    store.put_bytes(key, job.model_dump_json(indent=2).encode())
    return key


def read_job(store: ArtifactStore, job_id: str) -> DubJob:
    """The job's request, or an ``InputError`` saying what is wrong with the file."""
    try:
        return DubJob.model_validate_json(store.get_bytes(f"{INBOX}/{job_id}.json"))
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in err.errors())
        raise InputError(f"job {job_id} is invalid: {details}",
                         'write the job as JSON like {"speaker": "cnn-anchor", "audio": "s3://bucket/speech.wav"}') from None


def outcome(store: ArtifactStore, job_id: str) -> JobOutcome | None:
    for folder in (DONE, FAILED):
        key = f"{folder}/{job_id}.json"
        if store.exists(key):
            return JobOutcome.model_validate_json(store.get_bytes(key))
    return None


def finish(store: ArtifactStore, job_id: str, job: dict, status: Literal["done", "failed"], owner: str,
           output: str | None = None, reason: str | None = None) -> JobOutcome:
    """Record the job's outcome, then take it out of the inbox (in that order: a crash in
    between leaves a job with an outcome, which ``pending`` no longer lists)."""
    result = JobOutcome(job_id=job_id, status=status, owner=owner, finished_at=_now(), job=job,
                        output=output, reason=reason)
    store.put_bytes(f"{DONE if status == 'done' else FAILED}/{job_id}.json", result.model_dump_json(indent=2).encode())
    store.delete(f"{INBOX}/{job_id}.json")
    return result


def pending(store: ArtifactStore) -> list[str]:
    """Inbox jobs without an outcome yet (one with an outcome is only cleaned up)."""
    waiting = []
    for job_id in inbox(store):
        if outcome(store, job_id) is None:
            waiting.append(job_id)
        else:
            store.delete(f"{INBOX}/{job_id}.json")
    return waiting
