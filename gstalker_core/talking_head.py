"""The trained model: static Gaussians + audio encoder + face and torso deformation fields.

``TalkingHead.frames(conditions)`` turns per-frame conditions (audio features window,
eye openness, head pose, pose-track frame) into per-frame deformed Gaussian states that
``avatar.render_avatar`` composites. Training, evaluation and dubbing all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .avatar import GaussianState
from .config import DeformConfig
from .deform import AudioEncoder, FaceDeformField, TorsoDeformField, pose_condition, reference_pose
from .render.gaussians import GaussianModel


@dataclass
class FrameConditions:
    """What drives B frames."""

    audio: torch.Tensor  # (B, frame_window, step_window, n_features) audio feature windows
    eye: torch.Tensor  # (B,) eye openness, 1 = open
    viewmats: torch.Tensor  # (B, 4, 4) head-to-camera
    track_frames: torch.Tensor  # (B,) training-frame index whose torso latent to use, or NO_FRAME


# ``track_frames`` value of a pose that no training frame stands for (the held-out frames):
# such a frame shows the static fit's torso. The torso field explains the training frames'
# torso motion from pose and per-frame latent, so that the head need not absorb it, but
# held-out poses lie off the training ones (cnn_anchor_71s: median distance to the nearest
# training pose 0.028, against 0.016 between training frames a second apart) and there its
# extrapolation cost 0.05-0.19 dB of held-out PSNR in each of three configurations tried.
NO_FRAME = -1


def bounding_box(points: torch.Tensor, margin: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = points.min(dim=0).values, points.max(dim=0).values
    pad = (hi - lo).clamp_min(1e-6) * margin
    return lo - pad, hi + pad


class TalkingHead(nn.Module):
    def __init__(self, cfg: DeformConfig, head: GaussianModel, torso: GaussianModel, n_features: int,
                 step_window: int, train_viewmats: torch.Tensor):
        super().__init__()
        self.head, self.torso = head, torso
        self.audio_encoder = AudioEncoder(cfg, n_features, step_window)
        self.face_field = FaceDeformField(cfg, *bounding_box(head.means.detach()))
        self.torso_field = TorsoDeformField(cfg, len(train_viewmats), *bounding_box(torso.means.detach()))
        ref_r, ref_t = reference_pose(train_viewmats[:, :3, :3], train_viewmats[:, :3, 3])
        self.register_buffer("ref_rotation", ref_r)
        self.register_buffer("ref_translation", ref_t)

    def pose(self, viewmats: torch.Tensor) -> torch.Tensor:
        return pose_condition(viewmats[:, :3, :3], viewmats[:, :3, 3], self.ref_rotation, self.ref_translation)

    def frames(self, cond: FrameConditions, deform: bool = True) -> tuple[list[GaussianState], list[GaussianState]]:
        """Deformed head and torso states of each frame (the static fit when ``deform`` is False;
        the static torso where ``track_frames`` is ``NO_FRAME``)."""
        head, torso = GaussianState.of(self.head), GaussianState.of(self.torso)
        n = len(cond.viewmats)
        if not deform:
            return [head] * n, [torso] * n
        face = self.face_field(self.face_field.encode(head.means), self.audio_encoder(cond.audio), cond.eye)
        torsos = [torso] * n
        track = torch.as_tensor(cond.track_frames)
        known = track != NO_FRAME
        if known.any():
            body = self.torso_field(self.torso_field.encode(torso.means), self.pose(cond.viewmats[known]),
                                    self.torso_field.latent_for_track(track[known]))
            for i, state in zip(known.nonzero().flatten().tolist(), _apply(torso, body)):
                torsos[i] = state
        return _apply(head, face), torsos


def _apply(state: GaussianState, deltas) -> list[GaussianState]:
    means, quats, log_scales = deltas.apply(state.means, state.quats, state.log_scales)
    return [GaussianState(means[i], quats[i], log_scales[i], state.opacities, state.colors, state.sh_degree)
            for i in range(len(means))]


def eye_openness(blink: np.ndarray) -> np.ndarray:
    """The track's blink (0 open .. 1 closed) as the field's eye openness (1 open)."""
    return 1.0 - blink
