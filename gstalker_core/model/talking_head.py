"""The trained model: static Gaussians + audio encoder + face and torso deformation fields.

``TalkingHead.frames(conditions)`` turns per-frame conditions (audio features window,
eye openness, head pose, pose-track frame) into batched deformed Gaussian states that
``avatar.render_avatar`` composites in one rasteriser call per layer. Training, evaluation
and dubbing all go through it, with conditions built by ``conditions.FrameSource`` on the
model's device. ``frames`` never reads a tensor's value on the host: no device sync, and it
runs on the ``meta`` device (the tests' device-mixing check).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .avatar import GaussianState
from ..config import DeformConfig
from ..deform import AudioEncoder, FaceDeformField, TorsoDeformField, pose_condition, reference_pose
from ..deform.fields import DeformDeltas
from ..render.gaussians import GaussianModel


@dataclass
class FrameConditions:
    """What drives B frames."""

    audio: torch.Tensor  # (B, frame_window, step_window, n_features) audio feature windows
    eye: torch.Tensor  # (B,) eye openness, 1 = open
    viewmats: torch.Tensor  # (B, 4, 4) head-to-camera
    track_frames: torch.Tensor  # (B,) long: training-frame index whose torso latent to use, or NO_FRAME
    # (B,) in [0, 1]: how much each frame's voice speaks (0: a pause, where a lip motion's rest
    # closes the mouth); None: every frame speaks
    speaking: torch.Tensor | None = None


# ``track_frames`` value of a pose that no training frame stands for (the held-out frames):
# such a frame shows the static fit's torso. The torso field explains the training frames'
# torso motion from pose and per-frame latent, so that the head need not absorb it, but
# held-out poses lie off the training ones (cnn_anchor_71s: median distance to the nearest
# training pose 0.028, against 0.016 between training frames a second apart) and there its
# extrapolation cost 0.05-0.19 dB of held-out PSNR in each of three configurations tried.
NO_FRAME = -1


@dataclass
class CanonicalCodes:
    """The encodings of the static Gaussians' centres: the same for every frame, so a caller
    that renders many frames of fixed Gaussians (dubbing, evaluation) computes them once
    (EGSTalker's inference caches them alike); training recomputes them, since its
    gradients reach the tri-plane."""

    face: torch.Tensor  # (N_head, E) tri-plane features of the head centres
    torso: torch.Tensor  # (N_torso, E') frequency encoding of the torso centres


@dataclass
class LipMotion:
    """A gain on the audio-driven part of the face's motion (``model.lip_gain`` says why):
    deltas = r + gain (deltas - r) around the utterance's mean motion r = the deltas of the
    ``reference`` audio code (the utterance's mean code) with the same eye openness, plus
    ``mean_shift``: the field is not linear in the code, so the mean code's motion is not the
    utterance's mean motion (a gain around it moved the whole utterance's mouth). Then, in the
    voice's pauses, the ``rest``: deltas = rest + speaking (deltas - rest), where rest is the
    field's motion for the speaker's rest code with the same eye openness (the mouth closes)."""

    reference: torch.Tensor  # (code_dim,)
    gain: float
    mean_shift: DeformDeltas | None = None  # (1, N_head, ...): the utterance's mean deltas - the mean code's
    rest: torch.Tensor | None = None  # (code_dim,) the speaker's closed-mouth code; None: no rest in pauses


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

    def canonical_codes(self) -> CanonicalCodes:
        return CanonicalCodes(self.face_field.encode(self.head.means), self.torso_field.encode(self.torso.means))

    def frames(self, cond: FrameConditions, deform: bool = True, codes: CanonicalCodes | None = None,
               lip: LipMotion | None = None) -> tuple[GaussianState, GaussianState]:
        """Head and torso states of the B frames: batched deformed states, or the shared
        static fit when ``deform`` is False. A ``NO_FRAME`` frame gets the static torso (its
        torso deltas are zeroed, which leaves the static attributes exactly). ``codes``: the
        ``canonical_codes()`` of these Gaussians, when the caller keeps them; ``lip``: a gain
        on the audio-driven motion (none: as trained)."""
        head, torso = GaussianState.of(self.head), GaussianState.of(self.torso)
        if not deform:
            return head, torso
        codes = codes or self.canonical_codes()
        face = self.face_deltas(codes.face, self.audio_encoder(cond.audio), cond.eye, lip, cond.speaking)
        known = cond.track_frames != NO_FRAME
        body = self.torso_field(codes.torso, self.pose(cond.viewmats),
                                self.torso_field.latent_for_track(cond.track_frames.clamp_min(0)))
        return head.deformed(*face.apply(head.means, head.quats, head.log_scales)), \
            torso.deformed(*body.where(known).apply(torso.means, torso.quats, torso.log_scales))


    def face_deltas(self, encoded: torch.Tensor, audio: torch.Tensor, eye: torch.Tensor, lip: LipMotion | None,
                    speaking: torch.Tensor | None = None) -> DeformDeltas:
        """The face field's deltas for audio codes ``audio`` (B, code_dim), with ``lip``'s gain
        and, where ``speaking`` (B,) is under 1, its rest: the frames, their reference and their
        rest in one field call of up to 3B conditions."""
        gained = lip is not None and lip.gain != 1.0
        resting = lip is not None and lip.rest is not None and speaking is not None
        if not (gained or resting):
            return self.face_field(encoded, audio, eye)
        codes = [audio]
        if gained:
            codes.append(lip.reference.to(audio).expand_as(audio))
        if resting:
            codes.append(lip.rest.to(audio).expand_as(audio))
        every = self.face_field(encoded, torch.cat(codes), eye.repeat(len(codes)))
        shifts = lip.mean_shift.parts() if gained and lip.mean_shift is not None else (None,) * 3
        moved = []
        for part, shift in zip(every.parts(), shifts):
            d, *others = part.split(len(audio))
            if gained:
                r = others.pop(0)
                r = r if shift is None else r + shift.to(r)
                d = r + lip.gain * (d - r)
            if resting:
                rest = others.pop(0)
                d = rest + speaking.to(d)[:, None, None] * (d - rest)
            moved.append(d)
        return DeformDeltas(*moved)


def eye_openness(blink: np.ndarray) -> np.ndarray:
    """The track's blink (0 open .. 1 closed) as the field's eye openness (1 open)."""
    return 1.0 - blink
