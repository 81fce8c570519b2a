"""nightly-dubbing: render every job waiting in the store's inbox, exactly once.

Jobs are ``jobs/inbox/<id>.json`` files ({"speaker": ..., "audio": s3:// URL or store key}).
Each is claimed with a lease (see gstalker_core/jobs.py), so overlapping runs and dead
workers never lose a job nor render it twice; each ends in ``jobs/done/`` or
``jobs/failed/`` with its reason. A summary table is published as a Prefect artifact.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.dub import render_dub
from gstalker_core import jobs
from gstalker_core.config import load_config
from gstalker_core.errors import GstalkerError
from gstalker_core.storage import open_store


@flow(name="nightly-dubbing", flow_run_name="nightly-dubbing-{profile}", log_prints=True)
def nightly_dubbing(profile: str = "preview", overrides: list[str] | None = None, lease_s: float = 300.0,
                    max_jobs: int = 500) -> dict[str, str]:
    """Returns {job id: "done" | "failed"} for the jobs this run handled."""
    logger = get_run_logger()
    cfg = load_config(profile, None, overrides)
    store = open_store(cfg)
    owner = f"flow-run-{flow_run.get_id() or 'local'}"
    handled: dict[str, str] = {}
    rows = []
    for job_id in jobs.inbox(store)[:max_jobs]:
        lease = jobs.claim(store, job_id, owner, lease_s)
        if lease is None:
            continue  # another run holds it, or it is finished
        try:
            job = jobs.read_job(store, job_id)
            key = render_dub.with_options(task_run_name=f"dub-{job.speaker}-{job_id}")(job.speaker, job.audio, cfg)
        except GstalkerError as err:
            result = lease.finish({"job_id": job_id}, "failed", reason=f"{err.problem} (fix: {err.fix})")
            output = err.problem
        except Exception as err:  # noqa: BLE001 - an unexpected failure fails this job, not the night
            result = lease.finish({"job_id": job_id}, "failed", reason=f"{type(err).__name__}: {err}")
            output = str(err)
        else:
            result = lease.finish(job.model_dump(), "done", output=key)
            output = key
        if result is None:
            logger.warning("job %s: lease lost to another run; its outcome there counts", job_id)
            continue
        handled[job_id] = result.status
        rows.append(f"| {job_id} | {result.status} | {output} |")
        logger.info("job %s: %s (%s)", job_id, result.status, output)
    create_markdown_artifact(
        key="nightly-dubbing", description="jobs handled by this run",
        markdown="| job | status | output / reason |\n|---|---|---|\n" + "\n".join(rows) if rows else "no jobs waiting")
    return handled
