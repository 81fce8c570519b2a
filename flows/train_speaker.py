"""train-speaker: one speaker video in, every stage's output in the artifact store."""

from __future__ import annotations

from prefect import flow

from gstalker_core.config import load_config
from gstalker_core.naming import validate_speaker
from tasks.results import with_results_in_store
from tasks.stages import (evaluate_model, extract_audio_features, fit_static, ingest_video, publish_speaker,
                          track_and_parse, train_deformation)


# persist_result: the stage keys it returns stay readable when its final state is read back from
# the API (a run on a worker, or a state write the server answered with its own copy)
@flow(name="train-speaker", flow_run_name="train-{speaker}", log_prints=True, persist_result=True)
def train_speaker(video: str, speaker: str, profile: str = "preview", overrides: list[str] | None = None,
                  config: dict | None = None) -> dict[str, str]:
    """Ingest -> tracking and parsing, audio features -> static fit -> deformation training ->
    evaluation -> the speaker's model published in the store. Returns the stage keys.

    ``config``: a configuration's content (a mapping of sections, as in a --config file),
    layered over the profile; a submission sends its whole effective configuration."""
    validate_speaker(speaker)
    cfg = load_config(profile, config, overrides)
    ingest, track, audio_features, static_fit, deform, evaluate, publish = with_results_in_store(
        cfg, ingest_video, track_and_parse, extract_audio_features, fit_static, train_deformation, evaluate_model,
        publish_speaker)
    clip = ingest(video, cfg, speaker=speaker)
    tracks = track(clip, cfg, speaker=speaker)
    features = audio_features(clip, cfg, speaker=speaker)
    static = static_fit(tracks, clip, cfg, speaker=speaker)
    bundle = deform(tracks, features, static, cfg, clip, speaker=speaker)
    evaluation = evaluate(bundle, clip, cfg, tracks, features, static, speaker=speaker)
    publish(speaker, bundle, evaluation, video, cfg)
    return {"ingest": clip.key, "track": tracks.key, "audio": features.key, "static": static.key,
            "deform": bundle.key, "evaluate": evaluation.key}
