"""resubmit-crashed: started by the automation of a crashed run (flows/automations.py)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.submit import resubmit_crashed


@flow(name="resubmit-crashed", log_prints=True)
def resubmit_crashed_run(flow_run: str, max_attempts: int = 3) -> str:
    """Queue the next attempt of the crashed run ``flow_run`` (an id, or the event's resource id
    ``prefect.flow-run.<id>``) unless it was replaced already or used up its attempts."""
    said = resubmit_crashed(flow_run.removeprefix("prefect.flow-run."), max_attempts)
    get_run_logger().info(said)
    return said
