"""Per-frame labels {0 background, 1 head (face + hair), 2 neck, 3 torso} from the person
mask and the face mesh, no face-parsing network.

Geometry, in a head-aligned 2D frame (origin at the chin, ``up`` = chin -> forehead):
- head: person pixels above the jaw curve; beyond the jaw angles (ears, hair) the curve
  continues flat at the angles' height, so ears and all hair above are head;
- neck: other person pixels within ``neck_half_width`` face widths of the chin axis, down
  to ``neck_length`` face heights below the chin;
- torso: the remaining person pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from .topology import Topology

BACKGROUND, HEAD, NECK, TORSO = 0, 1, 2, 3


class Parser:
    """Labels for one resolution (the pixel grid is built once)."""

    def __init__(self, height: int, width: int, neck_half_width: float, neck_length: float, topology: Topology):
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
        self._pix = np.stack([xs.ravel(), ys.ravel()], axis=1)
        self.shape = (height, width)
        self.neck_half_width = neck_half_width
        self.neck_length = neck_length
        self.topology = topology

    def labels(self, person: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(H, W) uint8 labels from a boolean person mask and (P, >=2) pixel landmarks."""
        topology = self.topology
        chin, top = landmarks[topology.chin, :2], landmarks[topology.top, :2]
        up = top - chin
        chin_to_top = float(np.linalg.norm(up)) or 1.0
        up /= chin_to_top
        face_height = topology.face_height_per_top * chin_to_top
        right = np.array([-up[1], up[0]])  # image +x for an upright head (y is down)
        rel = self._pix - chin
        across, along = rel @ right, rel @ up
        jaw = (landmarks[topology.jaw, :2] - chin) @ np.stack([right, up], axis=1)
        order = np.argsort(jaw[:, 0])
        jaw_along = np.interp(across, jaw[order, 0], jaw[order, 1])  # flat beyond the jaw ends
        face_width = float(jaw[:, 0].max() - jaw[:, 0].min()) or 1.0
        head = along >= jaw_along
        neck = (np.abs(across) <= self.neck_half_width * face_width) & (along >= -self.neck_length * face_height)
        out = np.where(head, HEAD, np.where(neck, NECK, TORSO)).astype(np.uint8).reshape(self.shape)
        out[~person] = BACKGROUND
        return out


# How far (a fraction of the frame height) the torso layer's target reaches up behind the head
# from the top of the neck/torso below it. The head moves over a still body: when it rises or
# turns off the training poses, the pixels its chin covered must show neck, not the plate. A
# head crop's chin travels a few percent of the frame in speech; 12% leaves a margin.
BEHIND_HEAD_BAND = 0.12
# neck rows averaged for the colour continued behind the head
BEHIND_HEAD_COLOUR_ROWS = 3


def behind_head(labels: np.ndarray, img: np.ndarray, band: float = BEHIND_HEAD_BAND
                ) -> tuple[np.ndarray, np.ndarray]:
    """Head pixels that the torso layer must also cover, and the colour it should show there.

    Per column, the head pixels within ``band`` x H rows above the topmost neck/torso pixel
    that lies under the head; their colour is that column's neck colour (the mean of its top
    rows), continued upward. Returns a boolean (H, W) mask and float (H, W, 3) colours.
    """
    height = labels.shape[0]
    body = (labels == NECK) | (labels == TORSO)
    head = labels == HEAD
    rows = np.arange(height)[:, None]
    # the first body row under the lowest head pixel of each column
    lowest_head = np.where(head.any(0), height - 1 - np.argmax(head[::-1], 0), -1)
    below = body & (rows > lowest_head)
    has_body = below.any(0) & (lowest_head >= 0)
    top = np.argmax(below, 0)
    reach = max(1, int(round(band * height)))
    mask = head & has_body & (rows >= top - reach) & (rows < top)
    colour_rows = np.clip(top + np.arange(BEHIND_HEAD_COLOUR_ROWS)[:, None], 0, height - 1)
    cols = np.arange(labels.shape[1])
    picked = img[colour_rows, cols]  # (rows, W, 3)
    valid = below[colour_rows, cols][..., None]
    colour = (picked * valid).sum(0) / np.maximum(valid.sum(0), 1)
    return mask, np.broadcast_to(colour, img.shape)


def silhouette_ring(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The background pixels that touch the person (8-neighbourhood), split by what they touch:
    those beside the head, and the others (beside the neck or torso). In the video a pixel on the
    silhouette mixes the person with the plate, so the labels' edge falls inside that mix; the
    layers own this ring (alpha 1, the frame's colour there) so that a render is opaque right up
    to the person's edge, and a pose that moves the silhouette by under a pixel shows no plate
    through it. Returns two boolean (H, W) masks."""
    kernel = np.ones((3, 3), np.uint8)
    background = labels == BACKGROUND
    head_ring = background & (cv2.dilate((labels == HEAD).astype(np.uint8), kernel) > 0)
    body = ((labels == NECK) | (labels == TORSO)).astype(np.uint8)
    body_ring = background & ~head_ring & (cv2.dilate(body, kernel) > 0)
    return head_ring, body_ring


def compose_targets(frame: np.ndarray, labels: np.ndarray, plate: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth for the head-only and torso-only renders, built on the fly in training.

    head_rgb: the frame's head pixels over the plate; head_alpha: 1 on head pixels.
    torso_rgb: the frame's neck + torso pixels over the plate; torso_alpha: 1 on neck + torso.
    Each layer also owns the silhouette ring beside its pixels (``silhouette_ring``).
    Behind the lower head (``behind_head``) the torso target continues the neck upward, so
    that the body has something behind the chin when the head moves; elsewhere under the head
    it is the plate (the torso render must not learn the head).
    The full frame is recovered as head over torso over plate. Inputs: frame and plate
    (H, W, 3) uint8 or float, labels (H, W) uint8; outputs float32, colours in [0, 1].
    """
    scale = 255.0 if frame.dtype == np.uint8 else 1.0
    img = frame.astype(np.float32) / scale
    bg = plate.astype(np.float32) / (255.0 if plate.dtype == np.uint8 else 1.0)
    head_ring, body_ring = silhouette_ring(labels)
    head_alpha = ((labels == HEAD) | head_ring).astype(np.float32)
    hidden_neck, neck_colour = behind_head(labels, img)
    torso_alpha = ((labels == NECK) | (labels == TORSO) | body_ring | hidden_neck).astype(np.float32)
    head_rgb = np.where(head_alpha[..., None] > 0, img, bg)
    torso_rgb = np.where(hidden_neck[..., None], neck_colour, np.where(torso_alpha[..., None] > 0, img, bg))
    return head_rgb, head_alpha, torso_rgb, torso_alpha
