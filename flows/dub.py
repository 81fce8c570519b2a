"""dub: a trained speaker says new audio; the mp4 lands in the store (and a local path if asked)."""

from __future__ import annotations

from prefect import flow, task

from gstalker_core import dub as dubbing
from gstalker_core.config import PipelineConfig, load_config
from gstalker_core.naming import validate_speaker
from gstalker_core.storage import open_store
from tasks.gpu import gpu_slot
from tasks.stages import retry_transient


@task(name="render-dub", task_run_name="render-dub-{speaker}", tags=["gpu"], retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_transient)
def render_dub(speaker: str, audio: str, cfg: PipelineConfig) -> str:
    with gpu_slot():
        return dubbing.run(open_store(cfg), speaker, audio, cfg).key


@flow(name="dub", flow_run_name="dub-{speaker}", log_prints=True)
def dub(speaker: str, audio: str, profile: str = "preview", overrides: list[str] | None = None,
        config_file: str | None = None) -> str:
    """Render ``audio`` (path or s3:// URL) with ``speaker``'s model; returns the mp4's store key."""
    validate_speaker(speaker)
    cfg = load_config(profile, config_file, overrides)
    key = render_dub(speaker, audio, cfg)
    print(f"dub of {audio} by {speaker}: {key} in {cfg.store_url}")
    return key
