"""One Prefect task per pipeline stage.

Caching has two layers. The artifact store is the source of truth: every core stage
skips work whose content key is already published there, whichever worker did it.
On top, each task's Prefect cache key is that same content key (plus the store URL), so
the Prefect UI shows a skipped stage as ``Cached`` and does not even start it.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from gstalker_core import audio, ingest, tracking
from gstalker_core.config import PipelineConfig
from gstalker_core.errors import ConfigError, InputError
from gstalker_core.storage import StageManifest, StageRun, open_store


def stage_cache_key(key_of: Callable[..., str]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Prefect cache_key_fn: the stage's content key, scoped to the store it lives in."""

    wanted = set(inspect.signature(key_of).parameters)

    def cache_key(_ctx: TaskRunContext, params: dict[str, Any]) -> str:
        cfg: PipelineConfig = params["cfg"]
        store = hashlib.sha256(cfg.store_url.encode()).hexdigest()[:12]
        return f"{key_of(**{k: v for k, v in params.items() if k in wanted})}-{store}"

    return cache_key


def retry_transient(_task, _task_run, state) -> bool:
    """Retry storage/network hiccups; never retry the user's bad input or config."""
    try:
        state.result()
    except (InputError, ConfigError):
        return False
    except Exception:
        return True
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
