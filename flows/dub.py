"""dub: a trained speaker says new audio; the mp4 lands in the store (and a local path if asked).

A run for an inbox job (``job_id`` set, queued by nightly-dubbing) also records the job's
outcome in ``jobs/done/`` or ``jobs/failed/`` and takes it out of the inbox.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.runtime import flow_run

from gstalker_core import dub as dubbing
from gstalker_core import jobs
from gstalker_core.config import PipelineConfig, load_config
from gstalker_core.errors import GstalkerError
from gstalker_core.naming import validate_speaker
from gstalker_core.runtime import on_gpu
from gstalker_core.storage import open_store
from tasks.gpu import gpu_slot
from tasks.results import with_results_in_store
from tasks.stages import retry_transient


@task(name="render-dub", task_run_name="render-dub-{speaker}", tags=["gpu"], retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_transient)
def render_dub(speaker: str, audio: str, cfg: PipelineConfig) -> str:
    with gpu_slot() as gpu:
        return dubbing.run(open_store(cfg), speaker, audio, on_gpu(cfg, gpu)).key


@flow(name="dub", flow_run_name="dub-{speaker}", log_prints=True)
def dub(speaker: str, audio: str, profile: str = "preview", overrides: list[str] | None = None,
        config: dict | None = None, job_id: str | None = None) -> str:
    """Render ``audio`` (path, s3:// URL or store key) with ``speaker``'s model; returns the mp4's
    store key. ``config``: a configuration's content layered over the profile."""
    cfg = load_config(profile, config, overrides)
    (render,) = with_results_in_store(cfg, render_dub)
    if job_id is None:
        validate_speaker(speaker)
        key = render(speaker, audio, cfg)
        print(f"dub of {audio} by {speaker}: {key} in {cfg.store_url}")
        return key
    return _render_job(job_id, render, cfg)


def _render_job(job_id: str, render, cfg: PipelineConfig) -> str:
    """Render one inbox job and record its outcome; a failure is recorded, then fails the run."""
    store = open_store(cfg)
    owner = f"flow-run-{flow_run.get_id() or 'local'}"
    done = jobs.outcome(store, job_id)
    if done is not None:  # an earlier attempt finished it (its run crashed after recording)
        print(f"job {job_id}: already {done.status} by {done.owner}")
        return done.output or ""
    job = jobs.read_job(store, job_id)
    try:
        key = render(job.speaker, job.audio, cfg)
    except GstalkerError as err:
        jobs.finish(store, job_id, job.model_dump(), "failed", owner, reason=f"{err.problem} (fix: {err.fix})")
        raise
    except Exception as err:
        jobs.finish(store, job_id, job.model_dump(), "failed", owner, reason=f"{type(err).__name__}: {err}")
        raise
    jobs.finish(store, job_id, job.model_dump(), "done", owner, output=key)
    print(f"job {job_id}: {job.speaker} says {job.audio}: {key} in {cfg.store_url}")
    return key
