"""The speaker's scene: head Gaussians over torso Gaussians over a static background plate.

- Head Gaussians live in the head's canonical (template) frame: the head is static there
  and each frame's tracked world-to-camera ``viewmat`` moves the camera around it.
- Torso Gaussians (neck, shoulders) live in camera space (identity view): the camera is
  fixed relative to the body; the torso field moves them with the head pose.
- The background plate is the tracked clip's static background.

Every consumer (static fit, deformation training, evaluation, dubbing) renders through
``render_avatar``, so the composition is defined in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..render.gaussians import GaussianModel
from ..render.rasterize import rasterization


@dataclass
class GaussianState:
    """Activated Gaussian parameters, as the rasteriser takes them: one set shared by every
    frame, or a deformed set per frame (``batched``: means, quats and log-scales with a
    leading frame dimension B; opacities and colours stay shared)."""

    means: torch.Tensor  # (N, 3) or (B, N, 3)
    quats: torch.Tensor  # (N, 4) or (B, N, 4) w, x, y, z (normalised by the rasteriser)
    log_scales: torch.Tensor  # (N, 3) or (B, N, 3)
    opacities: torch.Tensor  # (N,) in [0, 1]
    colors: torch.Tensor  # (N, K, 3) SH coefficients
    sh_degree: int

    @classmethod
    def of(cls, model: GaussianModel) -> "GaussianState":
        return cls(model.means, model.quats, model.log_scales, torch.sigmoid(model.opacity_logits),
                   model.sh_coefficients(), model.sh_degree)

    @property
    def batched(self) -> bool:
        return self.means.dim() == 3

    def deformed(self, means: torch.Tensor, quats: torch.Tensor, log_scales: torch.Tensor) -> "GaussianState":
        """The per-frame set with these (B, N, ...) attributes."""
        return GaussianState(means, quats, log_scales, self.opacities, self.colors, self.sh_degree)

    def frame(self, i: int) -> "GaussianState":
        """Frame ``i`` of a batched set, as a shared set (what a reader of one frame wants)."""
        return GaussianState(self.means[i], self.quats[i], self.log_scales[i], self.opacities, self.colors,
                             self.sh_degree)


@dataclass
class Layers:
    """One rendered batch: (B, H, W, C) images in [0, 1]."""

    rgb: torch.Tensor  # composite: head over torso over plate
    head_rgb: torch.Tensor  # premultiplied (black background)
    head_alpha: torch.Tensor  # (B, H, W, 1)
    torso_rgb: torch.Tensor
    torso_alpha: torch.Tensor
    head_meta: dict
    torso_meta: dict

    @property
    def alpha(self) -> torch.Tensor:
        """(B, H, W, 1) opacity of head over torso: where it falls short of 1 the plate shows
        through the composite."""
        return 1 - (1 - self.head_alpha) * (1 - self.torso_alpha)


def _render(state: GaussianState, viewmats: torch.Tensor, Ks: torch.Tensor, size: int, backend: str):
    """One rasteriser call for all of ``viewmats``' cameras (``Ks`` (3, 3) for all, or one
    each); a batched state gives camera c its own frame's Gaussians."""
    cameras = len(viewmats)
    opacities, colors = state.opacities, state.colors
    if state.batched:
        opacities, colors = opacities.expand(cameras, *opacities.shape), colors.expand(cameras, *colors.shape)
    return rasterization(state.means, state.quats, torch.exp(state.log_scales), opacities, colors, viewmats,
                         Ks.expand(cameras, 3, 3), size, size, sh_degree=state.sh_degree, backend=backend)


def shifted_intrinsics(K: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) copies of ``K`` whose principal point moves by ``shift`` (B, 2) pixels: a layer
    drawn with them is its image moved by exactly that much, whatever each point's depth."""
    Ks = K.expand(len(shift), 3, 3).clone()
    Ks[:, :2, 2] += shift.to(K.dtype)
    return Ks


def render_avatar(head: GaussianState, torso: GaussianState, viewmats: torch.Tensor, K: torch.Tensor,
                  plate: torch.Tensor, backend: str = "auto", torso_shift: torch.Tensor | None = None) -> Layers:
    """Render B frames, each layer in one rasteriser call. ``head``/``torso``: one state shared
    by all frames, or a batched state of B deformed frames; ``viewmats`` (B, 4, 4)
    head-to-camera; ``K`` (3, 3); ``plate`` (H, W, 3); ``torso_shift`` (B, 2): where the
    torso layer is drawn, in pixels (``tracking.torso``; none: where it was fitted); all on one device."""
    size, frames = plate.shape[0], len(viewmats)
    head_rgb, head_alpha, head_meta = _render(head, viewmats, K, size, backend)
    # the camera-space torso: one image for every frame, drawn once, unless it moves
    once = not torso.batched and torso_shift is None
    identity = torch.eye(4, dtype=viewmats.dtype, device=viewmats.device).expand(1 if once else frames, 4, 4)
    torso_K = K if torso_shift is None else shifted_intrinsics(K, torso_shift)
    torso_rgb, torso_alpha, torso_meta = _render(torso, identity, torso_K, size, backend)
    if once:
        torso_rgb, torso_alpha = torso_rgb.expand(frames, -1, -1, -1), torso_alpha.expand(frames, -1, -1, -1)
    lower = torso_rgb + (1 - torso_alpha) * plate
    rgb = head_rgb + (1 - head_alpha) * lower
    return Layers(rgb, head_rgb, head_alpha, torso_rgb, torso_alpha, head_meta, torso_meta)
