"""Queue submission: hand a speaker video to the `train-speaker` deployment.

The video is uploaded to the store first (workers may run elsewhere), then a flow run is
created for the submission: the video's content, the speaker and the config. Submitting the
same thing again returns the earlier run while it is active or completed; after a failed,
crashed or cancelled run it queues a new one, which skips every stage already in the store.
A run whose worker died stays Running until someone marks it Crashed (see README.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_UI_URL

from gstalker_core.config import load_config
from gstalker_core.errors import ConfigError, InputError
from gstalker_core.naming import validate_speaker
from gstalker_core.storage import open_store, sha256_file
from gstalker_core.storage.uploads import upload_media

TRAIN_DEPLOYMENT = "train-speaker/train-speaker"


def _submission_id(video_url: str, speaker: str, profile: str, overrides: list[str], config_file: str | None) -> str:
    config_text = Path(config_file).read_text() if config_file else ""
    doc = json.dumps([video_url, speaker, profile, sorted(overrides), config_text])
    return "train-" + hashlib.sha256(doc.encode()).hexdigest()[:32]


@dataclass
class Submission:
    run: FlowRun
    created: bool  # False: an earlier run of the same submission is active or completed
    replaces: FlowRun | None = None  # the failed/crashed/cancelled run this one starts over


def _still_counts(run: FlowRun) -> bool:
    return run.state is None or not run.state.is_final() or run.state.is_completed()


def submit_training(video: str, speaker: str, profile: str, overrides: list[str], config_file: str | None,
                    deployment: str = TRAIN_DEPLOYMENT) -> Submission:
    """Queue training ``speaker`` on ``video``, or return the earlier run that still counts."""
    validate_speaker(speaker)
    cfg = load_config(profile, config_file, overrides)
    if video.startswith("s3://"):
        video_url = video
    else:
        video_url = upload_media(open_store(cfg), Path(video))
    submission = _submission_id(video_url if video.startswith("s3://") else sha256_file(Path(video)), speaker,
                                profile, overrides, config_file)
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(f"deployment {deployment!r} is not registered on the Prefect server",
                              "run `prefect deploy --all` from the repository root (see prefect.yaml)") from None
        # Every run of a submission carries its id as a tag; the newest decides.
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[submission])))
        earlier = sorted(runs, key=lambda r: r.created)
        if earlier and _still_counts(earlier[-1]):
            return Submission(earlier[-1], created=False)
        # The attempt number in the idempotency key makes two users resubmitting at once share one run.
        run = client.create_flow_run_from_deployment(
            dep.id, parameters=dict(video=video_url, speaker=speaker, profile=profile, overrides=overrides,
                                    config_file=config_file),
            idempotency_key=f"{submission}-{len(earlier)}", tags=[f"speaker:{speaker}", submission])
    return Submission(run, created=True, replaces=earlier[-1] if earlier else None)


def read_run(run_id: str) -> FlowRun:
    try:
        uid = UUID(run_id)
    except ValueError:
        raise InputError(f"{run_id!r} is not a flow run id", "use the id printed by `gstalker submit`") from None
    with get_client(sync_client=True) as client:
        try:
            return client.read_flow_run(uid)
        except ObjectNotFound:
            raise InputError(f"no flow run {run_id} on this Prefect server",
                             "check PREFECT_API_URL points at the server the run was submitted to") from None


def recent_runs(limit: int = 20) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(limit=limit, sort="EXPECTED_START_TIME_DESC")


def ui_link(run: FlowRun) -> str:
    base = PREFECT_UI_URL.value() or "http://127.0.0.1:4200"
    return f"{base.rstrip('/')}/runs/flow-run/{run.id}"
