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

from .render.gaussians import GaussianModel
from .render.rasterize import rasterization


@dataclass
class GaussianState:
    """Activated Gaussian parameters of one frame, as the rasteriser takes them."""

    means: torch.Tensor  # (N, 3)
    quats: torch.Tensor  # (N, 4) w, x, y, z (normalised by the rasteriser)
    log_scales: torch.Tensor  # (N, 3)
    opacities: torch.Tensor  # (N,) in [0, 1]
    colors: torch.Tensor  # (N, K, 3) SH coefficients
    sh_degree: int

    @classmethod
    def of(cls, model: GaussianModel) -> "GaussianState":
        return cls(model.means, model.quats, model.log_scales, torch.sigmoid(model.opacity_logits),
                   model.sh_coefficients(), model.sh_degree)


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


def _render(state: GaussianState, viewmats: torch.Tensor, K: torch.Tensor, size: int, backend: str):
    colors, alphas, meta = rasterization(
        state.means, state.quats, torch.exp(state.log_scales), state.opacities, state.colors, viewmats,
        K.expand(len(viewmats), 3, 3), size, size, sh_degree=state.sh_degree, backend=backend)
    return colors, alphas, meta


def render_avatar(head: GaussianState | list[GaussianState], torso: GaussianState | list[GaussianState],
                  viewmats: torch.Tensor, K: torch.Tensor, plate: torch.Tensor, backend: str = "auto") -> Layers:
    """Render B frames. ``head``/``torso``: one state shared by all frames, or one per frame
    (deformed); ``viewmats`` (B, 4, 4) head-to-camera; ``K`` (3, 3); ``plate`` (H, W, 3)."""
    size = plate.shape[0]
    identity = torch.eye(4, dtype=viewmats.dtype, device=viewmats.device)[None]
    heads = head if isinstance(head, list) else None
    torsos = torso if isinstance(torso, list) else None
    if heads is None:
        head_rgb, head_alpha, head_meta = _render(head, viewmats, K, size, backend)
    else:  # a deformed state per frame: one rasteriser call each
        outs = [_render(h, viewmats[i:i + 1], K, size, backend) for i, h in enumerate(heads)]
        head_rgb, head_alpha = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        head_meta = {"per_frame": [o[2] for o in outs]}
    if torsos is None:
        torso_rgb, torso_alpha, torso_meta = _render(torso, identity, K, size, backend)
        torso_rgb, torso_alpha = torso_rgb.expand(len(viewmats), -1, -1, -1), torso_alpha.expand(len(viewmats), -1, -1, -1)
    else:
        outs = [_render(t, identity, K, size, backend) for t in torsos]
        torso_rgb, torso_alpha = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        torso_meta = {"per_frame": [o[2] for o in outs]}
    lower = torso_rgb + (1 - torso_alpha) * plate
    rgb = head_rgb + (1 - head_alpha) * lower
    return Layers(rgb, head_rgb, head_alpha, torso_rgb, torso_alpha, head_meta, torso_meta)
