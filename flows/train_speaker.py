"""train-speaker: one speaker video in, every stage's output in the artifact store."""

from __future__ import annotations

from prefect import flow

from gstalker_core.config import load_config
from gstalker_core.naming import validate_speaker
from tasks.stages import extract_audio_features, ingest_video, track_and_parse


@flow(name="train-speaker", flow_run_name="train-{speaker}", log_prints=True)
def train_speaker(video: str, speaker: str, profile: str = "preview", overrides: list[str] | None = None,
                  config_file: str | None = None) -> dict[str, str]:
    """Ingest -> tracking and parsing, audio features (later stages join as they land). Returns stage keys."""
    validate_speaker(speaker)
    cfg = load_config(profile, config_file, overrides)
    clip = ingest_video(video, cfg, speaker=speaker)
    tracks = track_and_parse(clip, cfg, speaker=speaker)
    features = extract_audio_features(clip, cfg, speaker=speaker)
    return {"ingest": clip.key, "track": tracks.key, "audio": features.key}
