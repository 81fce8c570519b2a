"""The dubbing inbox: job validation, outcomes, and what counts as pending (who renders a
job is Prefect's business: tests/test_orchestration.py)."""

from __future__ import annotations

import pytest

from gstalker_core import jobs
from gstalker_core.errors import InputError
from gstalker_core.storage import LocalStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def _job(store, job_id="news-1", speaker="cnn-anchor", profile="preview"):
    jobs.submit(store, job_id, jobs.DubJob(speaker=speaker, audio="uploads/speech.wav", profile=profile))
    return jobs.read_job(store, job_id)


def test_bad_job_files_are_refused_with_the_reason(store):
    store.put_bytes("jobs/inbox/bad.json", b'{"speaker": "../etc", "audio": "/abs/path"}')
    with pytest.raises(InputError) as err:
        jobs.read_job(store, "bad")
    assert "speaker" in str(err.value) and "audio" in str(err.value)
    store.put_bytes("jobs/inbox/garbled.json", b"{not json")
    with pytest.raises(InputError, match="garbled is invalid"):
        jobs.read_job(store, "garbled")
    store.put_bytes("jobs/inbox/typo.json", b'{"speaker": "a", "audio": "uploads/x.wav", "profil": "tiny"}')
    with pytest.raises(InputError, match="profil"):
        jobs.read_job(store, "typo")
    with pytest.raises(InputError, match="invalid job id"):
        jobs.submit(store, "../x", jobs.DubJob(speaker="a", audio="uploads/x.wav"))


def test_finishing_records_the_outcome_then_empties_the_inbox(store):
    job = _job(store, profile="tiny")
    assert job.profile == "tiny" and jobs.pending(store) == ["news-1"]
    result = jobs.finish(store, "news-1", job.model_dump(), "done", "flow-run-a", output="renders/x.mp4")
    assert result.status == "done" and jobs.inbox(store) == [] and jobs.pending(store) == []
    assert jobs.outcome(store, "news-1").output == "renders/x.mp4"
    assert jobs.outcome(store, "news-1").job["profile"] == "tiny"
    _job(store, "news-2")
    jobs.finish(store, "news-2", {}, "failed", "flow-run-b", reason="no such speaker")
    assert jobs.outcome(store, "news-2").reason == "no such speaker" and store.exists("jobs/failed/news-2.json")


def test_a_job_with_an_outcome_is_never_pending_again(store):
    """A run that crashed between recording the outcome and removing the inbox file leaves
    both: the job is done, only the inbox is cleaned up."""
    job = _job(store)
    store.put_bytes("jobs/done/news-1.json", jobs.finish(store, "news-1", job.model_dump(), "done", "a",
                                                         output="x.mp4").model_dump_json().encode())
    jobs.submit(store, "news-1", job)  # the inbox file is still there
    assert jobs.pending(store) == [] and jobs.inbox(store) == []
