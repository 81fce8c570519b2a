"""The artifact store on a local directory and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gstalker_core.config import StoreConfig
from gstalker_core.errors import StorageError
from gstalker_core.storage import LocalStore, StageWork, content_key, fetch_part, fetch_stage, find_stage, run_stage
from gstalker_core.storage.s3 import S3Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def test_objects_and_trees_round_trip(store, tmp_path):
    store.put_bytes("a/b.txt", b"hello")
    assert store.exists("a/b.txt") and not store.exists("a/missing")
    assert store.get_bytes("a/b.txt") == b"hello"
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "x.bin").write_bytes(os.urandom(1000))
    (tree / "sub" / "y.bin").write_bytes(os.urandom(10))
    assert store.put_dir("dir", tree) == ["dir/sub/y.bin", "dir/x.bin"]
    assert store.list("dir/") == ["dir/sub/y.bin", "dir/x.bin"]
    got = store.get_dir("dir", tmp_path / "copy")
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in got) == ["sub/y.bin", "x.bin"]
    assert (tmp_path / "copy/x.bin").read_bytes() == (tree / "x.bin").read_bytes()
    assert store.delete_prefix("dir") == 2 and store.list("dir/") == []
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting a missing object is fine
    with pytest.raises(StorageError, match="not in the store"):
        store.get_bytes("a/b.txt")


@pytest.mark.parametrize("key", ["../escape", "/abs/key", "a/../../b", "a//b", ""])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(StorageError, match="unsafe storage key"):
        store.put_bytes(key, b"x")


def test_multipart_upload_round_trips(s3_server, s3_store, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    store = S3Store(s3_store.url, s3_server.store_config(multipart_threshold_mb=5, multipart_chunk_mb=5))
    store.put_file("big.bin", big)
    etag = s3_server.client().head_object(Bucket=store.bucket, Key=f"{store.prefix}/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts: really multipart
    out = store.get_file("big.bin", tmp_path / "back.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()


def _build(parts: dict[str, bytes]):
    def build(workdir: Path) -> dict:
        for name, data in parts.items():
            (workdir / name).write_bytes(data)
        return {"n": len(parts)}
    return build


def test_stage_cache_hit_and_checksum_on_read(store, tmp_path):
    first = run_stage(store, StageWork("demo", "1", {"a": 1}, {"x": "k"}), _build({"p.bin": b"payload"}),
                      tmp_path / "cache")
    again = run_stage(store, StageWork("demo", "1", {"a": 1}, {"x": "k"}), _build({"p.bin": b"other"}),
                      tmp_path / "cache")
    changed = run_stage(store, StageWork("demo", "1", {"a": 2}, {"x": "k"}), _build({"p.bin": b"payload"}),
                        tmp_path / "cache")
    assert not first.cache_hit and again.cache_hit and again.manifest.key == first.manifest.key
    assert not changed.cache_hit and changed.manifest.key != first.manifest.key
    assert fetch_part(store, first.manifest, "p.bin", tmp_path / "c2").read_bytes() == b"payload"
    store.put_bytes(first.manifest.parts["p.bin"].key, b"tampered")  # corrupt behind the store's back
    with pytest.raises(StorageError, match="checksum mismatch"):
        fetch_part(store, first.manifest, "p.bin", tmp_path / "c3")


def _s3(server, **cfg) -> StoreConfig:
    return server.store_config(max_attempts=1, connect_timeout_s=1, read_timeout_s=5, **cfg)


def test_unreachable_endpoint(monkeypatch, s3_server):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    store = S3Store("s3://bucket/p", StoreConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout_s=1))
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9") as err:
        store.exists("x")
    assert "endpoint_url" in err.value.fix


def test_wrong_credentials(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "intruder")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3Store(s3_server.url(s3_server.bucket("gstalker-tests"), "p"), _s3(s3_server))
    with pytest.raises(StorageError, match="refused our credentials"):
        store.put_bytes("x", b"1")


def test_missing_bucket(s3_store, s3_server):
    store = S3Store("s3://no-such-bucket-here/p", _s3(s3_server))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        store.put_bytes("x", b"1")


def test_no_credentials(monkeypatch, s3_server, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store("s3://gstalker-tests/p", _s3(s3_server))
    with pytest.raises(StorageError, match="no S3 credentials"):
        store.exists("x")


PUBLISHER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from gstalker_core.config import StoreConfig
    from gstalker_core.storage import StageWork, run_stage
    from gstalker_core.storage.s3 import S3Store
    store = S3Store({url!r}, StoreConfig(endpoint_url={endpoint!r}, addressing_style="path", max_attempts=1,
                                         connect_timeout_s=1, read_timeout_s=5))
    def build(workdir):
        for i in range(6):
            (workdir / f"part{{i}}.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        return {{}}
    original = store.put_file
    def slow_put(key, path):
        original(key, path)
        print("uploaded", key, flush=True)
        time.sleep(0.5)
    store.put_file = slow_put
    run_stage(store, StageWork("crash", "1", {{}}, {{}}), build, Path({cache!r}))
    print("published", flush=True)
""")


def _publisher(s3_server, s3_store, tmp_path) -> subprocess.Popen:
    code = PUBLISHER.format(repo=str(REPO), url=s3_store.url, endpoint=s3_server.endpoint_url, cache=str(tmp_path))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **s3_server.env()})


def _wait_for_upload(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.startswith("uploaded"), line


def _stage_key(s3_store) -> str:
    return content_key("crash", "1", {}, {})


def test_writer_killed_mid_upload_leaves_nothing_visible(s3_server, s3_store, tmp_path):
    proc = _publisher(s3_server, s3_store, tmp_path)
    _wait_for_upload(proc)
    proc.kill()
    proc.wait()
    assert find_stage(s3_store, "crash", _stage_key(s3_store)) is None  # parts exist, no manifest
    assert s3_store.list("stages/crash/")
    rerun = run_stage(s3_store, StageWork("crash", "1", {}, {}), _build({"part0.bin": b"complete"}), tmp_path / "c")
    assert not rerun.cache_hit
    assert fetch_stage(s3_store, rerun.manifest, tmp_path / "c2")["part0.bin"].read_bytes() == b"complete"


def test_server_killed_mid_upload_then_restarted(s3_server, s3_store, tmp_path):
    s3_store.put_bytes("before/kill.txt", b"durable")
    proc = _publisher(s3_server, s3_store, tmp_path)
    _wait_for_upload(proc)
    s3_server.kill()
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "published" not in out
        assert "StorageError" in out  # a clear storage error, not a hang
    finally:
        s3_server.start()
    assert find_stage(s3_store, "crash", _stage_key(s3_store)) is None
    assert s3_store.get_bytes("before/kill.txt") == b"durable"


def test_restart_keeps_what_was_stored(s3_server, s3_store):
    s3_store.put_bytes("keep/me.txt", b"still here")
    s3_server.stop()
    s3_server.start()
    assert s3_store.get_bytes("keep/me.txt") == b"still here"
