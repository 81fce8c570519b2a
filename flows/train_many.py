"""train-many: one train-speaker flow run per video, spread over the work pool's workers.

Each speaker is its own flow run of the ``train-speaker`` deployment, so workers on many
machines pick them up in parallel; each machine's GPU limit (tasks/gpu.py) keeps GPU stages to
the GPUs there are while CPU stages (ingest, tracking) of other speakers proceed. One
speaker failing fails that speaker's run only; this flow reports each outcome.
"""

from __future__ import annotations

import asyncio

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from pydantic import BaseModel

from flows.submit import TRAIN_DEPLOYMENT
from gstalker_core.naming import validate_speaker


class SpeakerVideo(BaseModel):
    video: str  # s3:// URL or a path every worker can read
    speaker: str


@flow(name="train-many", log_prints=True)
async def train_many(videos: list[SpeakerVideo], profile: str = "preview", overrides: list[str] | None = None,
                     timeout_s: float = 6 * 3600) -> dict[str, str]:
    """Returns {speaker: final state name}."""
    logger = get_run_logger()
    for item in videos:
        validate_speaker(item.speaker)

    async def one(item: SpeakerVideo):
        return item.speaker, await run_deployment(
            TRAIN_DEPLOYMENT, parameters=dict(video=item.video, speaker=item.speaker, profile=profile,
                                              overrides=overrides or []),
            timeout=timeout_s, as_subflow=True, tags=[f"speaker:{item.speaker}"])

    runs = await asyncio.gather(*(one(item) for item in videos))
    outcome = {speaker: run.state.name if run.state else "unknown" for speaker, run in runs}
    for speaker, state in outcome.items():
        logger.info("%s: %s", speaker, state)
    await create_markdown_artifact(key="train-many", markdown="| speaker | state |\n|---|---|\n" + "\n".join(
        f"| {s} | {state} |" for s, state in outcome.items()))
    return outcome
