"""One Prefect task per pipeline stage.

Caching has two layers. The artifact store is the source of truth: every core stage
skips work whose content key is already published there, whichever worker did it.
On top, each task's Prefect cache key is that same content key (plus the store URL), so
the Prefect UI shows a skipped stage as ``Cached`` and does not even start it.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from gstalker_core import audio, evaluate, ingest, speakers, tracking
from gstalker_core.train import static_fit, train_deform
from gstalker_core.config import PipelineConfig
from gstalker_core.runtime import on_gpu
from gstalker_core.errors import ConfigError, InputError, StorageError
from gstalker_core.storage import ArtifactStore, StageManifest, StageRun, fetch_part, find_stage, open_store
from tasks.gpu import gpu_slot


def stage_cache_key(key_of: Callable[..., str]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Prefect cache_key_fn: the stage's content key, scoped to the store it lives in."""

    wanted = set(inspect.signature(key_of).parameters)

    def cache_key(_ctx: TaskRunContext, params: dict[str, Any]) -> str:
        cfg: PipelineConfig = params["cfg"]
        store = hashlib.sha256(cfg.store_url.encode()).hexdigest()[:12]
        return f"{key_of(**{k: v for k, v in params.items() if k in wanted})}-{store}"

    return cache_key


# S3 error codes that mean "try again later", not "you asked for something wrong".
_RETRYABLE_S3_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                       "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}


def is_transient(err: BaseException) -> bool:
    """Whether a failure can heal by itself: storage and network errors (the store, S3, the
    Prefect API). A deterministic failure (bad input, a bug, a shape error, out of memory)
    fails the same way again, so it is never retried. Explicit causes (``raise ... from``)
    count: a library may wrap a connection error in its own exception."""
    import botocore.exceptions as boto
    import httpx
    import urllib3.exceptions
    from prefect.exceptions import PrefectHTTPStatusError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (InputError, ConfigError)):
            return False
        if isinstance(seen, (StorageError, ConnectionError, TimeoutError, httpx.TransportError,
                             boto.ConnectionError, boto.HTTPClientError, urllib3.exceptions.HTTPError)):
            return True
        if isinstance(seen, boto.ClientError) and str(seen.response.get("Error", {}).get("Code")) in _RETRYABLE_S3_CODES:
            return True
        if isinstance(seen, PrefectHTTPStatusError) and (seen.response.status_code >= 500
                                                          or seen.response.status_code == 429):
            return True
        seen = seen.__cause__
    return False


def retry_transient(_task, _task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only failures that can heal (``is_transient``)."""
    try:
        state.result()
    except BaseException as err:  # noqa: BLE001 - the failure is what we classify
        return is_transient(err)
    return False


STAGE_TASK = dict(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient, persist_result=True)


def _report(run: StageRun) -> StageManifest:
    m = run.manifest
    get_run_logger().info("%s %s: %s", m.stage, m.key, "cache hit (already in the store)" if run.cache_hit else "built")
    return m


@task(name="ingest", task_run_name="ingest-{speaker}", cache_key_fn=stage_cache_key(ingest.stage_key), **STAGE_TASK)
def ingest_video(source: str, cfg: PipelineConfig, speaker: str = "") -> StageManifest:
    return _report(ingest.run(open_store(cfg), source, cfg))


@task(name="audio-features", task_run_name="audio-features-{speaker}", cache_key_fn=stage_cache_key(audio.stage_key),
      **STAGE_TASK)
def extract_audio_features(ingest_run: StageManifest, cfg: PipelineConfig, speaker: str = "") -> StageManifest:
    return _report(audio.run(open_store(cfg), ingest_run, cfg))


@task(name="track-and-parse", task_run_name="track-and-parse-{speaker}",
      cache_key_fn=stage_cache_key(tracking.stage_key), **STAGE_TASK)
def track_and_parse(ingest_run: StageManifest, cfg: PipelineConfig, speaker: str = "") -> StageManifest:
    return _report(tracking.run(open_store(cfg), ingest_run, cfg))


def _gpu_stage(stage: str, key: str, cfg: PipelineConfig,
               build: Callable[[ArtifactStore, PipelineConfig], StageRun]) -> StageManifest:
    """A GPU stage holds one of its host's GPU slots (tasks/gpu.py) while it builds, on that
    slot's GPU, so CPU stages of other speakers go on beside it. A stage already in the store
    (built on another machine, where Prefect's cache does not reach) is read without queueing
    for a GPU."""
    store = open_store(cfg)
    done = find_stage(store, stage, key)
    if done is not None:
        return _report(StageRun(done, True))
    with gpu_slot() as gpu:
        return _report(build(store, on_gpu(cfg, gpu)))


# The `gpu` tag lets the UI filter GPU stages; their limit is per host (tasks/gpu.py).
@task(name="fit-static", task_run_name="fit-static-{speaker}", cache_key_fn=stage_cache_key(static_fit.stage_key),
      tags=["gpu"], **STAGE_TASK)
def fit_static(track_run: StageManifest, ingest_run: StageManifest, cfg: PipelineConfig, speaker: str = "") -> StageManifest:
    key = static_fit.stage_key(track_run, ingest_run, cfg)
    return _gpu_stage(static_fit.STAGE, key, cfg, lambda store, on: static_fit.run(
        store, ingest_run, track_run, on, progress=_progress_logger("fit-static")))


@task(name="train-deformation", task_run_name="train-deformation-{speaker}",
      cache_key_fn=stage_cache_key(train_deform.stage_key), tags=["gpu"], **STAGE_TASK)
def train_deformation(track_run: StageManifest, audio_run: StageManifest, static_run: StageManifest,
                      cfg: PipelineConfig, ingest_run: StageManifest, speaker: str = "") -> StageManifest:
    key = train_deform.stage_key(track_run, audio_run, static_run, cfg)
    return _gpu_stage(train_deform.STAGE, key, cfg, lambda store, on: train_deform.run(
        store, ingest_run, track_run, audio_run, static_run, on, progress=_progress_logger("train-deformation")))


@task(name="evaluate", task_run_name="evaluate-{speaker}", cache_key_fn=stage_cache_key(evaluate.stage_key),
      tags=["gpu"], **STAGE_TASK)
def evaluate_model(bundle_run: StageManifest, ingest_run: StageManifest, cfg: PipelineConfig,
                   track_run: StageManifest, audio_run: StageManifest, static_run: StageManifest,
                   speaker: str = "") -> StageManifest:
    key = evaluate.stage_key(bundle_run, ingest_run, cfg)
    return _gpu_stage(evaluate.STAGE, key, cfg, lambda store, on: evaluate.run(
        store, ingest_run, track_run, audio_run, static_run, bundle_run, on))


@task(name="publish-speaker", task_run_name="publish-{speaker}", retries=2, retry_delay_seconds=5)
def publish_speaker(speaker: str, bundle_run: StageManifest, evaluation_run: StageManifest, video: str,
                    cfg: PipelineConfig) -> str:
    """Point ``speakers/<speaker>`` at the new model; publish the evaluation to the Prefect UI."""
    store = open_store(cfg)
    entry = speakers.publish(store, speaker, bundle_run, evaluation_run, video, cfg.profile)
    report = evaluate.EvalReport.model_validate(evaluation_run.meta)
    where = {name: f"{cfg.store_url}/{part.key}" for name, part in evaluation_run.parts.items()}
    # the plot inline: the UI's markdown shows an image from a data URL, and a store's file
    # (a local path, an s3:// key) is no address a browser can open
    plot = base64.b64encode(fetch_part(store, evaluation_run, evaluate.PLOT, cfg.cache_dir).read_bytes()).decode()
    create_markdown_artifact(
        key=f"evaluation-{speaker}", description=f"held-out evaluation of {speaker}",
        markdown=f"## {speaker}: held-out evaluation\n\n{report.markdown()}\n\n"
                 f"![per-frame curves](data:image/png;base64,{plot})\n\n"
                 f"- side-by-side video ({' / '.join(evaluate.VIDEO_PANELS)}): `{where[evaluate.VIDEO]}`\n"
                 f"- per-frame curves: `{where[evaluate.PLOT]}` (data: `{where[evaluate.CURVES_JSON]}`)\n"
                 f"- model bundle: `{cfg.store_url}/stages/{train_deform.STAGE}/{bundle_run.key}/`\n"
                 f"- static fit still (render / truth): `{cfg.store_url}/{_static_still(store, bundle_run)}`\n")
    return speakers.pointer_key(entry.speaker)


def _static_still(store, bundle_run: StageManifest) -> str:
    static = find_stage(store, static_fit.STAGE, bundle_run.meta["bundle"]["sources"]["static"])
    return static.parts[static_fit.HELDOUT].key if static else "(missing)"


# Where the CLI runs the flow in its own process, it shows each training stage as a live bar;
# a worker has no terminal and leaves this None. A process-wide hook, not a context variable:
# Prefect may run a task in another thread than the one that started the flow.
StageDisplay = Callable[[str, int, Optional[int], dict], None]
_display: StageDisplay | None = None


@contextmanager
def progress_shown_by(display: StageDisplay) -> Iterator[None]:
    """Also send every long stage's progress ``(stage, done, total, info)`` in this process to ``display``."""
    global _display
    _display = display
    try:
        yield
    finally:
        _display = None


def _progress_logger(stage: str, every_s: float = 30.0):
    """Progress of a long task: a Prefect progress artifact and a log line every ``every_s`` seconds,
    and every step to the local display if there is one."""
    import time

    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"{stage} progress")
    last = [0.0]

    def report(done: int, total: int | None, info: dict | None = None) -> None:
        if _display is not None:
            _display(stage, done, total, info or {})
        now = time.monotonic()
        if now - last[0] >= every_s or done == total:
            last[0] = now
            details = ", ".join(f"{k} {v:.4g}" for k, v in (info or {}).items())
            logger.info("%s: step %d/%s %s", stage, done, total, details)
            if total:
                update_progress_artifact(artifact, 100.0 * done / total)

    return report
