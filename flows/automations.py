"""Dead workers, handled by Prefect itself: the automations ``gstalker setup`` installs.

1. *Crash runs whose heartbeats stopped.* Flow runs send a heartbeat every
   ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (prefect.yaml sets it for every deployment,
   the ``gstalker`` command for its own runs).
   A proactive trigger fires for a run that sent one and then neither another nor a terminal
   state within ``heartbeat_timeout_s``: its worker or machine died, and the run is set Crashed.
2. *Resubmit crashed submissions.* A train-speaker or dub run that crashed starts the
   ``resubmit-crashed`` deployment (flows/recover.py), which queues the submission's next
   attempt, at most ``max_attempts`` runs in all; the new run skips every finished stage.

Installing is idempotent: an automation of the same name is updated in place.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound

from flows import HEARTBEAT_FREQUENCY_S
from gstalker_core.errors import ConfigError

CRASH_ZOMBIES = "gstalker: crash runs without heartbeats"
RESUBMIT_CRASHED = "gstalker: resubmit crashed runs"
RESUBMIT_DEPLOYMENT = "resubmit-crashed/resubmit-crashed"
# Our flows only, whichever deployment or pool runs them: another team's flows on the same
# server may beat at Prefect's default 180 s, and a 90 s timeout would crash them alive.
WATCHED_FLOWS = ("train-speaker", "dub", "nightly-dubbing", "train-many", "resubmit-crashed")
RESUBMITTED_FLOWS = ("train-speaker", "dub")
_TERMINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def _registered_id(read, name: str):
    try:
        return read(name).id
    except ObjectNotFound:
        raise ConfigError(f"{name!r} is not registered on the Prefect server",
                          "run `prefect deploy --all` from the repository root first, then `gstalker setup`") from None


def automations(client: SyncPrefectClient, heartbeat_timeout_s: float, max_attempts: int) -> list[AutomationCore]:
    if heartbeat_timeout_s < 2 * HEARTBEAT_FREQUENCY_S:
        raise ConfigError(f"a heartbeat timeout of {heartbeat_timeout_s:g} s would crash live runs",
                          f"give at least {2 * HEARTBEAT_FREQUENCY_S} s: runs beat every {HEARTBEAT_FREQUENCY_S} s")
    if max_attempts < 1:
        raise ConfigError(f"max attempts {max_attempts} is below 1", "give 1 (never resubmit) or more")
    resubmit = _registered_id(client.read_deployment_by_name, RESUBMIT_DEPLOYMENT)
    flow_ids = {name: f"prefect.flow.{_registered_id(client.read_flow_by_name, name)}" for name in WATCHED_FLOWS}
    crash = AutomationCore(
        name=CRASH_ZOMBIES,
        description="A flow run that sent a heartbeat, then nothing: its worker died. Set it Crashed.",
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.id": list(flow_ids.values())}),
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in _TERMINAL)},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=heartbeat_timeout_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, force=True,
                                    message=f"no heartbeat for {heartbeat_timeout_s:g} s: its worker died")])
    again = AutomationCore(
        name=RESUBMIT_CRASHED,
        description=f"A crashed train-speaker or dub run: queue its next attempt (at most {max_attempts} in all).",
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.id": [flow_ids[n] for n in RESUBMITTED_FLOWS]}),
            expect={"prefect.flow-run.Crashed"}, posture=Posture.Reactive, threshold=1),
        actions=[RunDeployment(source="selected", deployment_id=resubmit,
                               parameters={"flow_run": "{{ event.resource.id }}", "max_attempts": max_attempts})])
    return [crash, again]


def install(client: SyncPrefectClient, heartbeat_timeout_s: float = 90.0, max_attempts: int = 3) -> list[str]:
    """Create or update gstalker's automations; returns what was done, a line each."""
    done = []
    for automation in automations(client, heartbeat_timeout_s, max_attempts):
        existing = client.read_automations_by_name(automation.name)
        if existing:
            client.update_automation(existing[0].id, automation)
            for extra in existing[1:]:  # duplicates made by hand
                client.delete_automation(extra.id)
            done.append(f"updated automation {automation.name!r}")
        else:
            client.create_automation(automation)
            done.append(f"created automation {automation.name!r}")
    return done
