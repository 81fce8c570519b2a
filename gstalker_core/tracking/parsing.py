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

import numpy as np
import torch
import torch.nn.functional as F

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


def behind_head(labels: torch.Tensor, img: torch.Tensor, band: float = BEHIND_HEAD_BAND
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Head pixels that the torso layer must also cover, and the colour it should show there.

    Per column, the head pixels within ``band`` x H rows above the topmost neck/torso pixel
    that lies under the head; their colour is that column's neck colour (the mean of its top
    rows), continued upward. ``labels`` (B, H, W), ``img`` (B, H, W, 3) float; returns a boolean
    (B, H, W) mask and float (B, H, W, 3) colours.
    """
    n, height, width = labels.shape
    body = (labels == NECK) | (labels == TORSO)
    head = labels == HEAD
    rows = torch.arange(height, device=labels.device)[:, None]
    # the first body row under the lowest head pixel of each column (argmax: the first maximum)
    lowest_head = torch.where(head.any(1), height - 1 - head.flip(1).byte().argmax(1), -1)
    below = body & (rows > lowest_head[:, None])
    has_body = below.any(1) & (lowest_head >= 0)
    top = below.byte().argmax(1)[:, None]  # (B, 1, W)
    reach = max(1, int(round(band * height)))
    mask = head & has_body[:, None] & (rows >= top - reach) & (rows < top)
    offsets = torch.arange(BEHIND_HEAD_COLOUR_ROWS, device=labels.device)[:, None]
    colour_rows = (top + offsets).clamp(0, height - 1)  # (B, rows, W)
    picked = img.gather(1, colour_rows[..., None].expand(-1, -1, -1, img.shape[-1]))
    valid = below.gather(1, colour_rows)[..., None]
    colour = (picked * valid).sum(1) / valid.sum(1).clamp_min(1)
    return mask, colour[:, None].expand(n, height, width, img.shape[-1])


def silhouette_ring(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The background pixels that touch the person (8-neighbourhood), split by what they touch:
    those beside the head, and the others (beside the neck or torso). In the video a pixel on the
    silhouette mixes the person with the plate, so the labels' edge falls inside that mix; the
    layers own this ring (alpha 1, the frame's colour there) so that a render is opaque right up
    to the person's edge, and a pose that moves the silhouette by under a pixel shows no plate
    through it. ``labels`` (B, H, W); returns two boolean (B, H, W) masks."""
    def touches(mask: torch.Tensor) -> torch.Tensor:  # a 3x3 dilation; the border adds nothing
        return F.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0

    background = labels == BACKGROUND
    head_ring = background & touches(labels == HEAD)
    body_ring = background & ~head_ring & touches((labels == NECK) | (labels == TORSO))
    return head_ring, body_ring


def compose_targets(frames: torch.Tensor, labels: torch.Tensor, plate: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground truth for the head-only and torso-only renders, built on the fly in training.

    head_rgb: the frame's head pixels over the plate; head_alpha: 1 on head pixels.
    torso_rgb: the frame's neck + torso pixels over the plate; torso_alpha: 1 on neck + torso.
    Each layer also owns the silhouette ring beside its pixels (``silhouette_ring``).
    Behind the lower head (``behind_head``) the torso target continues the neck upward, so
    that the body has something behind the chin when the head moves; elsewhere under the head
    it is the plate (the torso render must not learn the head).
    The full frame is recovered as head over torso over plate.

    Inputs on one device, where the targets are made (a training step's, so that only the uint8
    frames and labels travel to a GPU): frames (B, H, W, 3) and plate (H, W, 3), uint8 or float
    in [0, 1], labels (B, H, W) uint8. Outputs float32, colours in [0, 1]: head_rgb (B, H, W, 3),
    head_alpha (B, H, W), torso_rgb, torso_alpha.
    """
    img = frames.float() / (255.0 if frames.dtype == torch.uint8 else 1.0)
    bg = plate.float() / (255.0 if plate.dtype == torch.uint8 else 1.0)
    head_ring, body_ring = silhouette_ring(labels)
    head = (labels == HEAD) | head_ring
    hidden_neck, neck_colour = behind_head(labels, img)
    body = (labels == NECK) | (labels == TORSO) | body_ring | hidden_neck
    head_rgb = torch.where(head[..., None], img, bg)
    torso_rgb = torch.where(hidden_neck[..., None], neck_colour, torch.where(body[..., None], img, bg))
    return head_rgb, head.float(), torso_rgb, body.float()
