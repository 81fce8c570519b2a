"""Landmark topologies and the optional landmark backends (face-alignment, insightface).

The backends' tests load randomly initialised models saved where the user's weights would be
(``tests/fixtures/landmark_models.py`` says which architectures): they show that tracking
runs end to end offline from a local model folder, with the right shapes and topology in the
stored track, and that bad folders and models fail with error/fix. They say nothing about
landmark accuracy (random points), so they relax the tracking QA thresholds that garbage
points would trip. Accuracy of the topology groups themselves is checked with real FaceMesh
points mapped onto the 68-point markup.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gstalker_core.errors import ConfigError
from gstalker_core.metrics.lipsync import mouth_opening
from gstalker_core.model_files import files_digest
from gstalker_core.tracking import HEAD, NECK, TrackConfig, track_clip
from gstalker_core.tracking import track as track_module
from gstalker_core.tracking.landmarks import MediapipeFaceMesh, make_backend, weight_files
from gstalker_core.tracking.topology import FACEMESH, IBUG68, INSIGHTFACE106, TOPOLOGIES, Topology
from gstalker_core.tracking.track import LABELS
from gstalker_core.data.frames import ChunkReader
from tests.fixtures.landmark_models import save_face_alignment_models, save_landmark_model, save_scrfd_like_detector
from tests.test_tracking import motion, warped_face

# FaceMesh points at the 68 iBUG markup positions: jaw, brows, nose bridge, nostrils, eyes, outer and inner lips
FACEMESH_AS_IBUG68 = np.array([
    127, 234, 132, 58, 172, 150, 149, 148, 152, 377, 378, 379, 397, 288, 361, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87])

# QA thresholds that random points would trip (the face is "too small", every frame an outlier)
LENIENT_QA = dict(min_face_fraction=0.01, max_gap_frames=10_000, outlier_mad=1e6)


@pytest.mark.parametrize("topology", TOPOLOGIES.values(), ids=TOPOLOGIES)
def test_topology_groups_are_valid_indices(topology: Topology):
    groups = {name: np.asarray(getattr(topology, name)).ravel() for name in
              ("stable", "face_oval", "jaw", "outer_lips", "inner_lips", "cheek_skin")}
    groups.update(eyes=np.concatenate(topology.eyes), singles=np.array([topology.chin, topology.top,
                                                                         *topology.outer_eye_corners,
                                                                         *topology.lip_gap, *topology.mouth_corners]))
    for name, points in groups.items():
        assert points.min() >= 0 and points.max() < topology.n_points, name
    for name in ("stable", "face_oval", "jaw", "outer_lips", "inner_lips"):
        assert len(set(groups[name].tolist())) == len(groups[name]), f"{name} repeats a point"
    assert len(topology.stable) >= 6 and all(len(eye) == 6 for eye in topology.eyes)
    assert topology.chin in topology.jaw and topology.chin in topology.face_oval
    assert not set(topology.outer_lips.tolist()) & set(topology.inner_lips.tolist())
    assert set(topology.mouth_corners) <= set(topology.outer_lips.tolist())
    assert set(topology.lip_gap) <= set(topology.inner_lips.tolist())


def test_facemesh_groups_are_those_the_metrics_always_used():
    lips = [0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270,
            291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415]
    assert FACEMESH.mouth.tolist() == lips
    assert (FACEMESH.lip_gap, FACEMESH.mouth_corners, FACEMESH.chin, FACEMESH.top) == ((13, 14), (61, 291), 152, 10)


class FaceMeshAs68:
    """FaceMesh's points at the 68 iBUG positions, in batches of 4: a real-face 68-point backend."""

    name = "facemesh_as_ibug68"
    topology = IBUG68
    batch_frames = 4

    def __init__(self, cfg: TrackConfig):
        self._mesh = MediapipeFaceMesh(cfg)

    def detect_batch(self, frames):
        return [None if p is None else p[FACEMESH_AS_IBUG68] for p in self._mesh.detect_batch(frames)]

    def close(self):
        self._mesh.close()


def test_a_68_point_track_follows_the_known_warps(tmp_path, monkeypatch):
    """The 68-point groups (stable points, eye corners, chin, jaw, eyes, lips) do on a real face
    what FaceMesh's do: the pose follows the warps that made the clip, the head sits above the jaw."""
    monkeypatch.setattr(track_module, "make_backend", lambda cfg, device: FaceMeshAs68(cfg))
    n, size = 30, 128
    frames = [warped_face(size, **motion(k, n)) for k in range(n)]
    manifest = track_clip(frames, TrackConfig(qa_video=False), tmp_path, chunk_frames=16)
    assert (manifest.landmark_backend, manifest.landmark_topology) == ("facemesh_as_ibug68", "ibug68")
    assert manifest.n_valid == n and manifest.mouth_covered == [] and manifest.reprojection_error_px < 2.5
    landmarks, views = np.load(tmp_path / "landmarks.npy"), np.load(tmp_path / "viewmats.npy")
    assert landmarks.shape == (n, 68, 3) and np.load(tmp_path / "template.npy").shape == (68, 3)
    for k in range(1, n):
        rel = Rotation.from_matrix(views[k, :3, :3] @ views[0, :3, :3].T).as_rotvec(degrees=True)
        assert rel[2] == pytest.approx(-motion(k, n)["theta_deg"], abs=3.0), k
        assert views[k, 2, 3] / views[0, 2, 3] == pytest.approx(1 / motion(k, n)["scale"], rel=0.06), k
    blink = np.load(tmp_path / "blink.npy")
    assert blink.shape == (n,) and 0 <= blink.min() and blink.max() <= 1
    assert np.all(mouth_opening(landmarks, IBUG68) > 0.05)  # she smiles with her teeth showing
    labels = ChunkReader(sorted(tmp_path.glob(f"{LABELS}_*.npz")), manifest.chunk_frames, n)[0]
    chin, top = landmarks[0, IBUG68.chin, :2], landmarks[0, IBUG68.top, :2]
    assert labels[int(top[1]), int(top[0])] == HEAD
    assert labels[int(chin[1] + 0.2 * np.linalg.norm(chin - top)), int(chin[0])] == NECK


def test_points_of_another_topology_are_refused(tmp_path, monkeypatch):
    class Mislabelled(FaceMeshAs68):
        topology = FACEMESH  # claims 478 points, returns 68

    monkeypatch.setattr(track_module, "make_backend", lambda cfg, device: Mislabelled(cfg))
    with pytest.raises(ConfigError) as err:
        track_clip([warped_face(64) for _ in range(4)], TrackConfig(qa_video=False), tmp_path)
    assert "(68, 3)" in err.value.problem and "(478, 3)" in err.value.problem and "model_dir" in err.value.fix


@pytest.mark.parametrize("backend", ["face_alignment", "insightface"])
def test_model_dir_must_be_a_folder_holding_the_weights(tmp_path, backend):
    with pytest.raises(ConfigError, match="is not a directory"):
        make_backend(TrackConfig(landmark_backend=backend, model_dir=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty folder"):
        make_backend(TrackConfig(landmark_backend=backend, model_dir=str(empty)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not weights")
    with pytest.raises(ConfigError) as err:
        make_backend(TrackConfig(landmark_backend=backend, model_dir=str(tmp_path / "other")))
    assert "lacks" in err.value.problem and "notes.txt" in err.value.problem and "copy" in err.value.fix


@pytest.mark.parametrize("backend, package, files", [
    ("face_alignment", "face_alignment",
     ["s3fd-619a316812.pth", "3DFAN4-7835d9f11d.pth.tar", "depth-2a464da4ea.pth.tar"]),
    ("insightface", "insightface.model_zoo", ["det_10g.onnx", "2d106det.onnx"])])
def test_a_backend_that_is_not_installed_says_how_to_install_it(tmp_path, monkeypatch, backend, package, files):
    for name in files:
        (tmp_path / name).write_bytes(b"weights")
    monkeypatch.setitem(__import__("sys").modules, package, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as err:
        make_backend(TrackConfig(landmark_backend=backend, model_dir=str(tmp_path)))
    assert "not installed" in err.value.problem and "install.sh --backends" in err.value.fix


# -- face-alignment --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_alignment_dir(tmp_path_factory):
    pytest.importorskip("face_alignment", reason="optional backend not installed (bash scripts/install.sh --backends)")
    return save_face_alignment_models(tmp_path_factory.mktemp("face-alignment"))


def test_face_alignment_tracks_offline_from_its_model_dir(tmp_path, monkeypatch, offline, face_alignment_dir):
    """3D-FAN-4, its depth network and S3FD, random weights, in two batches (of 3 frames here, to
    keep the test short on a CPU: a 3D-FAN-4 pass takes about a second a frame)."""
    from gstalker_core.tracking.face_alignment_backend import FaceAlignment3D

    monkeypatch.setattr(FaceAlignment3D, "batch_frames", 3)
    n = 5
    frames = [warped_face(64, **motion(k, n)) for k in range(n)]
    cfg = TrackConfig(landmark_backend="face_alignment", model_dir=str(face_alignment_dir), **LENIENT_QA)
    manifest = track_clip(frames, cfg, tmp_path, chunk_frames=8)
    assert (manifest.landmark_backend, manifest.landmark_topology) == ("face_alignment", "ibug68")
    landmarks = np.load(tmp_path / "landmarks.npy")
    assert landmarks.shape == (n, 68, 3) and landmarks.dtype == np.float32 and np.isfinite(landmarks).all()
    assert np.abs(landmarks[..., 2]).max() > 0  # the depth network's z, not a 2D model's zeros
    assert np.load(tmp_path / "template.npy").shape == (68, 3) and (tmp_path / "qa.mp4").stat().st_size > 0


def test_face_alignment_refuses_weights_of_another_network(tmp_path, face_alignment_dir):
    import shutil

    from gstalker_core.tracking import face_alignment_backend as backend

    for name in (backend.DETECTOR, backend.DEPTH_WEIGHTS):
        shutil.copy(face_alignment_dir / name, tmp_path / name)
    save_face_alignment_models(tmp_path / "one-stack", fan_modules=1)  # 2 hourglasses fewer than 3D-FAN-4
    shutil.copy(tmp_path / "one-stack" / backend.FAN_WEIGHTS, tmp_path / backend.FAN_WEIGHTS)
    with pytest.raises(ConfigError) as err:
        make_backend(TrackConfig(landmark_backend="face_alignment", model_dir=str(tmp_path)))
    assert backend.FAN_WEIGHTS in err.value.problem and "3D-FAN-4" in err.value.problem
    assert backend.FAN_WEIGHTS in err.value.fix


# -- insightface -----------------------------------------------------------------------------


@pytest.fixture
def insightface_dir(tmp_path):
    pytest.importorskip("insightface", reason="optional backend not installed (bash scripts/install.sh --backends)")
    folder = tmp_path / "buffalo_l"
    save_scrfd_like_detector(folder / "det_10g.onnx")
    save_landmark_model(folder / "2d106det.onnx")
    return folder


def test_insightface_tracks_offline_from_its_model_dir(tmp_path, offline, insightface_dir):
    n = 8
    frames = [warped_face(64, **motion(k, n)) for k in range(n)]
    cfg = TrackConfig(landmark_backend="insightface", model_dir=str(insightface_dir), **LENIENT_QA)
    manifest = track_clip(frames, cfg, tmp_path / "track", chunk_frames=4)
    assert (manifest.landmark_backend, manifest.landmark_topology) == ("insightface", "insightface106")
    landmarks = np.load(tmp_path / "track" / "landmarks.npy")
    assert landmarks.shape == (n, 106, 3) and np.isfinite(landmarks).all() and not landmarks[..., 2].any()
    assert mouth_opening(landmarks, INSIGHTFACE106).shape == (n,)


@pytest.mark.parametrize("wrong, message", [("detector", "not an SCRFD face detector"),
                                            ("68 points", "not the 106-point 2D model")])
def test_insightface_refuses_models_of_another_kind(insightface_dir, wrong, message):
    if wrong == "detector":
        save_landmark_model(insightface_dir / "det_10g.onnx")
    else:
        save_landmark_model(insightface_dir / "2d106det.onnx", n_points=68)
    with pytest.raises(ConfigError) as err:
        make_backend(TrackConfig(landmark_backend="insightface", model_dir=str(insightface_dir)))
    assert message in err.value.problem and "model pack" in err.value.fix


def test_track_stage_with_insightface_names_it_and_keys_its_weights(tmp_path, offline, clip, insightface_dir):
    """The stored manifest names backend and topology; the weights' digest is in the key; a bad
    model folder fails before anything is written and leaves the stored stages as they were."""
    from gstalker_core import ingest
    from gstalker_core.config import load_config
    from gstalker_core.storage import open_store
    from gstalker_core.tracking import manifest_of, open_dataset, run, stage_key
    from gstalker_core.tracking.stage import work

    lenient = [f"track.{k}={v}" for k, v in LENIENT_QA.items()]
    cfg = load_config("tiny", overrides=[f"home={tmp_path / 'home'}", "track.landmark_backend=insightface",
                                         f"track.model_dir={insightface_dir}", *lenient], environ={})
    store = open_store(cfg)
    ingest_run = ingest.run(store, str(clip("track2s.mp4", seconds=2.0)), cfg).manifest
    tracked = run(store, ingest_run, cfg).manifest
    meta = manifest_of(tracked)
    assert (meta.landmark_backend, meta.landmark_topology) == ("insightface", "insightface106")
    assert work(ingest_run, cfg).inputs["landmark_model"] == files_digest(weight_files(cfg.track))
    default = load_config("tiny", overrides=[f"home={tmp_path / 'home'}"], environ={})
    assert "landmark_model" not in work(ingest_run, default).inputs
    test = open_dataset(store, tracked, ingest_run, cfg.cache_dir, split="test")
    assert test.topology is INSIGHTFACE106 and test.arrays.landmarks.shape[1:] == (106, 3)

    save_landmark_model(insightface_dir / "2d106det.onnx", seed=1)  # new weights in the same folder: a new key
    assert stage_key(ingest_run, cfg) != tracked.key
    stored = sorted(store.list(""))
    (insightface_dir / "2d106det.onnx").unlink()
    with pytest.raises(ConfigError, match="lacks 2d106det.onnx"):
        run(store, ingest_run, cfg)
    assert sorted(store.list("")) == stored and manifest_of(tracked).n_frames == ingest_run.meta["n_frames"]


def test_a_flat_106_point_template_still_fits_poses():
    """2D models give z = 0: the learned template is flat, and the rigid fit still runs on it."""
    from gstalker_core.tracking import pose

    rng = np.random.default_rng(0)
    flat = np.concatenate([rng.uniform(-40, 40, (106, 2)) + 64, np.zeros((106, 1))], axis=1)
    rolls = [Rotation.from_euler("z", 5 * math.sin(k / 3), degrees=True).as_matrix()[:2, :2] for k in range(12)]
    frames = np.stack([np.concatenate([(flat[:, :2] - 64) @ roll.T + 64, flat[:, 2:]], axis=1)
                       for roll in rolls]).astype(np.float32)
    template = pose.learn_template(pose.lift_landmarks(frames, 300.0, 64, 64, INSIGHTFACE106), INSIGHTFACE106)
    fit = pose.fit_poses(template, frames[..., :2], np.ones(len(frames), bool), pose.intrinsics(300.0, 128, 128),
                         INSIGHTFACE106)
    assert np.ptp(template[:, 2]) < 1e-6 and np.nanmax(fit.residual) < 0.5
