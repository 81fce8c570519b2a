"""One slot per GPU of the machine a task runs on, and the slot's own GPU.

A tag concurrency limit (`gpu`) counts task runs across the whole server: with two one-GPU
boxes and a limit of 1, one box would sit idle. So a GPU stage takes a slot of a Prefect
global concurrency limit named after its host, ``gpu-<hostname>``, sized to that host's GPUs
and created by the first GPU task that runs there. ``GSTALKER_GPUS=0`` turns it off where
the process owns its GPUs already (a Kubernetes pod given ``nvidia.com/gpu``): there each
pod is its own host and would leave one limit per flow run on the server.

The Prefect limit counts slots but names no GPU, so inside it a stage claims one GPU index of
its host with an exclusive lock file (``$TMPDIR/gstalker-gpu-<index>.lock``): N stages on an
N-GPU host run on N different GPUs, and the kernel drops a dead process's lock at once.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import get_current_settings

from gstalker_core.errors import ConfigError

# Slots are leases the holder renews every 3/4 of this; a dead machine's slots come back
# this long after it died, instead of Prefect's default 300 s.
LEASE_S = 60.0


def host_gpus() -> int:
    """GPUs on this machine: GSTALKER_GPUS, else what CUDA sees, at least 1 (a CPU box runs
    one GPU stage at a time); 0 means no host limit."""
    raw = os.environ.get("GSTALKER_GPUS", "").strip()
    if raw:
        if not raw.isdigit():
            raise ConfigError(f"GSTALKER_GPUS={raw!r} is not a whole number",
                              "set it to the number of GPUs on this machine (e.g. GSTALKER_GPUS=2), 0 for no "
                              "host limit, or unset it to count them with torch.cuda.device_count()")
        return int(raw)
    import torch

    return max(1, torch.cuda.device_count())


def limit_name() -> str:
    return f"gpu-{socket.gethostname().lower()}"


@contextmanager
def claim_gpu(gpus: int, poll_s: float = 0.5) -> Iterator[int]:
    """The index of a GPU of this host that no other process holds, held for the block."""
    folder = Path(tempfile.gettempdir())
    while True:
        for index in range(gpus):
            handle = open(folder / f"gstalker-gpu-{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)  # every GPU taken by a process outside Prefect's count (a local run)


@contextmanager
def gpu_slot() -> Iterator[int]:
    """Hold one of this host's GPU slots for the block; yields the GPU index it stands for.
    Waits while all are taken."""
    gpus = host_gpus()
    if gpus == 0 or not get_current_settings().api.url:
        # Without PREFECT_API_URL each `gstalker` process starts a temporary server over the
        # shared ~/.prefect database, and no lease reaper runs there: a slot held by a killed
        # local run would never come back and every later local run would wait forever. A
        # local run has no workers to share the GPU with, so it takes no slot. With
        # GSTALKER_GPUS=0 the pod's own GPU is its first.
        yield 0
        return
    name = limit_name()
    with get_client(sync_client=True) as client:
        try:  # the worker's own GPU count is the truth: set GSTALKER_GPUS to change the limit
            client.upsert_global_concurrency_limit_by_name(name, gpus)
        except ObjectAlreadyExists:
            pass  # another task on this host created it between our read and our create
    # strict: never run unlimited if the limit vanished; a failed lease renewal only logs,
    # it must not abort hours of training.
    with concurrency(name, occupy=1, lease_duration=LEASE_S, strict=True, raise_on_lease_renewal_failure=False):
        with claim_gpu(gpus) as index:
            yield index
