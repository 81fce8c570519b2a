"""Production path, offline: a real Prefect server (SQLite), real process workers, deployments
applied from prefect.yaml and the automations of `gstalker setup`, `gstalker submit` and nightly
dubbing over a SeaweedFS store (which also holds Prefect's task results)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

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
    """The running stack: the environment every command gets, the logs folder, the workers."""

    def __init__(self, env: dict[str, str], logs: Path, root: Path):
        self.env, self.logs, self.root = env, logs, root
        self.workers: dict[str, subprocess.Popen] = {}

    def start_worker(self, name: str) -> None:
        """A process worker with a home of its own (PREFECT_HOME, GSTALKER_HOME): like a worker on
        another machine, it sees only what lives on the server and in the S3 store. One flow run
        at a time, so runs queued together spread over the workers."""
        homes = {"PREFECT_HOME": str(self.root / name / "prefect"), "GSTALKER_HOME": str(self.root / name / "home")}
        (self.root / name).mkdir(exist_ok=True)
        self.workers[name] = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "gstalker", "--name", name, "--limit", "1"],
            env={**self.env, **homes, "PREFECT_LOGGING_LEVEL": "INFO"}, cwd=REPO,
            stdout=open(self.logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and every flow-run process it started, as if its machine died.
        Flow-run processes lead sessions of their own, so killing the worker's group is not enough."""
        worker = self.workers.pop(name)
        groups = set()
        for pid in [worker.pid, *_descendants(worker.pid)]:
            with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                groups.add(os.getpgid(pid))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        worker.wait(30)

    def ran(self, name: str) -> str:
        """The worker's log: every flow run it picked up is named there."""
        return (self.logs / f"{name}.log").read_text(errors="replace")


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
           "GSTALKER_REPO": str(REPO), "GSTALKER_HOME": str(root / "home"), "GSTALKER_GPUS": "2",
           "GSTALKER_STORE__URL": s3_server.url(bucket, "prod"), "GSTALKER_STORE__ENDPOINT_URL": s3_server.endpoint_url,
           "GSTALKER_STORE__ADDRESSING_STYLE": "path"}
    logs = root / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    stack = Production(env, logs, root)
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
        # a run is Crashed 60 s after its last heartbeat (they come every 30 s)
        run(str(BIN / "gstalker"), "setup", "--heartbeat-timeout", "60", "--max-attempts", "3")
        stack.start_worker("worker-a")
        yield stack
    finally:
        procs = [*((w, signal.SIGINT) for w in stack.workers.values()), (server, signal.SIGTERM)]
        for proc, sig in procs:  # the worker ignores SIGTERM
            if proc.poll() is None:
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


def _runs_tagged(env, tag: str):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
    return sorted(runs, key=lambda r: r.created)


def _store(env, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return open_store(load_config("tiny", environ=env))


def _gstalker(env, *args) -> str:
    out = subprocess.run([str(BIN / "gstalker"), *args], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _audio_feature_sizes(store) -> set[int]:
    """n_features of every audio stage in the store (the config each was made with)."""
    sizes = set()
    for key in store.list("stages/audio/"):
        if key.endswith("/MANIFEST.json"):
            sizes.add(json.loads(store.get_bytes(key))["meta"]["spec"]["n_features"])
    return sizes


def test_submit_sends_the_config_by_content_and_runs_to_completed(production, clip, tmp_path, monkeypatch):
    env = production.env
    video = str(clip("submit3s.mp4", seconds=3.0))
    config = tmp_path / "speaker.yaml"
    config.write_text("audio:\n  n_features: 24\n")  # the tiny profile has 32
    out = _gstalker(env, "submit", video, "--speaker", "queued-speaker", "--profile", "tiny", "--config", str(config))
    run_id = out.split("flow run ")[1].split()[0]
    config.unlink()  # the worker never reads the file: the submission carried its content
    assert _wait(env, run_id) == "Completed", production.ran("worker-a")[-3000:]
    store = _store(env, monkeypatch)
    assert _audio_feature_sizes(store) == {24}
    assert store.exists("speakers/queued-speaker/model.json")
    assert any(k.startswith("stages/evaluate/") for k in store.list("stages/evaluate/"))
    assert store.list("prefect-results/")  # Prefect's task results live in the bucket, beside the stages

    config.write_text("audio:\n  n_features: 24\n")  # the same content again: the same submission
    again = _gstalker(env, "submit", video, "--speaker", "queued-speaker", "--profile", "tiny", "--config", str(config))
    assert "already submitted" in again and run_id in again
    config.write_text("audio:\n  n_features: 20\n")  # an edit is a new submission
    edited = _gstalker(env, "submit", video, "--speaker", "edited-speaker", "--profile", "tiny", "--config", str(config))
    assert "already submitted" not in edited
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        client.set_flow_run_state(UUID(edited.split("flow run ")[1].split()[0]), _cancelled(), force=True)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation-queued-speaker"])))
    assert artifacts and "| gstalker |" in artifacts[0].data
    assert "Completed" in _gstalker(env, "status", run_id)


def _cancelled():
    from prefect.states import Cancelled

    return Cancelled(message="not needed by the test")


def _task_states(env, run_id: str, speaker: str) -> dict[str, str]:
    """{stage: state name} of a flow run's task runs, e.g. {"ingest": "Completed", "fit-static": "Running"}."""
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])))
    return {run.name.removesuffix(f"-{speaker}"): run.state.name for run in runs if run.state}


def test_a_dead_workers_run_is_crashed_and_resubmitted_by_prefect_and_another_worker_reuses_its_stages(
        production, clip):
    """No operator: the heartbeat automation marks the run Crashed, the resubmit automation
    queues the next attempt, and a worker with another home finishes it, its finished stages
    Cached from the results the dead worker left in S3."""
    env = production.env
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
    production.kill_worker("worker-a")
    finished = sorted(stage for stage, state in _task_states(env, first, speaker).items() if state == "Completed")
    print(f"\nworker killed with {first} at {states}")
    again = submit()  # the run still looks alive until its heartbeats are missed
    assert "already submitted" in again and first in again and "(Running)" in again

    killed_at = time.monotonic()
    assert _wait(env, first, timeout=240) == "Crashed"
    print(f"Crashed by the heartbeat automation {time.monotonic() - killed_at:.0f} s after the kill")
    production.start_worker("worker-b")  # another machine: its own PREFECT_HOME and GSTALKER_HOME
    (submission,) = [t for t in _runs_tagged(env, f"speaker:{speaker}")[0].tags if t.startswith("submission:")]
    deadline = time.monotonic() + 300
    while len(runs := _runs_tagged(env, submission)) < 2:  # the resubmit-crashed run makes attempt 2
        assert time.monotonic() < deadline, production.ran("worker-b")[-3000:]
        time.sleep(2)
    second = str(runs[-1].id)
    assert _wait(env, second) == "Completed", production.ran("worker-b")[-3000:]
    assert second in production.ran("worker-b")

    deadline = time.monotonic() + 20  # task-run states arrive through events: allow a moment
    while not all((resumed := _task_states(env, second, speaker)).get(stage) == "Cached" for stage in finished):
        assert time.monotonic() < deadline, f"finished before the kill: {finished}; resubmitted run: {resumed}"
        time.sleep(0.5)
    print(f"skipped (Cached) after the resubmission: {finished}; ran: "
          f"{sorted(s for s, state in resumed.items() if state != 'Cached')}")
    assert finished and resumed["publish"] == "Completed"
    assert len(_runs_tagged(env, submission)) == 2  # resubmitted once, not once per automation firing
    assert "already submitted" in submit()  # a completed run counts again


def test_nightly_jobs_become_dub_runs_that_both_workers_render_once_each(production, tmp_path, monkeypatch):
    env = production.env
    store = _store(env, monkeypatch)
    assert store.exists("speakers/queued-speaker/model.json"), "runs after the submit test"
    if "worker-b" not in production.workers:  # the crash test left worker-b running; a second worker beside it
        production.start_worker("worker-b")
    production.start_worker("worker-c")
    good = [f"night-{i}" for i in range(4)]
    for i, job_id in enumerate(good):
        wav = tmp_path / f"speech{i}.wav"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"sine=frequency={200 + 50 * i}:duration={1.0 + 0.2 * i}", str(wav)], check=True)
        store.put_file(f"uploads/speech{i}.wav", wav)
        jobs.submit(store, job_id, jobs.DubJob(speaker="queued-speaker", audio=f"uploads/speech{i}.wav", profile="tiny"))
    store.put_bytes("jobs/inbox/night-nobody.json",
                    b'{"speaker": "nobody-here", "audio": "uploads/speech0.wav", "profile": "tiny"}')
    store.put_bytes("jobs/inbox/night-garbled.json", b"{not json")
    ids = []
    for _ in range(2):  # two overlapping nightly runs over the same inbox
        out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "nightly-dubbing/nightly-dubbing",
                              "--param", "profile=tiny"], env=env, cwd=REPO, capture_output=True, text=True, check=True)
        ids.append(out.stdout.split("UUID: ")[1].split()[0])
    assert [_wait(env, run_id) for run_id in ids] == ["Completed", "Completed"]

    dub_runs = {job_id: _runs_tagged(env, f"job:{job_id}") for job_id in [*good, "night-nobody"]}
    assert all(len(runs) == 1 for runs in dub_runs.values()), dub_runs  # queued once, by two nightly runs
    finals = {job_id: _wait(env, str(runs[0].id)) for job_id, runs in dub_runs.items()}
    assert finals == {**{j: "Completed" for j in good}, "night-nobody": "Failed"}
    outcomes = {job_id: jobs.outcome(store, job_id) for job_id in [*good, "night-nobody", "night-garbled"]}
    assert all(outcomes[j].status == "done" and outcomes[j].output.endswith(".mp4") for j in good)
    assert outcomes["night-nobody"].status == "failed" and "nobody-here" in outcomes["night-nobody"].reason
    assert outcomes["night-garbled"].status == "failed" and "invalid" in outcomes["night-garbled"].reason
    assert jobs.inbox(store) == []
    rendered_by = {name: [j for j in good if str(dub_runs[j][0].id) in production.ran(name)]
                   for name in ("worker-b", "worker-c")}
    print(f"\ndub runs per worker: {rendered_by}")
    assert all(rendered_by.values()), f"one worker rendered every job: {rendered_by}"
    assert sorted(j for js in rendered_by.values() for j in js) == good  # each job by one worker
