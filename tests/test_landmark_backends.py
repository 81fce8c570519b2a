"""Landmark topologies: the groups of each model's points, checked with real FaceMesh points
mapped onto the 68-point markup."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gstalker_core.errors import ConfigError
from gstalker_core.metrics.lipsync import mouth_opening
from gstalker_core.tracking import HEAD, NECK, TrackConfig, track_clip
from gstalker_core.tracking import track as track_module
from gstalker_core.tracking.landmarks import MediapipeFaceMesh
from gstalker_core.tracking.topology import FACEMESH, IBUG68, TOPOLOGIES, Topology
from gstalker_core.tracking.track import LABELS
from gstalker_core.data.frames import ChunkReader
from tests.test_tracking import motion, warped_face

# FaceMesh points at the 68 iBUG markup positions: jaw, brows, nose bridge, nostrils, eyes, outer and inner lips
FACEMESH_AS_IBUG68 = np.array([
    127, 234, 132, 58, 172, 150, 149, 148, 152, 377, 378, 379, 397, 288, 361, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87])


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
