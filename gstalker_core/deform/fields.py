"""Deformation fields: per-Gaussian offsets of position, rotation and log-scale for a batch of frames.

- ``FaceDeformField``: MLP over [tri-plane features of the static head Gaussian centres,
  the frame's audio condition, the frame's eye openness].
- ``TorsoDeformField``: MLP over [a sin/cos encoding of the static torso Gaussian centres,
  the frame's head pose relative to the clip's reference pose, a per-training-frame latent].

Both split evaluation in two: ``encode(means)`` depends only on the static centres (compute it
once per step, shared by every frame of a batch), ``forward(encoded, per-frame conditions...)``
evaluates B frames at once -> ``DeformDeltas`` of shape (B, N, ...). Their first layer is split
the same way (point part computed once for N points, condition part once per frame), so a
batch of B frames costs B times only the hidden layers.

The last layer starts at zero: before training, every delta is exactly 0 and the deformed
Gaussians are the static fit; its weights still receive gradients.

Conventions of ``DeformDeltas.apply``:
- position: ``means + d_means``; the network predicts offsets in units of the bounding box
  extent (per axis), so learning rates do not depend on the scene's scale;
- rotation (quaternions w, x, y, z, as gsplat): ``q' = normalise((1, 0, 0, 0) + d_quats) * q``,
  a left multiplication, i.e. a world-space rotation of the Gaussian. Unlike adding to q, the
  effect does not depend on q's norm or sign, and a zero delta is exactly the identity;
- scale: ``log_scales + d_log_scales``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..config import DeformConfig
from .triplane import BoxNormaliser, TriPlaneEncoder

# first-layer activations (elements) of one inference block: 1M floats, 4 MB, about a core's share of L3
INFERENCE_ACTIVATIONS = 1 << 20
POSE_DIM = 9  # 6D rotation (first two columns of R_rel - I) + translation / reference distance


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of (..., 4) quaternions (w, x, y, z)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], dim=-1)


@dataclass
class DeformDeltas:
    """Offsets for B frames and N Gaussians."""

    d_means: torch.Tensor  # (B, N, 3), scene units
    d_quats: torch.Tensor  # (B, N, 4), added to the identity quaternion (w, x, y, z)
    d_log_scales: torch.Tensor  # (B, N, 3)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d_means, d_quats, d_log_scales), for arithmetic applied to each alike."""
        return self.d_means, self.d_quats, self.d_log_scales

    def where(self, frames: torch.Tensor) -> "DeformDeltas":
        """These deltas for the (B,) bool ``frames``, zero for the others."""
        keep = frames.to(self.d_means.dtype)[:, None, None]
        return DeformDeltas(*(part * keep for part in self.parts()))

    def apply(self, means: torch.Tensor, quats: torch.Tensor, log_scales: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static (N, ...) attributes -> deformed (B, N, ...) means, quaternions, log-scales."""
        identity = torch.zeros_like(self.d_quats)
        identity[..., 0] = 1
        rotation = nn.functional.normalize(identity + self.d_quats, dim=-1)
        return means + self.d_means, quat_multiply(rotation, quats.expand_as(rotation)), log_scales + self.d_log_scales


class ConditionedMLP(nn.Module):
    """(N, point_dim) point features and (B, cond_dim) frame conditions -> (B, N, out_dim).

    Equivalent to an MLP over the concatenation [point, condition] for every (frame, point)
    pair; the first layer is evaluated as point_in(points)[None] + cond_in(conditions)[:, None].
    """

    def __init__(self, point_dim: int, cond_dim: int, width: int, depth: int, out_dim: int):
        super().__init__()
        self.point_in = nn.Linear(point_dim, width)
        self.cond_in = nn.Linear(cond_dim, width, bias=False)
        self.hidden = nn.Sequential(*[layer for _ in range(depth - 1)
                                      for layer in (nn.Linear(width, width), nn.ReLU(inplace=True))])
        self.head = nn.Linear(width, out_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, points: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        point_part, cond_part = self.point_in(points), self.cond_in(conditions).unsqueeze(1)
        if torch.is_grad_enabled() or point_part.device.type != "cpu":
            return self._layers(point_part, cond_part)  # training (autograd keeps every activation), GPUs
        # CPU inference (dubbing, evaluation): blocks of points whose (B, block, width) activations
        # stay in the cache, instead of (B, N, width) tensors streamed through memory per layer
        block = max(1, INFERENCE_ACTIVATIONS // (len(conditions) * point_part.shape[1]))
        return torch.cat([self._layers(part, cond_part) for part in point_part.split(block)], dim=1)

    def _layers(self, point_part: torch.Tensor, cond_part: torch.Tensor) -> torch.Tensor:
        h = point_part.unsqueeze(0) + cond_part  # (B, N, width)
        # ReLUs in place to save (B, N, width) buffers; on 2D activations, because an in-place op on
        # the view a 3D nn.Linear returns makes autograd copy the whole tensor back (CopySlices)
        flat = h.relu_().flatten(0, 1)
        return self.head(self.hidden(flat)).view(len(cond_part), len(point_part), -1)


def _deltas(raw: torch.Tensor, position_scale: torch.Tensor) -> DeformDeltas:
    return DeformDeltas(d_means=raw[..., 0:3] * position_scale, d_quats=raw[..., 3:7], d_log_scales=raw[..., 7:10])


class FaceDeformField(nn.Module):
    """Audio- and blink-driven offsets of the head Gaussians.

    ``encode(means (N, 3)) -> (N, E)``; ``forward(encoded, audio (B, audio_dim), eye (B,)) -> DeformDeltas``.
    ``eye`` is the frame's eye openness (the blink track, scaled to about [0, 1]).
    """

    def __init__(self, cfg: DeformConfig, bbox_min, bbox_max):
        super().__init__()
        self.audio_dim = cfg.audio_code_dim
        self.encoder = TriPlaneEncoder(cfg, bbox_min, bbox_max)
        self.mlp = ConditionedMLP(self.encoder.output_dim, self.audio_dim + 1, cfg.face_mlp_width, cfg.face_mlp_depth,
                                  out_dim=10)

    def encode(self, means: torch.Tensor) -> torch.Tensor:
        return self.encoder(means)

    def forward(self, encoded: torch.Tensor, audio: torch.Tensor, eye: torch.Tensor) -> DeformDeltas:
        conditions = torch.cat([audio, eye.reshape(len(audio), 1).to(audio.dtype)], dim=-1)
        return _deltas(self.mlp(encoded, conditions), self.encoder.normalise.extent)


def frequency_encoding(unit: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """(N, 3) in [0, 1] -> (N, 3 + 6 * n_frequencies): the point and sin/cos of 2^k pi x, k < n_frequencies."""
    scales = (2.0 ** torch.arange(n_frequencies, device=unit.device, dtype=unit.dtype)) * torch.pi
    angles = (unit.unsqueeze(-1) * scales).flatten(1)  # (N, 3 * n_frequencies)
    return torch.cat([unit, torch.sin(angles), torch.cos(angles)], dim=-1)


def reference_pose(rotations: torch.Tensor, translations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip's mean head pose: chordal mean rotation (T, 3, 3) -> (3, 3) and mean translation (3,)."""
    u, _, vt = torch.linalg.svd(rotations.mean(dim=0))
    fix = torch.ones(3, dtype=rotations.dtype, device=rotations.device)
    fix[2] = torch.sign(torch.linalg.det(u @ vt))
    return u @ torch.diag(fix) @ vt, translations.mean(dim=0)


def pose_condition(rotations: torch.Tensor, translations: torch.Tensor, ref_rotation: torch.Tensor,
                   ref_translation: torch.Tensor) -> torch.Tensor:
    """(T, POSE_DIM) torso condition of world-to-camera poses (x_cam = R x + t) relative to a reference.

    R = R_rel R_ref; the 6D rotation is R_rel's first two columns minus the identity's, the
    translation is t - R_rel t_ref divided by the reference camera distance |t_ref|: the
    reference pose maps to zeros and the values do not depend on the scene's units.
    """
    rel = rotations @ ref_rotation.transpose(-1, -2)
    eye = torch.eye(3, dtype=rel.dtype, device=rel.device)
    six_d = (rel - eye)[..., :, :2].transpose(-1, -2).reshape(len(rel), 6)
    shift = translations - (rel @ ref_translation.unsqueeze(-1)).squeeze(-1)
    return torch.cat([six_d, shift / ref_translation.norm().clamp_min(1e-6)], dim=-1)


class TorsoDeformField(nn.Module):
    """Head-pose-driven offsets of the torso Gaussians, with a smooth per-training-frame latent.

    ``encode(means (N, 3)) -> (N, E)``; ``forward(encoded, pose (B, POSE_DIM), latent (B, latent_dim))``.
    Training takes ``latent = latent_for_track(frame indices)`` and adds ``latent_smoothness()``
    to the loss; at inference the latent comes from the pose track in use, which indexes
    training frames (e.g. ``dub_motion.pose_track_indices``).
    """

    def __init__(self, cfg: DeformConfig, n_train_frames: int, bbox_min, bbox_max):
        super().__init__()
        if n_train_frames < 1:
            raise InputError("the torso field needs at least one training frame", "train on a non-empty clip")
        self.n_frequencies = cfg.torso_frequencies
        self.normalise = BoxNormaliser(bbox_min, bbox_max)
        # zeros: a frame's latent only moves away from the shared one when the images ask for it
        self.latents = nn.Embedding(n_train_frames, cfg.torso_latent_dim)
        nn.init.zeros_(self.latents.weight)
        self.mlp = ConditionedMLP(3 + 6 * cfg.torso_frequencies, POSE_DIM + cfg.torso_latent_dim,
                                  cfg.torso_mlp_width, cfg.torso_mlp_depth, out_dim=10)

    def encode(self, means: torch.Tensor) -> torch.Tensor:
        return frequency_encoding(self.normalise(means), self.n_frequencies)

    @property
    def n_train_frames(self) -> int:
        return self.latents.num_embeddings

    def latent_for_track(self, frame_indices: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) latents of training frames ``frame_indices`` ((B,) long, on the model's
        device; ``conditions.FrameSource`` checks their range before they get there)."""
        return self.latents(frame_indices)

    def latent_smoothness(self) -> torch.Tensor:
        """Sum of squared differences between consecutive training frames' latents."""
        return (self.latents.weight[1:] - self.latents.weight[:-1]).square().sum()

    def forward(self, encoded: torch.Tensor, pose: torch.Tensor, latent: torch.Tensor) -> DeformDeltas:
        return _deltas(self.mlp(encoded, torch.cat([pose, latent.to(pose.dtype)], dim=-1)), self.normalise.extent)
