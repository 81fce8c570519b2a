"""nightly-dubbing: every job waiting in the store's inbox becomes its own run of ``dub``.

Jobs are ``jobs/inbox/<id>.json`` files ({"speaker": ..., "audio": s3:// URL or store key,
"profile": ...}). Each is queued as one run of the ``dub`` deployment, which any worker of
the pool picks up and which holds its machine's GPU slot while it renders: 500 jobs spread
over the whole pool instead of waiting on one worker. The run records the job's outcome
(``jobs/done/`` or ``jobs/failed/``, with the reason).

Exactly once comes from Prefect: a job's run is created with an idempotency key from the job's
id and content (flows/submit.py), so overlapping nightly runs queue it once. A job whose run
crashed (its worker died: the heartbeat automation marks it Crashed) has no outcome yet, so it
is queued again, as the next attempt, by the automation or by the next nightly run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.submit import submission_digest, prefect_api, submit_once, ui_link
from gstalker_core import jobs
from gstalker_core.config import config_content, load_config
from gstalker_core.errors import InputError
from gstalker_core.storage import open_store

DUB_DEPLOYMENT = "dub/dub"


@flow(name="nightly-dubbing", flow_run_name="nightly-dubbing-{profile}", log_prints=True)
def nightly_dubbing(profile: str = "preview", overrides: list[str] | None = None, config: dict | None = None,
                    max_jobs: int = 500, dub_deployment: str = DUB_DEPLOYMENT) -> dict[str, str]:
    """Queue every pending inbox job; returns {job id: its dub run's name, or "failed"}. A job's
    own ``profile`` picks its profile; ``overrides`` and ``config`` apply to every job;
    ``dub_deployment`` names the deployment that renders (flow/deployment)."""
    logger = get_run_logger()
    store = open_store(load_config(profile, config, overrides))
    queued: dict[str, str] = {}
    rows = []
    with prefect_api() as client:
        for job_id in jobs.pending(store)[:max_jobs]:
            try:
                job = jobs.read_job(store, job_id)
                content = config_content(load_config(job.profile, config, overrides))
            except InputError as err:  # a bad job file fails that job, not the night
                jobs.finish(store, job_id, {}, "failed", "nightly-dubbing", reason=f"{err.problem} (fix: {err.fix})")
                queued[job_id] = "failed"
                rows.append(f"| {job_id} | failed | {err.problem} |")
                continue
            sub = submit_once(client, dub_deployment,
                              dict(speaker=job.speaker, audio=job.audio, profile=job.profile, config=content,
                                   job_id=job_id),
                              "dub-" + submission_digest(job_id, job.model_dump(), content),
                              tags=[f"speaker:{job.speaker}", f"job:{job_id}"],
                              # read after the run's state: a run records the outcome before it fails
                              settled=lambda: jobs.outcome(store, job_id) is not None)
            queued[job_id] = sub.run.name
            rows.append(f"| {job_id} | {'queued' if sub.created else 'already queued'} | [{sub.run.name}]({ui_link(sub.run)}) |")
            logger.info("job %s: %s %s", job_id, "queued as" if sub.created else "already queued as", sub.run.name)
    create_markdown_artifact(
        key="nightly-dubbing", description="jobs queued by this run",
        markdown="| job | status | dub run |\n|---|---|---|\n" + "\n".join(rows) if rows else "no jobs waiting")
    return queued
