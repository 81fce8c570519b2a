"""Speaker registry: ``speakers/<name>/model.json`` points at a speaker's published model.

Stage outputs are content-addressed and anonymous; this small pointer is what gives them a
name. The train flow writes it last, after the bundle and its evaluation are stored.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from .errors import InputError
from .naming import validate_speaker
from .model.bundle import Bundle, fetch_bundle
from .storage import ArtifactStore, StageManifest, find_stage

ROOT = "speakers"


class SpeakerModel(BaseModel):
    speaker: str
    bundle_key: str  # stages/deform/<key>
    evaluation_key: str | None
    video: str
    profile: str
    published_at: datetime


def pointer_key(speaker: str) -> str:
    return f"{ROOT}/{validate_speaker(speaker)}/model.json"


def publish(store: ArtifactStore, speaker: str, bundle_run: StageManifest, evaluation_run: StageManifest | None,
            video: str, profile: str) -> SpeakerModel:
    entry = SpeakerModel(speaker=speaker, bundle_key=bundle_run.key,
                         evaluation_key=evaluation_run.key if evaluation_run else None, video=video, profile=profile,
                         published_at=datetime.now(timezone.utc))
    store.put_bytes(pointer_key(speaker), entry.model_dump_json(indent=2).encode())
    return entry


def lookup(store: ArtifactStore, speaker: str) -> SpeakerModel:
    key = pointer_key(speaker)
    if not store.exists(key):
        known = sorted({k.split("/")[1] for k in store.list(f"{ROOT}/") if k.endswith("/model.json")})
        raise InputError(f"no trained model for speaker {speaker!r} in the store {store.url}"
                         + (f" (known: {', '.join(known[:10])})" if known else ""),
                         f"train it first: gstalker train VIDEO --speaker {speaker}")
    return SpeakerModel.model_validate_json(store.get_bytes(key))


def load_speaker(store: ArtifactStore, speaker: str, cache_dir: Path) -> Bundle:
    """The published model bundle of ``speaker``."""
    from .train.train_deform import STAGE

    entry = lookup(store, speaker)
    run = find_stage(store, STAGE, entry.bundle_key)
    if run is None:
        raise InputError(f"the model of {speaker!r} (stages/{STAGE}/{entry.bundle_key}) is missing from the store",
                         f"retrain it: gstalker train {entry.video} --speaker {speaker}")
    return fetch_bundle(store, run, cache_dir)
