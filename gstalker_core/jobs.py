"""Dubbing job queue in the artifact store: ``jobs/inbox/<id>.json`` -> ``done/`` or ``failed/``.

Claiming is a lease written with a conditional put (create-if-absent, or replace-if-unchanged
for an expired lease), which S3 (and S3-compatible stores) and the local store both do
atomically: of two runs racing for a job exactly one wins. The owner renews its lease while
it works; a worker that dies stops renewing, and after ``lease_s`` another run takes the job
over. A job is finished by writing its outcome to ``done/`` or ``failed/`` first, then
removing it from the inbox and dropping the lease, so a crash between those steps never
loses a job nor runs it again: a job with an outcome is only cleaned up.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError
from .naming import validate_speaker
from .storage import ArtifactStore

INBOX, CLAIMS, DONE, FAILED = "jobs/inbox", "jobs/claims", "jobs/done", "jobs/failed"
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


class Claim(BaseModel):
    owner: str
    expires_at: datetime


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


class Lease:
    """A claim on one job, renewed in the background until released."""

    def __init__(self, store: ArtifactStore, job_id: str, owner: str, lease_s: float, tag: str):
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.key = f"{CLAIMS}/{job_id}.json"
        self._tag = tag
        self._lock = threading.Lock()
        self.lost = False
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True, name=f"lease-{job_id}")
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) when another run has taken the job over."""
        with self._lock:
            if self.lost:
                return False
            body = Claim(owner=self.owner, expires_at=_now() + timedelta(seconds=self.lease_s))
            tag = self.store.replace_bytes_if_tag(self.key, body.model_dump_json().encode(), self._tag)
            if tag is None:
                self.lost = True
                return False
            self._tag = tag
            return True

    def finish(self, job: dict, status: Literal["done", "failed"], output: str | None = None,
               reason: str | None = None) -> JobOutcome | None:
        """Record the outcome, then clear the inbox entry and the lease; None if the lease was lost."""
        self._stop.set()
        self._renewer.join()
        if not self.renew():  # someone else owns the job now: their outcome counts
            return None
        result = JobOutcome(job_id=self.job_id, status=status, owner=self.owner, finished_at=_now(), job=job,
                            output=output, reason=reason)
        self.store.put_bytes(f"{DONE if status == 'done' else FAILED}/{self.job_id}.json",
                             result.model_dump_json(indent=2).encode())
        _clean_up(self.store, self.job_id)
        return result

    def release(self) -> None:
        """Give the job back unfinished (e.g. on shutdown): another run may claim it at once."""
        self._stop.set()
        self._renewer.join()
        if not self.lost:
            self.store.delete(self.key)


def _clean_up(store: ArtifactStore, job_id: str) -> None:
    for key in (f"{INBOX}/{job_id}.json", f"{CLAIMS}/{job_id}.json"):
        if store.exists(key):
            store.delete(key)


def claim(store: ArtifactStore, job_id: str, owner: str, lease_s: float = 120.0) -> Lease | None:
    """Claim ``job_id`` for ``owner``; None when another live run holds it or it is already finished."""
    validate_job_id(job_id)
    if outcome(store, job_id) is not None:
        _clean_up(store, job_id)  # finished by a run that died before cleaning up
        return None
    key = f"{CLAIMS}/{job_id}.json"
    body = Claim(owner=owner, expires_at=_now() + timedelta(seconds=lease_s)).model_dump_json().encode()
    tag = store.put_bytes_if_absent(key, body)
    if tag is None:
        current = store.get_bytes_and_tag(key)
        if current is None:  # released between our two calls: try once more
            tag = store.put_bytes_if_absent(key, body)
        elif Claim.model_validate_json(current[0]).expires_at < _now():
            tag = store.replace_bytes_if_tag(key, body, current[1])  # take over a dead worker's job
        if tag is None:
            return None
    if outcome(store, job_id) is not None or not store.exists(f"{INBOX}/{job_id}.json"):
        store.delete(key)  # finished while we were claiming
        return None
    return Lease(store, job_id, owner, lease_s, tag)
