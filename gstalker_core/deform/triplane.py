"""Tri-plane hash encoding of 3D points (ER-NeRF's encoder, GSTalker's deformation input).

A point is normalised to the head's bounding box ([bbox_min, bbox_max] -> [0, 1]^3, clamped)
and projected onto the XY, YZ and XZ planes; each plane has its own multi-resolution hash
grid and the three encodings are concatenated: (N, 3) -> (N, 3 * L * F), plane-major
(XY's L*F features, then YZ's, then XZ's).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..config import DeformConfig
from .hashgrid import make_hash_grid

PLANE_AXES = ((0, 1), (1, 2), (0, 2))  # XY, YZ, XZ


class BoxNormaliser(nn.Module):
    """Maps points in an axis-aligned box to [0, 1]^3 (clamped); the box is saved with the model."""

    def __init__(self, bbox_min, bbox_max):
        super().__init__()
        lo = torch.as_tensor(bbox_min, dtype=torch.float32).reshape(3)
        hi = torch.as_tensor(bbox_max, dtype=torch.float32).reshape(3)
        if not bool((hi > lo).all()):
            raise InputError(f"bounding box is empty or inverted: min {lo.tolist()}, max {hi.tolist()}",
                             "pass a box with bbox_max > bbox_min on every axis (e.g. the static fit's extent)")
        self.register_buffer("bbox_min", lo)
        self.register_buffer("bbox_max", hi)

    @property
    def extent(self) -> torch.Tensor:
        return self.bbox_max - self.bbox_min

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return ((points - self.bbox_min) / self.extent).clamp(0, 1)


class TriPlaneEncoder(nn.Module):
    """``forward(points (N, 3)) -> (N, 3 * hash_levels * hash_features)``."""

    def __init__(self, cfg: DeformConfig, bbox_min, bbox_max):
        super().__init__()
        self.normalise = BoxNormaliser(bbox_min, bbox_max)
        self.planes = make_hash_grid(cfg.grid_backend, 3, cfg.hash_levels, cfg.hash_features, cfg.hash_log2_table,
                                     cfg.hash_base_resolution, cfg.hash_max_resolution)
        self.output_dim = 3 * self.planes.output_dim

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        unit = self.normalise(points)
        projected = torch.stack([unit[:, list(axes)] for axes in PLANE_AXES])  # (3, N, 2)
        per_plane = self.planes(projected)  # (3, N, L*F)
        return per_plane.permute(1, 0, 2).reshape(len(points), self.output_dim)
