"""Production path, offline: a real Prefect server (SQLite), a real process worker, deployments
applied from prefect.yaml, `gstalker submit` and nightly dubbing over a SeaweedFS store."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gstalker_core import jobs
from gstalker_core.config import load_config
from gstalker_core.storage import open_store

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Production:
    """The running stack: the environment every command gets, the logs folder, the current worker."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.worker: subprocess.Popen | None = None

    def start_worker(self) -> None:
        self.worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gstalker", "--limit", "2"],
                                       env=self.env, cwd=REPO, stdout=open(self.logs / "worker.log", "ab"),
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def kill_worker(self) -> None:
        """SIGKILL the worker and every flow-run process it started, as if its machine died.
        Flow-run processes lead sessions of their own, so killing the worker's group is not enough."""
        groups = set()
        for pid in [self.worker.pid, *_descendants(self.worker.pid)]:
            with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                groups.add(os.getpgid(pid))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self.worker.wait(30)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="module")
def production(tmp_path_factory, s3_server):
    """Prefect server + deployments + one process worker, all pointed at a SeaweedFS bucket."""
    root = tmp_path_factory.mktemp("production")
    port = _port()
    bucket = s3_server.bucket("gstalker-prod")
    env = {**os.environ, **s3_server.env(),
           "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
           "GSTALKER_REPO": str(REPO), "GSTALKER_HOME": str(root / "home"),
           "GSTALKER_STORE__URL": s3_server.url(bucket, "prod"), "GSTALKER_STORE__ENDPOINT_URL": s3_server.endpoint_url,
           "GSTALKER_STORE__ADDRESSING_STYLE": "path"}
    logs = root / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    stack = Production(env, logs)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (logs / "server.log").read_text()[-2000:]
            time.sleep(1)
        run = lambda *args: subprocess.run(args, env=env, cwd=REPO, check=True, capture_output=True, text=True)  # noqa: E731
        run(str(BIN / "prefect"), "work-pool", "create", "gstalker", "--type", "process", "--overwrite")
        run(str(BIN / "prefect"), "deploy", "--all", "--no-prompt")
        stack.start_worker()
        yield stack
    finally:
        for proc, sig in ((stack.worker, signal.SIGINT), (server, signal.SIGTERM)):  # the worker ignores SIGTERM
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def _wait(env, run_id: str, timeout: float = 600) -> str:
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient

    deadline = time.monotonic() + timeout
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(UUID(run_id)).state
            if state and state.is_final():
                return state.name
            time.sleep(3)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


def _store(env, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return open_store(load_config("tiny", environ=env))


def _gstalker(env, *args) -> str:
    out = subprocess.run([str(BIN / "gstalker"), *args], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_submit_runs_to_completed_through_the_worker_and_resubmit_says_so(production, clip, monkeypatch):
    env, logs = production.env, production.logs
    video = str(clip("submit3s.mp4", seconds=3.0))
    out = _gstalker(env, "submit", video, "--speaker", "queued-speaker", "--profile", "tiny")
    run_id = out.split("flow run ")[1].split()[0]
    assert _wait(env, run_id) == "Completed", (logs / "worker.log").read_text()[-3000:]
    again = _gstalker(env, "submit", video, "--speaker", "queued-speaker", "--profile", "tiny")
    assert "already submitted" in again and run_id in again
    status = _gstalker(env, "status", run_id)
    assert "Completed" in status
    store = _store(env, monkeypatch)
    assert store.exists("speakers/queued-speaker/model.json")
    assert any(k.startswith("stages/evaluate/") for k in store.list("stages/evaluate/"))
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation-queued-speaker"])))
    assert artifacts and "| gstalker |" in artifacts[0].data


def test_two_overlapping_nightly_runs_render_each_job_once(production, tmp_path, monkeypatch):
    env, logs = production.env, production.logs
    store = _store(env, monkeypatch)
    assert store.exists("speakers/queued-speaker/model.json"), "runs after the submit test"
    for i, seconds in enumerate((1.0, 1.4)):
        wav = tmp_path / f"speech{i}.wav"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"sine=frequency={200 + 50 * i}:duration={seconds}", str(wav)], check=True)
        store.put_file(f"uploads/speech{i}.wav", wav)
        jobs.submit(store, f"night-{i}", jobs.DubJob(speaker="queued-speaker", audio=f"uploads/speech{i}.wav",
                                                     profile="tiny"))
    store.put_bytes("jobs/inbox/night-bad.json", b'{"speaker": "nobody-here", "audio": "uploads/speech0.wav"}')
    ids = []
    for _ in range(2):  # two overlapping runs over the same inbox
        out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "nightly-dubbing/nightly-dubbing",
                              "--param", "profile=tiny"], env=env, cwd=REPO, capture_output=True, text=True, check=True)
        ids.append(out.stdout.split("UUID: ")[1].split()[0])
    assert [_wait(env, run_id) for run_id in ids] == ["Completed", "Completed"], (logs / "worker.log").read_text()[-3000:]
    outcomes = {job_id: jobs.outcome(store, job_id) for job_id in ("night-0", "night-1", "night-bad")}
    assert outcomes["night-0"].status == outcomes["night-1"].status == "done"
    assert outcomes["night-bad"].status == "failed" and "nobody-here" in outcomes["night-bad"].reason
    assert jobs.inbox(store) == [] and store.list("jobs/claims/") == []
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        renders = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="dub-queued-speaker-night")))
    assert sorted(r.name for r in renders) == ["dub-queued-speaker-night-0", "dub-queued-speaker-night-1"]  # once each
    assert {outcomes["night-0"].owner, outcomes["night-1"].owner} <= {f"flow-run-{i}" for i in ids}


def _task_states(env, run_id: str, speaker: str) -> dict[str, str]:
    """{stage: state name} of a flow run's task runs, e.g. {"ingest": "Completed", "fit-static": "Running"}."""
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])))
    return {run.name.removesuffix(f"-{speaker}"): run.state.name for run in runs if run.state}


def test_worker_killed_mid_training_then_resubmitted_reuses_the_finished_stages(production, clip):
    env, logs = production.env, production.logs
    speaker = "killed-speaker"
    video = str(clip("killed3s.mp4", seconds=3.2))  # not the submit test's clip: nothing of it is in the store yet

    def submit() -> str:  # on one line: the CLI wraps at 80 columns
        return " ".join(_gstalker(env, "submit", video, "--speaker", speaker, "--profile", "tiny").split())

    first = submit().split("flow run ")[1].split()[0]
    deadline = time.monotonic() + 300
    while True:  # until a stage has finished and a later one is running
        states = _task_states(env, first, speaker)
        if "Completed" in states.values() and "Running" in states.values():
            break
        assert time.monotonic() < deadline and "publish" not in states, f"no kill point in {states}"
        time.sleep(0.3)
    production.kill_worker()
    finished = sorted(stage for stage, state in _task_states(env, first, speaker).items() if state == "Completed")
    print(f"\nworker killed with {first} at {states}")

    # Prefect cannot tell a dead worker from a slow one: the run stays Running, and a repeat
    # submission still points at it.
    again = submit()
    assert "already submitted" in again and first in again and "(Running)" in again
    assert "mark the run Crashed" in again
    # What an operator does (UI: the run's menu, Change state -> Crashed).
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Crashed

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        client.set_flow_run_state(UUID(first), Crashed(message="worker machine lost"), force=True)
    production.start_worker()
    out = submit()
    assert f"replacing {first} (Crashed)" in out, out
    second = out.split("flow run ")[1].split(",")[0]
    assert _wait(env, second) == "Completed", (logs / "worker.log").read_text()[-3000:]

    deadline = time.monotonic() + 20  # task-run states arrive through events: allow a moment
    while not all((resumed := _task_states(env, second, speaker)).get(stage) == "Cached" for stage in finished):
        assert time.monotonic() < deadline, f"finished before the kill: {finished}; resubmitted run: {resumed}"
        time.sleep(0.5)
    print(f"skipped (Cached) after the resubmission: {finished}; ran: "
          f"{sorted(s for s, state in resumed.items() if state != 'Cached')}")
    assert finished and resumed["publish"] == "Completed"
    assert "already submitted" in submit()  # a completed run counts again
