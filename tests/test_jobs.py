"""The dubbing job queue: validation, leases, exactly-once claims, dead-worker takeover."""

from __future__ import annotations

import threading
import time

import pytest

from gstalker_core import jobs
from gstalker_core.errors import InputError
from gstalker_core.storage import LocalStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def _job(store, job_id="news-1", speaker="cnn-anchor"):
    return jobs.submit(store, job_id, jobs.DubJob(speaker=speaker, audio="uploads/speech.wav"))


def test_bad_job_files_are_refused_with_the_reason(store):
    store.put_bytes("jobs/inbox/bad.json", b'{"speaker": "../etc", "audio": "/abs/path"}')
    with pytest.raises(InputError) as err:
        jobs.read_job(store, "bad")
    assert "speaker" in str(err.value) and "audio" in str(err.value)
    store.put_bytes("jobs/inbox/garbled.json", b"{not json")
    with pytest.raises(InputError, match="garbled is invalid"):
        jobs.read_job(store, "garbled")
    with pytest.raises(InputError, match="invalid job id"):
        jobs.claim(store, "../x", "me")


def test_one_claim_wins_and_finishing_moves_the_job(store):
    _job(store)
    assert jobs.inbox(store) == ["news-1"]
    lease = jobs.claim(store, "news-1", "run-a", lease_s=30)
    assert lease is not None
    assert jobs.claim(store, "news-1", "run-b", lease_s=30) is None  # held by a live lease
    result = lease.finish({"speaker": "cnn-anchor"}, "done", output="renders/x.mp4")
    assert result.status == "done" and jobs.inbox(store) == []
    assert jobs.outcome(store, "news-1").output == "renders/x.mp4"
    assert jobs.claim(store, "news-1", "run-b") is None  # finished jobs are never claimed again


def test_racing_runs_claim_each_job_exactly_once(store):
    for i in range(6):
        _job(store, f"job-{i}")
    winners: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def worker(name):
        barrier.wait()
        for job_id in jobs.inbox(store):
            lease = jobs.claim(store, job_id, name, lease_s=30)
            if lease:
                winners.setdefault(job_id, []).append(name)
                lease.finish({}, "done")

    threads = [threading.Thread(target=worker, args=(f"run-{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(winners) == [f"job-{i}" for i in range(6)]
    assert all(len(w) == 1 for w in winners.values()), winners


def test_a_dead_workers_job_is_taken_over_after_its_lease_expires(store):
    _job(store)
    dead = jobs.claim(store, "news-1", "dead-worker", lease_s=1.5)
    dead._stop.set()  # the worker dies: no more renewals
    assert jobs.claim(store, "news-1", "run-b", lease_s=30) is None
    time.sleep(2.0)
    taker = jobs.claim(store, "news-1", "run-b", lease_s=30)
    assert taker is not None
    assert dead.finish({}, "done") is None  # the dead worker's late outcome does not count
    assert taker.finish({}, "failed", reason="boom").status == "failed"
    assert jobs.outcome(store, "news-1").reason == "boom"


def test_renewal_keeps_a_slow_job_claimed(store):
    _job(store)
    lease = jobs.claim(store, "news-1", "slow", lease_s=1.2)
    time.sleep(2.0)  # longer than the lease: only renewals keep it
    assert jobs.claim(store, "news-1", "other", lease_s=30) is None
    assert lease.finish({}, "done") is not None
