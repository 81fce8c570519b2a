"""The train-speaker flow and the per-host GPU limit under Prefect's test harness (a real local API, offline)."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.train_speaker import train_speaker
from gstalker_core.errors import ConfigError, InputError
from tasks.gpu import gpu_slot, host_gpus, limit_name


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_states(flow_state, timeout_s: float = 20.0) -> dict[str, str]:
    """Final task-run states; Prefect 3 records them through events, so the API may lag a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
        # a run whose first state the server has not written yet (its event recorder retries
        # when SQLite is busy) has no state: not final
        states = {run.name.split("-tiny")[0]: run.state.name if run.state else None for run in runs}
        if all(run.state and run.state.is_final() for run in runs) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_second_run_is_cached_and_a_config_change_reruns_only_its_stage(prefect_api, clip, tmp_path):
    video = str(clip("plain.mp4", seconds=2.0))
    home = [f"home={tmp_path / 'home'}"]
    first = train_speaker(video, "tiny-speaker", profile="tiny", overrides=home, return_state=True)
    keys = first.result()
    assert set(keys) >= {"ingest", "track", "audio"}
    assert _task_states(first) == {"ingest": "Completed", "track-and-parse": "Completed", "audio-features": "Completed", "fit-static": "Completed", "train-deformation": "Completed", "evaluate": "Completed", "publish": "Completed"}
    # the evaluation artifact shows the per-frame plot inline: a data URL, which the UI's markdown renders
    with get_client(sync_client=True) as client:
        artifact, = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["evaluation-tiny-speaker"])), limit=1)
    assert "![per-frame curves](data:image/png;base64,iVBORw0KGgo" in artifact.data

    second = train_speaker(video, "tiny-speaker", profile="tiny", overrides=home, return_state=True)
    assert second.result() == keys
    assert _task_states(second) == {"ingest": "Cached", "track-and-parse": "Cached", "audio-features": "Cached", "fit-static": "Cached", "train-deformation": "Cached", "evaluate": "Cached", "publish": "Completed"}

    changed = train_speaker(video, "tiny-speaker", profile="tiny", overrides=[*home, "audio.n_features=40"],
                            return_state=True)
    assert changed.result()["ingest"] == keys["ingest"] and changed.result()["audio"] != keys["audio"]
    assert _task_states(changed) == {"ingest": "Cached", "track-and-parse": "Cached", "audio-features": "Completed", "fit-static": "Cached", "train-deformation": "Completed", "evaluate": "Completed", "publish": "Completed"}


def test_bad_speaker_name_fails_the_flow_with_the_reason(prefect_api, clip, tmp_path):
    state = train_speaker(str(clip("plain.mp4", seconds=2.0)), "../escape", profile="tiny",
                          overrides=[f"home={tmp_path}"], return_state=True)
    assert state.is_failed()
    with pytest.raises(InputError, match="invalid speaker name"):
        state.result()


def _most_gpu_tasks_at_once(n_tasks: int = 2, wait_s: float = 3.0) -> int:
    """Run ``n_tasks`` concurrent tasks, each holding a GPU slot until all are inside or
    ``wait_s`` passed; returns how many held a slot at the same time."""
    inside, most = 0, 0
    changed = threading.Condition()

    @task
    def on_gpu() -> None:
        nonlocal inside, most
        with gpu_slot(), changed:
            inside += 1
            most = max(most, inside)
            changed.notify_all()
            changed.wait_for(lambda: inside == n_tasks, timeout=wait_s)
            inside -= 1

    @flow
    def gpu_work() -> None:
        for future in [on_gpu.submit() for _ in range(n_tasks)]:
            future.result()

    gpu_work()
    return most


def test_gpu_tasks_on_one_host_share_its_gpu_limit(prefect_api, monkeypatch):
    monkeypatch.setenv("GSTALKER_GPUS", "1")
    assert _most_gpu_tasks_at_once() == 1  # one GPU: the second task waited for the first
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit_name()).limit == 1  # created on demand

    monkeypatch.setenv("GSTALKER_GPUS", "2")  # the worker's GPU count is the truth: the limit follows it
    # both may run at once: waiting long costs nothing when they do (the wait ends as the second
    # enters), and a slow task start on a busy machine must not read as the limit holding it back
    assert _most_gpu_tasks_at_once(wait_s=30.0) == 2
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit_name()).limit == 2


def test_gpu_count_comes_from_the_environment_or_cuda(monkeypatch):
    monkeypatch.setenv("GSTALKER_GPUS", "3")
    assert host_gpus() == 3
    monkeypatch.delenv("GSTALKER_GPUS")
    assert host_gpus() >= 1  # a CPU-only machine counts as one
    monkeypatch.setenv("GSTALKER_GPUS", "0")  # a Kubernetes pod that owns its GPU: no host limit
    assert host_gpus() == 0
    monkeypatch.setenv("GSTALKER_GPUS", "two")
    with pytest.raises(ConfigError, match="GSTALKER_GPUS"):
        host_gpus()


# -- retries: only what can heal -------------------------------------------------------------

def test_transient_means_storage_and_network_never_a_deterministic_failure():
    import botocore.exceptions as boto
    import httpx
    import torch

    from gstalker_core.errors import StorageError
    from tasks.stages import is_transient

    for healing in (StorageError("store unreachable", "retry"), ConnectionResetError(), TimeoutError(),
                    boto.EndpointConnectionError(endpoint_url="http://s3"), boto.ReadTimeoutError(endpoint_url="x"),
                    boto.ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"),
                    httpx.ConnectError("prefect api gone")):
        assert is_transient(healing), healing
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = boto.ConnectionClosedError(endpoint_url="http://s3")
    assert is_transient(wrapped)  # a library's wrapper around a connection error
    for deterministic in (ValueError("bad shape"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                          torch.OutOfMemoryError("CUDA out of memory"), MemoryError(), KeyError("x"),
                          InputError("bad video", "fix it"), ConfigError("bad field", "fix it"),
                          boto.ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")):
        assert not is_transient(deterministic), deterministic


@pytest.mark.parametrize("failure, attempts", [(ValueError, 1), (ConnectionResetError, 3)])
def test_a_stage_retries_a_transient_failure_and_fails_a_deterministic_one_at_once(prefect_api, failure, attempts):
    from tasks.stages import STAGE_TASK

    calls = []

    @task(**{**STAGE_TASK, "retry_delay_seconds": 0, "persist_result": False})
    def stage() -> None:
        calls.append(1)
        raise failure("boom")

    @flow
    def pipeline() -> None:
        stage()

    state = pipeline(return_state=True)
    assert state.is_failed()
    assert len(calls) == attempts


# -- the first run on a machine that never ran Prefect ---------------------------------------

def test_first_train_on_an_empty_prefect_home_succeeds(clip, tmp_path):
    """`gstalker train` with no PREFECT_API_URL starts Prefect's temporary server, which must
    first create its database: with Prefect's 20 s default that failed 3 runs out of 4 here."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GSTALKER_"))}
    env.update(PREFECT_HOME=str(tmp_path / "never-ran-prefect"), GSTALKER_HOME=str(tmp_path / "home"),
               GSTALKER_GPUS="0", DO_NOT_TRACK="1")
    video = str(clip("plain.mp4", seconds=2.0))
    gstalker = str(Path(sys.executable).parent / "gstalker")
    out = subprocess.run([gstalker, "train", video, "--speaker", "first-run", "--profile", "tiny"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "evaluate" in out.stdout
    # it leads with the evaluation it made, and says where its video and plot are
    assert out.stdout.index("held-out evaluation") < out.stdout.index("content key")
    for line in ("side-by-side video", "per-frame curves"):
        where = next(x for x in out.stdout.splitlines() if x.startswith(line)).rsplit(": ", 1)[1]
        assert Path(where).is_file(), where
    assert (tmp_path / "home" / "store" / "speakers" / "first-run" / "model.json").is_file()


def test_an_unreachable_prefect_server_is_an_error_with_its_fix(clip, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "GSTALKER_HOME": str(tmp_path)}
    gstalker = str(Path(sys.executable).parent / "gstalker")
    for args in (["train", str(clip("plain.mp4", seconds=2.0)), "--speaker", "x", "--profile", "tiny"],
                 ["submit", str(clip("plain.mp4", seconds=2.0)), "--speaker", "x", "--profile", "tiny"],
                 ["status"], ["setup"]):
        out = subprocess.run([gstalker, *args], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        assert "cannot reach the Prefect server at http://127.0.0.1:9/api" in out.stderr
        assert "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "store" / "uploads").exists()  # submit checked the server before uploading


def test_a_gpu_asked_for_on_a_machine_without_one_is_an_error_before_any_stage(clip, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: runtime.device=cuda is valid here")
    env = {**os.environ, "GSTALKER_HOME": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    gstalker = str(Path(sys.executable).parent / "gstalker")
    for args in (["train", str(clip("plain.mp4", seconds=2.0)), "--speaker", "x"], ["dub", "any.wav", "--speaker", "x"]):
        out = subprocess.run([gstalker, *args, "--profile", "tiny", "--set", "runtime.device=cuda:1"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        assert "runtime.device is 'cuda:1' but this machine's torch sees no CUDA GPU" in out.stderr
        assert "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "store").exists()  # nothing ran, nothing was stored
