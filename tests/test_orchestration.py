"""Production path, offline: a real Prefect server (SQLite), a real process worker, deployments
applied from prefect.yaml, `gstalker submit` and nightly dubbing over a SeaweedFS store."""

from __future__ import annotations

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
    worker = None
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
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gstalker", "--limit", "2"],
                                  env=env, cwd=REPO, stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        yield env, logs
    finally:
        for proc, sig in ((worker, signal.SIGINT), (server, signal.SIGTERM)):  # the worker ignores SIGTERM
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
    env, logs = production
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
    env, logs = production
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
