"""Prefect flows chaining the stage tasks, and the `gstalker` CLI."""

# Seconds between a flow run's heartbeats, everywhere our flows run: prefect.yaml's
# deployments, the Kubernetes job template and the `gstalker` command. Prefect's minimum
# (its default is 180 s); the crash automation (flows/automations.py) waits a few of them.
HEARTBEAT_FREQUENCY_S = 30
