"""Stage outputs: content-addressed, immutable, visible only when complete.

A stage output lives at ``stages/<stage>/<key>/``. ``key`` hashes the stage's code
version, its own config section and the keys of its inputs, so equal work has one key
and a changed config field reruns exactly the stages that read it.

Publishing writes every part under a fresh attempt folder, then ``MANIFEST.json`` last.
Readers trust only the manifest: a writer killed mid-upload leaves an orphan attempt
folder that nobody reads, and two workers racing on one key never mix their parts (the
last manifest wins and points at one complete attempt).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple

from pydantic import BaseModel, ValidationError

from .. import __version__
from ..errors import StorageError
from .base import ArtifactStore, sha256_file

STAGES_ROOT = "stages"


class PartInfo(BaseModel):
    key: str
    sha256: str
    size: int


class StageManifest(BaseModel):
    schema_version: int = 1
    stage: str
    key: str
    code_version: str
    gstalker_version: str
    created_at: datetime
    inputs: dict[str, str]
    config: dict[str, Any]
    parts: dict[str, PartInfo]
    meta: dict[str, Any]


class StageRun(NamedTuple):
    manifest: StageManifest
    cache_hit: bool


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def content_key(stage: str, code_version: str, config: Any, inputs: dict[str, str]) -> str:
    """Hash of everything that determines a stage's output (32 hex chars)."""
    doc = {"stage": stage, "code": code_version, "config": _canonical(config), "inputs": dict(sorted(inputs.items()))}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class StageWork:
    """A stage's identity: the work whose output ``key`` names. Each stage declares it in
    one function, which both its cache lookup (``key``) and its run (``run_stage``) use."""

    stage: str
    code_version: str
    config: Any  # the stage's own config section(s)
    inputs: dict[str, str]  # input name -> content key (or a source's hash)

    @property
    def key(self) -> str:
        return content_key(self.stage, self.code_version, self.config, self.inputs)


def manifest_key(stage: str, key: str) -> str:
    return f"{STAGES_ROOT}/{stage}/{key}/MANIFEST.json"


def find_stage(store: ArtifactStore, stage: str, key: str) -> StageManifest | None:
    """The published manifest for ``stage``/``key``, or None if the stage is not done."""
    mkey = manifest_key(stage, key)
    if not store.exists(mkey):
        return None
    try:
        return StageManifest.model_validate_json(store.get_bytes(mkey))
    except ValidationError:
        # An unreadable manifest means "not done": the stage reruns and replaces it.
        return None


def publish_stage(store: ArtifactStore, *, stage: str, key: str, code_version: str, workdir: Path,
                  meta: dict[str, Any], inputs: dict[str, str], config: Any) -> StageManifest:
    attempt = uuid.uuid4().hex[:12]
    parts: dict[str, PartInfo] = {}
    for path in sorted(Path(workdir).rglob("*")):
        if path.is_file():
            rel = path.relative_to(workdir).as_posix()
            part_key = f"{STAGES_ROOT}/{stage}/{key}/{attempt}/{rel}"
            store.put_file(part_key, path)
            parts[rel] = PartInfo(key=part_key, sha256=sha256_file(path), size=path.stat().st_size)
    manifest = StageManifest(stage=stage, key=key, code_version=code_version, gstalker_version=__version__,
                             created_at=datetime.now(timezone.utc), inputs=inputs, config=_canonical(config),
                             parts=parts, meta=meta)
    store.put_bytes(manifest_key(stage, key), manifest.model_dump_json(indent=2).encode())
    return manifest


def fetch_part(store: ArtifactStore, manifest: StageManifest, name: str, cache_dir: Path) -> Path:
    """A verified local path of one part: in place for a local store, else downloaded once."""
    try:
        part = manifest.parts[name]
    except KeyError:
        raise StorageError(f"stage {manifest.stage}/{manifest.key} has no part {name!r}",
                           "the stage output is from an incompatible version: rerun that stage") from None
    path = store.local_path(part.key)
    if path is None:
        path = Path(cache_dir) / part.key
        if not (path.is_file() and path.stat().st_size == part.size):
            store.get_file(part.key, path)
    if sha256_file(path) != part.sha256:
        if store.local_path(part.key) is None:
            path.unlink(missing_ok=True)
        raise StorageError(f"checksum mismatch for {name} of stage {manifest.stage}/{manifest.key}",
                           f"the stored object is corrupt: delete {manifest_key(manifest.stage, manifest.key)} "
                           "and rerun the stage")
    return path


def fetch_stage(store: ArtifactStore, manifest: StageManifest, cache_dir: Path) -> dict[str, Path]:
    """Verified local paths of every part, by part name."""
    return {name: fetch_part(store, manifest, name, cache_dir) for name in manifest.parts}


def run_stage(store: ArtifactStore, work: StageWork, build: Callable[[Path], dict[str, Any]], cache_dir: Path
              ) -> StageRun:
    """Return the output of ``work``, building and publishing it first unless it is stored.

    ``build(workdir)`` writes the stage's files into ``workdir`` and returns the stage's
    metadata (a JSON-able dict, usually a pydantic model's dump).
    """
    stage, key = work.stage, work.key
    found = find_stage(store, stage, key)
    if found is not None:
        return StageRun(found, True)
    tmp_root = Path(cache_dir) / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"{stage}-"))
    try:
        meta = build(workdir)
        manifest = publish_stage(store, stage=stage, key=key, code_version=work.code_version, workdir=workdir,
                                 meta=meta, inputs=work.inputs, config=work.config)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return StageRun(manifest, False)
