"""train-speaker: one speaker video in, every stage's output in the artifact store."""

from __future__ import annotations

from prefect import flow

from gstalker_core.config import load_config
from gstalker_core.naming import validate_speaker
from tasks.stages import (evaluate_model, extract_audio_features, fit_static, ingest_video, publish_speaker,
                          track_and_parse, train_deformation)


# persist_result: the stage keys it returns stay readable when its final state is read back from
# the API (a run on a worker, or a state write the server answered with its own copy)
@flow(name="train-speaker", flow_run_name="train-{speaker}", log_prints=True, persist_result=True)
def train_speaker(video: str, speaker: str, profile: str = "preview", overrides: list[str] | None = None,
                  config_file: str | None = None) -> dict[str, str]:
    """Ingest -> tracking and parsing, audio features -> static fit -> deformation training ->
    evaluation -> the speaker's model published in the store. Returns the stage keys."""
    validate_speaker(speaker)
    cfg = load_config(profile, config_file, overrides)
    clip = ingest_video(video, cfg, speaker=speaker)
    tracks = track_and_parse(clip, cfg, speaker=speaker)
    features = extract_audio_features(clip, cfg, speaker=speaker)
    static = fit_static(tracks, clip, cfg, speaker=speaker)
    bundle = train_deformation(tracks, features, static, cfg, clip, speaker=speaker)
    evaluation = evaluate_model(bundle, clip, cfg, tracks, features, static, speaker=speaker)
    publish_speaker(speaker, bundle, evaluation, video, cfg)
    return {"ingest": clip.key, "track": tracks.key, "audio": features.key, "static": static.key,
            "deform": bundle.key, "evaluate": evaluation.key}
