"""Queue submission: runs of a deployment, once per submission, resubmitted after a crash.

A submission is what a user asks for, named by the hash of its content: for training, the
video's content, the speaker and the effective configuration (sent as content, never as a
path: a worker in a pod cannot read the submitter's files, and an edit after submission must
not change the run). Every run of a submission carries the tag ``submission:<id>``, and
attempt ``n`` is created with the idempotency key ``<id>-<n>``, so two submitters racing
(two users, two overlapping nightly runs) share one run. Submitting again returns the newest
run while it is active or completed; after a failed, crashed or cancelled one it queues the
next attempt, which skips every stage already in the store.

A worker that dies leaves its run Running; the automation that ``gstalker setup`` installs
(flows/automations.py) marks it Crashed when its heartbeats stop, and ``resubmit_crashed``
queues the next attempt, at most ``max_attempts`` in all.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from gstalker_core.config import config_content, load_config
from gstalker_core.errors import ConfigError, InputError
from gstalker_core.naming import validate_speaker
from gstalker_core.storage import open_store, sha256_file
from gstalker_core.storage.uploads import upload_media

TRAIN_DEPLOYMENT = "train-speaker/train-speaker"
SUBMISSION_TAG = "submission:"


@contextmanager
def prefect_api() -> Iterator[SyncPrefectClient]:
    """A client of the Prefect server in PREFECT_API_URL; a missing or unreachable server is
    the user's ConfigError, never a traceback."""
    import httpx

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("PREFECT_API_URL is not set: this command needs a running Prefect server",
                          "start one (`prefect server start`, or infra/compose.yaml) and "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    try:
        with get_client(sync_client=True) as client:
            yield client
    except httpx.TransportError as err:
        raise ConfigError(f"cannot reach the Prefect server at {url} ({type(err).__name__}: {err})",
                          "start it (`prefect server start`) or point PREFECT_API_URL at a running one") from None


def submission_digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Submission:
    run: FlowRun
    created: bool  # False: an earlier run of the same submission is active or completed
    replaces: FlowRun | None = None  # the failed/crashed/cancelled run this one starts over


def _still_counts(run: FlowRun) -> bool:
    return run.state is None or not run.state.is_final() or run.state.is_completed()


def _runs_of(client: SyncPrefectClient, submission: str) -> list[FlowRun]:
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[SUBMISSION_TAG + submission])))
    return sorted(runs, key=lambda r: r.created)


def _create_attempt(client: SyncPrefectClient, deployment_id: UUID, parameters: dict, submission: str,
                    attempt: int, tags: list[str]) -> FlowRun:
    return client.create_flow_run_from_deployment(
        deployment_id, parameters=parameters, idempotency_key=f"{submission}-{attempt}",
        tags=sorted({*tags, SUBMISSION_TAG + submission}))


def submit_once(client: SyncPrefectClient, deployment: str, parameters: dict, submission: str,
                tags: list[str], settled: Callable[[], bool] = lambda: False) -> Submission:
    """A run of ``deployment`` for ``submission``, or the earlier run that still counts.
    ``settled`` is asked after the newest run is found failed, crashed or cancelled: True means
    that run recorded its outcome before it ended (a dub job that failed), so no new attempt."""
    try:
        dep = client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise ConfigError(f"deployment {deployment!r} is not registered on the Prefect server",
                          "run `prefect deploy --all` from the repository root (see prefect.yaml)") from None
    earlier = _runs_of(client, submission)
    if earlier and (_still_counts(earlier[-1]) or settled()):
        return Submission(earlier[-1], created=False)
    run = _create_attempt(client, dep.id, parameters, submission, len(earlier), tags)
    return Submission(run, created=True, replaces=earlier[-1] if earlier else None)


def submit_training(video: str, speaker: str, profile: str, overrides: list[str], config_file: str | None,
                    deployment: str = TRAIN_DEPLOYMENT) -> Submission:
    """Queue training ``speaker`` on ``video``, or return the earlier run that still counts."""
    validate_speaker(speaker)
    cfg = load_config(profile, config_file, overrides)
    content = config_content(cfg)
    with prefect_api() as client:
        client.hello()  # an unreachable server fails here, before the upload
        if video.startswith("s3://"):
            video_url, video_id = video, video
        else:
            video_url, video_id = upload_media(open_store(cfg), Path(video)), sha256_file(Path(video))
        return submit_once(client, deployment, dict(video=video_url, speaker=speaker, profile=cfg.profile, config=content),
                           "train-" + submission_digest(video_id, speaker, content), tags=[f"speaker:{speaker}"])


def resubmit_crashed(run_id: str, max_attempts: int) -> str:
    """Queue the next attempt of the submission that run ``run_id`` crashed, unless it was
    replaced already or has had ``max_attempts`` runs. Says what it did."""
    with prefect_api() as client:
        run = client.read_flow_run(UUID(run_id))
        submission = next((t.removeprefix(SUBMISSION_TAG) for t in run.tags if t.startswith(SUBMISSION_TAG)), None)
        if run.state is None or not run.state.is_crashed() or submission is None or run.deployment_id is None:
            return f"{run.name}: not a crashed submission; nothing to do"
        runs = _runs_of(client, submission)
        if runs[-1].id != run.id:
            return f"{run.name}: already replaced by {runs[-1].name}"
        if len(runs) >= max_attempts:
            return f"{run.name}: crashed on attempt {len(runs)} of {max_attempts}; not resubmitted (submit it again by hand)"
        new = _create_attempt(client, run.deployment_id, run.parameters, submission, len(runs), run.tags)
    return f"{run.name}: crashed; attempt {len(runs) + 1} of {max_attempts} queued as {new.name} ({new.id})"


def read_run(run_id: str) -> FlowRun:
    try:
        uid = UUID(run_id)
    except ValueError:
        raise InputError(f"{run_id!r} is not a flow run id", "use the id printed by `gstalker submit`") from None
    with prefect_api() as client:
        try:
            return client.read_flow_run(uid)
        except ObjectNotFound:
            raise InputError(f"no flow run {run_id} on this Prefect server",
                             "check PREFECT_API_URL points at the server the run was submitted to") from None


def recent_runs(limit: int = 20) -> list[FlowRun]:
    with prefect_api() as client:
        return client.read_flow_runs(limit=limit, sort="EXPECTED_START_TIME_DESC")


def ui_link(run: FlowRun) -> str:
    base = PREFECT_UI_URL.value() or "http://127.0.0.1:4200"
    return f"{base.rstrip('/')}/runs/flow-run/{run.id}"
