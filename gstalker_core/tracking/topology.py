"""Landmark topologies: the named groups of points that tracking and everything downstream read.

A landmark backend returns its own model's points (FaceMesh's 478, face-alignment's 68,
insightface's 106), and each model declares here, in one place, which of its points serve
which purpose. Pose, blink, labels, the covered-mouth check, the QA video, the landmark
teacher and the lip metrics read these groups, never raw indices, and a stored track names
its topology (``TrackManifest.landmark_topology``) so that later stages pick the right one.

Groups:
- ``stable``: rigid points for the template and the per-frame pose fit (nose, eye corners,
  and where the model has them forehead, cheekbones, temples); never lips, jaw, lids, brows.
- ``outer_eye_corners``: (image-left, image-right); their span sets the template's scale.
- ``chin``, ``top``: the chin and the highest midline point (the face's up axis);
  ``face_height_per_top`` x |chin - top| is the chin-to-forehead height, since the 68- and
  106-point models stop at the nose bridge.
- ``face_oval``: a loop around the face; ``jaw``: jaw angle to jaw angle through the chin.
- ``outer_lips``, ``inner_lips``: loops around the mouth; ``lip_gap`` (upper, lower inner-lip
  midpoints) and ``mouth_corners``: the mouth-opening measure.
- ``cheek_skin``: bare cheek skin, each point the midpoint of a pair of landmarks (models
  without points inside the cheek place it between a lower eyelid and the face contour).
- ``eyes``: per eye, the six eye-aspect-ratio points: corner, upper, upper, corner, lower, lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import StorageError


def _points(*indices: int) -> np.ndarray:
    return np.array(indices, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Topology:
    name: str
    n_points: int
    has_depth: bool  # False: a 2D model, z is zero (the template is then flat)
    stable: np.ndarray
    outer_eye_corners: tuple[int, int]
    chin: int
    top: int
    face_height_per_top: float
    face_oval: np.ndarray
    jaw: np.ndarray
    outer_lips: np.ndarray
    inner_lips: np.ndarray
    lip_gap: tuple[int, int]
    mouth_corners: tuple[int, int]
    cheek_skin: np.ndarray  # (K, 2) pairs of landmarks whose midpoints are cheek skin
    eyes: tuple[np.ndarray, np.ndarray]

    @property
    def mouth(self) -> np.ndarray:
        """Every lip point, in index order."""
        return np.array(sorted({*self.outer_lips.tolist(), *self.inner_lips.tolist()}))

    def cheek_points(self, landmarks: np.ndarray) -> np.ndarray:
        """(K, D) cheek-skin positions of one frame's (P, D) landmarks."""
        return (landmarks[self.cheek_skin[:, 0]] + landmarks[self.cheek_skin[:, 1]]) / 2


FACEMESH = Topology(
    name="facemesh478", n_points=478, has_depth=True,
    # Nose bridge and tip, eye corners, forehead, cheekbones, temples. Not the lips or jaw
    # (speech), not the eyelids (blinks), not the brows (expression), not the irises.
    stable=np.array(sorted({
        1, 4, 5, 6, 168, 197, 195, 98, 327,                       # nose
        33, 133, 362, 263,                                        # eye corners
        10, 151, 9, 8, 108, 337, 67, 297, 109, 338, 103, 332,     # forehead
        116, 345, 117, 346, 123, 352, 50, 280, 101, 330,          # cheekbones
        118, 347, 119, 348, 47, 277, 100, 329, 126, 355,          # under the eyes
        127, 356, 234, 454, 21, 251, 162, 389, 139, 368,          # temples
    })),
    outer_eye_corners=(33, 263), chin=152, top=10, face_height_per_top=1.0,
    # mediapipe FACEMESH_FACE_OVAL as a loop from the top
    face_oval=_points(10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
                      152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109),
    # It stops at the jaw angles (not at the ears): the head/neck boundary continues flat from
    # there, so the ears, which hang below the top of the jaw, stay head.
    jaw=_points(58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288),
    # mediapipe FACEMESH_LIPS, outer and inner loops
    outer_lips=_points(61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185),
    inner_lips=_points(78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191),
    lip_gap=(13, 14), mouth_corners=(61, 291),
    # cheekbones and the skin under the eyes: a hand over the mouth rarely reaches them
    cheek_skin=np.repeat(_points(50, 280, 118, 347, 101, 330)[:, None], 2, axis=1),
    eyes=(_points(33, 160, 158, 133, 153, 144), _points(362, 385, 387, 263, 373, 380)),
)

# The 68-point iBUG 300-W markup of face-alignment's 3D-FAN: jaw 0-16 (image left to right),
# brows 17-26, nose bridge 27-30, nostrils 31-35, eyes 36-41 and 42-47 (corner, two upper,
# corner, two lower), outer lips 48-59, inner lips 60-67.
IBUG68 = Topology(
    name="ibug68", n_points=68, has_depth=True,
    stable=_points(0, 1, 2, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45),
    outer_eye_corners=(36, 45), chin=8, top=27,
    # FaceMesh's chin-to-forehead over chin-to-nose-bridge-top (its points 152, 10, 168) on a frontal face
    face_height_per_top=1.41,
    face_oval=_points(*range(17), 26, 25, 24, 23, 22, 21, 20, 19, 18, 17),
    jaw=_points(*range(3, 14)),
    outer_lips=_points(*range(48, 60)), inner_lips=_points(*range(60, 68)),
    lip_gap=(62, 66), mouth_corners=(48, 54),
    cheek_skin=_points(1, 41, 15, 46, 2, 40, 14, 47, 1, 31, 15, 35).reshape(-1, 2),
    eyes=(_points(*range(36, 42)), _points(*range(42, 48))),
)

# insightface's 2d106det output, in the model's own order (its markup orders the points by
# name, so neighbours on the face are not neighbours in the array): face contour 0-32 with
# the chin at 0, running up the image-left side as 8..2, 16..9, 1 and up the image-right side
# as 24..18, 32..25, 17; brows 43-51 and 97-105; image-left eye 33-42 (pupil 38), image-right
# eye 87-96 (pupil 88); nose 72-86; mouth 52-71 (corners 52 and 61).
_INSIGHTFACE_CONTOUR = _points(1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0,
                               24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17)
INSIGHTFACE106 = Topology(
    name="insightface106", n_points=106, has_depth=False,
    stable=np.array(sorted({*_INSIGHTFACE_CONTOUR[:6].tolist(), *_INSIGHTFACE_CONTOUR[-6:].tolist(),
                            *range(72, 87), 35, 39, 89, 93})),
    outer_eye_corners=(35, 93), chin=0, top=72, face_height_per_top=IBUG68.face_height_per_top,
    face_oval=np.concatenate([_INSIGHTFACE_CONTOUR, _points(101, 105, 104, 103, 102, 50, 51, 49, 48, 43)]),
    jaw=_INSIGHTFACE_CONTOUR[7:26],
    outer_lips=_points(52, 64, 63, 71, 67, 68, 61, 58, 59, 53, 56, 55),
    inner_lips=_points(65, 66, 62, 70, 69, 57, 60, 54),
    lip_gap=(62, 60), mouth_corners=(52, 61),
    cheek_skin=_points(11, 36, 27, 91, 13, 37, 29, 90, 11, 78, 27, 84).reshape(-1, 2),
    eyes=(_points(35, 41, 42, 39, 37, 36), _points(89, 95, 96, 93, 91, 90)),
)

TOPOLOGIES = {t.name: t for t in (FACEMESH, IBUG68, INSIGHTFACE106)}


def topology_named(name: str) -> Topology:
    """The topology a stored track names."""
    try:
        return TOPOLOGIES[name]
    except KeyError:
        raise StorageError(f"the stored track's landmarks have the unknown topology {name!r} "
                           f"(this version knows {', '.join(TOPOLOGIES)})",
                           "rerun the tracking stage with this version") from None
