"""Model bundle: everything needed to render a speaker, loadable alone, versioned.

A bundle is a folder (and a stage output in the store):
- ``bundle.json``: ``BundleManifest`` (format version, gstalker version, the audio feature
  spec the model was trained on, deformation config, resolution, source stage keys);
- ``head.safetensors``, ``torso.safetensors``: the static Gaussians;
- ``networks.safetensors``: audio encoder, face and torso fields;
- ``tracks.npz``: training pose track (viewmats), blink track, torso shifts, intrinsics K;
- ``plate.png``: the background.
Loading checks the format version first, so a bundle from an incompatible release fails
with a clear message instead of a shape error deep in torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..audio import AudioFeatureSpec
from ..config import DeformConfig
from ..errors import InputError
from ..render.gaussians import GaussianModel
from ..storage import ArtifactStore, StageManifest, fetch_stage
from .lip_gain import LipGain
from .talking_head import TalkingHead

FORMAT_VERSION = 1  # the files and manifest schema; network contents are checked key by key on load
MANIFEST, HEAD, TORSO, NETWORKS, TRACKS, PLATE = (
    "bundle.json", "head.safetensors", "torso.safetensors", "networks.safetensors", "tracks.npz", "plate.png")


class BundleManifest(BaseModel):
    format_version: int
    gstalker_version: str
    resolution: int
    fps: int
    audio_spec: AudioFeatureSpec
    step_window: int
    deform: DeformConfig
    n_train_frames: int
    sources: dict[str, str]  # stage -> content key the bundle was made from
    lip_gain: LipGain | None = None  # None: not calibrated, every utterance at gain 1


@dataclass
class Bundle:
    manifest: BundleManifest
    model: TalkingHead
    viewmats: np.ndarray  # (n_train, 4, 4) training pose track
    blink: np.ndarray  # (n_train,)
    K: np.ndarray  # (3, 3)
    plate: np.ndarray  # (H, W, 3) uint8
    torso_shift: np.ndarray | None = None  # (n_train, 2) pixels (tracking.torso); None: the torso never moves


def _network_state(model: TalkingHead) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(("head.", "torso."))}


def save_bundle(bundle: Bundle, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bundle.model.head.save(folder / HEAD)
    bundle.model.torso.save(folder / TORSO)
    save_file(_network_state(bundle.model), str(folder / NETWORKS))
    shift = np.zeros((len(bundle.viewmats), 2), np.float32) if bundle.torso_shift is None else bundle.torso_shift
    np.savez_compressed(folder / TRACKS, viewmats=bundle.viewmats, blink=bundle.blink, K=bundle.K, torso_shift=shift)
    cv2.imwrite(str(folder / PLATE), cv2.cvtColor(bundle.plate, cv2.COLOR_RGB2BGR))
    (folder / MANIFEST).write_text(bundle.manifest.model_dump_json(indent=2))
    return folder


def load_bundle(folder: Path) -> Bundle:
    folder = Path(folder)
    try:
        raw = (folder / MANIFEST).read_text()
    except FileNotFoundError:
        raise InputError(f"{folder} is not a model bundle (no {MANIFEST})", "train the speaker first") from None
    try:
        version = json.loads(raw).get("format_version")
    except (json.JSONDecodeError, AttributeError):
        version = None
    if version != FORMAT_VERSION:
        raise InputError(f"the model bundle in {folder} has format version {version}; this gstalker "
                         f"({__version__}) reads version {FORMAT_VERSION}",
                         "retrain the speaker with this version (`gstalker train`), or use the gstalker release "
                         "that made the bundle")
    try:
        manifest = BundleManifest.model_validate_json(raw)
    except ValidationError as err:
        raise InputError(f"the model bundle manifest in {folder} is invalid: {err.errors()[0]['msg']}",
                         "retrain the speaker") from None
    tracks = np.load(folder / TRACKS)
    head, torso = GaussianModel.load(folder / HEAD), GaussianModel.load(folder / TORSO)
    model = TalkingHead(manifest.deform, head, torso, manifest.audio_spec.width, manifest.step_window,
                        torch.from_numpy(tracks["viewmats"]))
    missing, unexpected = model.load_state_dict(load_file(str(folder / NETWORKS)), strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "torso."))]  # loaded from their own files
    if missing or unexpected:
        raise InputError(f"the networks in {folder} do not match this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})", "retrain the speaker with this version")
    model.eval()
    plate = cv2.cvtColor(cv2.imread(str(folder / PLATE)), cv2.COLOR_BGR2RGB)
    # bundles made before the torso was tracked have no shifts: their torso never moves
    shift = tracks["torso_shift"] if "torso_shift" in tracks else None
    return Bundle(manifest, model, tracks["viewmats"], tracks["blink"], tracks["K"], plate, shift)


def fetch_bundle(store: ArtifactStore, bundle_run: StageManifest, cache_dir: Path) -> Bundle:
    """Load the bundle published by a ``deform`` stage run (files fetched and verified once)."""
    parts = fetch_stage(store, bundle_run, cache_dir)
    return load_bundle(parts[MANIFEST].parent)
