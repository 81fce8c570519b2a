"""Per-frame inputs on one device: the one place where a clip's or a dub's arrays become the
tensors that training, evaluation and dubbing feed the model and the rasteriser.

A ``FrameSource`` holds a pose track (world-to-camera matrices, blinks and torso shifts),
the camera intrinsics, the background plate and, where there is audio, the audio features. Its
``conditions`` pick, for B frames, the audio windows of some frames and the poses of others:
- training: the frames' own audio, poses and torso latents;
- evaluation: a held-out frame's audio (or its nearest training frame's) at its own pose
  and torso shift, with the static torso (``NO_FRAME``);
- dubbing: the new audio's frames at the poses of the training frames the pose track
  extends over, with those frames' torso latents.
``render`` draws deformed states at pose-track frames; ``targets`` turns dataset samples into the layer targets of the photometric loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..model.avatar import GaussianState, Layers, render_avatar
from ..model.talking_head import NO_FRAME, FrameConditions, TalkingHead, eye_openness
from ..tracking import compose_targets


# share of training frames that hear a pitch-shifted version of their audio
AUGMENTED_SHARE = 0.5


def to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


@dataclass
class FrameSource:
    viewmats: torch.Tensor  # (T, 4, 4) float32 pose track (head-to-camera)
    eye: torch.Tensor  # (T,) float32 eye openness, 1 = open
    K: torch.Tensor  # (3, 3) float32
    plate: torch.Tensor  # (H, W, 3) float32 in [0, 1]
    # (T, 2) float32 pixels, where the torso layer is drawn (tracking.torso); None: where it was fitted
    torso_shift: torch.Tensor | None
    # (steps, spec width) audio features (bands, then loudness), 2 steps per frame; None: no audio
    features: np.ndarray | None
    augmented: np.ndarray | None = None  # (V, steps, spec width) pitch-shifted versions of the training audio
    maskable_bands: int | None = None  # the leading feature columns frequency masks may hide (None: all)
    # (T,) float32 per audio frame, 1 where the voice speaks, 0 in its pauses (audio.speaking): where
    # a lip motion has a rest, the mouth rests there; None: the voice never pauses (training)
    speaking: np.ndarray | None = None

    @classmethod
    def build(cls, viewmats: np.ndarray, blink: np.ndarray, K: np.ndarray, plate: np.ndarray,
              device: torch.device, features: np.ndarray | None = None,
              augmented: np.ndarray | None = None, torso_shift: np.ndarray | None = None,
              maskable_bands: int | None = None, speaking: np.ndarray | None = None) -> "FrameSource":
        """``torso_shift``: (T, 2) per pose-track frame; none (or all zero): the torso never moves,
        and its one image serves every frame. ``maskable_bands``: the spectral bands among the
        feature columns (the spec's ``n_features``; its loudness column follows them)."""
        moves = torso_shift is not None and bool(np.any(torso_shift))
        return cls(viewmats=to_device(viewmats, device, torch.float32),
                   eye=to_device(eye_openness(blink), device, torch.float32), K=to_device(K, device, torch.float32),
                   plate=to_device(plate, device, torch.float32) / 255.0,
                   torso_shift=to_device(torso_shift, device, torch.float32) if moves else None, features=features,
                   augmented=augmented, maskable_bands=maskable_bands, speaking=speaking)

    def draw_voices(self, rng: np.random.Generator, n: int) -> np.ndarray | None:
        """For ``n`` training frames, which version of their audio to hear: 0 the original (half
        of them), k the k-th pitch-shifted one; None without shifted versions."""
        if self.augmented is None or len(self.augmented) == 0:
            return None
        return np.where(rng.random(n) < AUGMENTED_SHARE, rng.integers(1, len(self.augmented) + 1, n), 0)

    def draw_hidden_bands(self, rng: np.random.Generator, masked: np.ndarray | None, n_masks: int,
                          share: float) -> np.ndarray | None:
        """SpecAugment's frequency masking of the frames where ``masked`` (n,) is True:
        (n, features width) bool, True on the bands a frame's audio window hides (never the loudness),
        ``n_masks`` runs of up to ``share`` of the bands at random places; None when off (or
        ``masked`` None). A hidden band reads 0, which in utterance-normalised log-mel (the
        default) is the band's mean over the utterance's speech, so the lips learn to follow
        more than one voice's spectral detail. Which frames are masked is the training steps'
        choice (``train_deform``)."""
        if masked is None or n_masks == 0:
            return None
        n_bands = self.features.shape[1] if self.maskable_bands is None else self.maskable_bands
        max_width = round(share * n_bands)
        if max_width == 0:
            return None
        widths = rng.integers(0, max_width + 1, (len(masked), n_masks))
        starts = rng.integers(0, n_bands - widths + 1)
        columns = np.arange(self.features.shape[1])  # a column past the bands (the loudness) is never hidden
        hidden = ((columns >= starts[..., None]) & (columns < (starts + widths)[..., None])).any(axis=1)
        return hidden & np.asarray(masked, bool)[:, None]

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    def conditions(self, model: TalkingHead, audio_frames, poses=None, track=None, voices=None,
                   hidden_bands=None, pauses=None) -> FrameConditions:
        """Conditions of B frames: the audio windows around ``audio_frames`` (in the versions
        ``voices`` of ``draw_voices``, default the original; the bands ``hidden_bands`` of
        ``draw_hidden_bands`` hidden, default none), the pose and blink of pose-track
        frames ``poses`` (default: ``audio_frames``), the torso latents of training frames
        ``track`` (default: none, the static torso), and where some of the frames ``pauses``
        (default: ``audio_frames``) lie in the voice's pauses, how much each speaks (the
        evaluation's nearest-neighbour baseline borrows training audio but rests where the
        held-out audio pauses)."""
        audio_frames = np.asarray(audio_frames, dtype=np.int64)
        poses = audio_frames if poses is None else np.asarray(poses, dtype=np.int64)
        track = np.full(len(audio_frames), NO_FRAME) if track is None else np.asarray(track, dtype=np.int64)
        known = track[track != NO_FRAME]
        n_latents = model.torso_field.n_train_frames
        if known.size and (known.min() < 0 or known.max() >= n_latents):
            raise InputError(f"pose track indices span {known.min()}..{known.max()}, but the model has "
                             f"{n_latents} training frames",
                             "build the pose track from this model's training track (pose_track_indices)")
        index = to_device(poses, self.device)
        audio = self._audio_windows(model, audio_frames, voices)
        if hidden_bands is not None:
            audio = audio.masked_fill(to_device(hidden_bands, audio.device)[:, None, None, :], 0.0)
        speaking = None if self.speaking is None else \
            self.speaking[audio_frames if pauses is None else np.asarray(pauses, dtype=np.int64)]
        return FrameConditions(audio=audio, eye=self.eye[index],
                               viewmats=self.viewmats[index], track_frames=to_device(track, self.device),
                               speaking=None if speaking is None or np.all(speaking >= 1.0)
                               else to_device(speaking, self.device, torch.float32))

    def render(self, head: GaussianState, torso: GaussianState, poses, backend: str = "auto") -> Layers:
        """``render_avatar`` of (deformed) states at pose-track frames ``poses``: their cameras,
        and their torso shifts."""
        index = to_device(np.asarray(poses, dtype=np.int64), self.device)
        return render_avatar(head, torso, self.viewmats[index], self.K, self.plate, backend=backend,
                             torso_shift=None if self.torso_shift is None else self.torso_shift[index])

    def _audio_windows(self, model: TalkingHead, audio_frames: np.ndarray, voices: np.ndarray | None) -> torch.Tensor:
        windows = model.audio_encoder.windows(self.features, audio_frames)
        for voice in np.unique(voices[voices > 0]) if voices is not None else ():
            pick = np.nonzero(voices == voice)[0]
            windows[to_device(pick, windows.device)] = model.audio_encoder.windows(self.augmented[voice - 1],
                                                                                 audio_frames[pick])
        return windows

    def targets(self, samples) -> dict[str, torch.Tensor]:
        """(B, H, W, C) float32 targets of dataset samples on the device: the frame, and each
        layer's colour and alpha (``tracking.compose_targets``) over this plate. Only the uint8
        frames and labels travel (4 bytes a pixel against the targets' 44): composed on the CPU
        and uploaded as float32, a 512 px training step's targets cost a GPU more host time and
        copying than its rendering (bench/RESULTS.md, 2026-12-04)."""
        rgb = torch.stack([s.rgb for s in samples]).to(self.device).float() / 255.0
        labels = torch.stack([s.labels for s in samples]).to(self.device)
        head_rgb, head_alpha, torso_rgb, torso_alpha = compose_targets(rgb, labels, self.plate)
        return {"rgb": rgb, "head_rgb": head_rgb, "head_alpha": head_alpha[..., None],
                "torso_rgb": torso_rgb, "torso_alpha": torso_alpha[..., None]}
