"""Audio condition of the face field: a per-frame conv encoder plus a learned temporal smoother.

Frame t's condition depends only on the audio around t, so it works on any new audio:
1. ``AudioFrameEncoder``: frame i's window of ``step_window`` audio steps (``audio.frame_windows``;
   frame i owns steps 2i, 2i+1 in the middle) -> a code of ``audio_code_dim`` (strided 1D convs
   over time, features as channels, down to one step, then a linear layer).
2. ``TemporalSmoother``: the codes of frames ``t + FRAME_OFFSETS`` (``t - w//2 .. t + w - w//2 - 1``,
   edge-clamped to the clip) -> attention weights (1D convs over the window, a linear layer,
   softmax) -> their weighted sum. The last linear layer starts at zero: training starts from a
   box filter over the window (AudioAttNet's idea, ER-NeRF / AD-NeRF).

So frame t reads audio steps ``2(t - w//2) - (s/2 - 1)`` .. ``2(t + w - w//2 - 1) + 1 + (s/2 - 1)``
(``w`` = frame_window, ``s`` = step_window), clamped to the clip; ``receptive_steps`` says so.

Two entry points compute identical numbers:
- training batches of arbitrary frames: ``audio_windows(features, frames, w, s)`` ->
  ``encoder(windows)``;
- a chunk of consecutive frames [a, b) (dubbing, evaluation, streaming): ``encoder.conditions(features, a, b)``
  encodes each needed frame once (frames a - w//2 .. b + w - w//2 - 2), instead of w times.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..audio import STEPS_PER_FRAME, frame_windows
from ..errors import InputError
from ..config import DeformConfig

LEAK = 0.02


def frame_offsets(frame_window: int) -> np.ndarray:
    """Offsets of the frames the smoother weighs for frame t: -w//2 .. w - w//2 - 1."""
    return np.arange(frame_window) - frame_window // 2


def receptive_steps(frame: int, frame_window: int, step_window: int) -> tuple[int, int]:
    """[first, last] audio step (before edge clamping) that frame ``frame``'s condition reads."""
    offsets = frame_offsets(frame_window)
    half = step_window // 2
    return ((frame + offsets[0]) * STEPS_PER_FRAME - (half - 1),
            (frame + offsets[-1]) * STEPS_PER_FRAME + 1 + (half - 1))


def _n_frames(features) -> int:
    n = len(features) // STEPS_PER_FRAME
    if n < 1:
        raise InputError(f"audio features hold {len(features)} steps, less than one video frame",
                         "use audio of at least 40 ms")
    return n


def audio_windows(features, frame_indices, frame_window: int, step_window: int):
    """(T, frame_window, step_window, n_features) step windows of each frame's neighbours, edge-clamped.

    ``features``: (n_steps, n_features), a numpy array or a tensor (the result is of the same kind).
    """
    frames = np.asarray(frame_indices, dtype=np.int64)
    neighbours = np.clip(frames[:, None] + frame_offsets(frame_window)[None, :], 0, _n_frames(features) - 1)
    windows = frame_windows(features, neighbours.reshape(-1), step_window)
    return windows.reshape(len(frames), frame_window, step_window, features.shape[-1])


class AudioFrameEncoder(nn.Module):
    """(..., step_window, n_features) -> (..., code_dim)."""

    def __init__(self, n_features: int, step_window: int, channels: int, code_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        width_in = n_features
        for _ in range(max(1, math.ceil(math.log2(step_window)))):  # each conv halves the steps (rounding up) down to 1
            layers += [nn.Conv1d(width_in, channels, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(LEAK)]
            width_in = channels
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(channels, code_dim)
        # Per-feature standardisation with the training audio's statistics (``set_feature_stats``),
        # saved with the model so new audio is scaled alike. Raw log-mel values (tens of dB) would
        # otherwise drive the downstream ReLUs into saturation, and the face would ignore the audio.
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        lead = windows.shape[:-2]
        x = ((windows - self.feature_mean) / self.feature_std).reshape(-1, *windows.shape[-2:]).transpose(1, 2)
        # tanh bounds the code: it conditions an MLP, whose units must not all die on loud input
        return torch.tanh(self.out(self.convs(x).squeeze(-1))).reshape(*lead, -1)


class TemporalSmoother(nn.Module):
    """(B, frame_window, code_dim) codes of a frame's neighbours -> (B, code_dim) learned weighted mean."""

    def __init__(self, code_dim: int, frame_window: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = code_dim
        while width > 1:  # halve the channels down to one score per window position
            layers += [nn.Conv1d(width, max(1, width // 2), kernel_size=3, padding=1), nn.LeakyReLU(LEAK)]
            width = max(1, width // 2)
        self.scores = nn.Sequential(*layers)
        self.mix = nn.Linear(frame_window, frame_window)
        nn.init.zeros_(self.mix.weight)  # start as a box filter: uniform weights whatever the codes
        nn.init.zeros_(self.mix.bias)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        scores = self.scores(codes.transpose(1, 2)).squeeze(1)  # (B, frame_window)
        weights = torch.softmax(self.mix(scores), dim=-1)
        return (weights.unsqueeze(-1) * codes).sum(dim=1)


class AudioEncoder(nn.Module):
    """Audio features -> per-frame condition of the face field (``code_dim`` = ``cfg.audio_code_dim``)."""

    def __init__(self, cfg: DeformConfig, n_features: int, step_window: int):
        super().__init__()
        self.n_features = n_features
        self.step_window = step_window
        self.frame_window = cfg.frame_window
        self.code_dim = cfg.audio_code_dim
        self.frame_encoder = AudioFrameEncoder(n_features, step_window, cfg.audio_channels, cfg.audio_code_dim)
        self.smoother = TemporalSmoother(cfg.audio_code_dim, cfg.frame_window)

    def set_feature_stats(self, features) -> None:
        """Standardise inputs with the (steps, n_features) training features' mean and std."""
        f = self._as_tensor(features)
        self.frame_encoder.feature_mean.copy_(f.mean(0))
        self.frame_encoder.feature_std.copy_(f.std(0).clamp_min(1e-3))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, frame_window, step_window, n_features) from ``audio_windows`` -> (B, code_dim)."""
        return self.smoother(self.frame_encoder(windows))

    def windows(self, features, frame_indices) -> torch.Tensor:
        """``audio_windows`` with this encoder's window sizes, as a tensor on its device."""
        self._check_features(features)
        return self._as_tensor(audio_windows(features, frame_indices, self.frame_window, self.step_window))

    def conditions(self, features, start: int, stop: int) -> torch.Tensor:
        """(stop - start, code_dim) conditions of consecutive frames [start, stop), each frame encoded once.

        Reads only the audio steps of frames ``start - w//2 .. stop + w - w//2 - 2`` (edge-clamped);
        equal to ``self(self.windows(features, range(start, stop)))``.
        """
        self._check_features(features)
        n_frames = _n_frames(features)
        if not 0 <= start < stop <= n_frames:
            raise InputError(f"frame range [{start}, {stop}) is outside the audio's {n_frames} frames",
                             f"ask for frames within [0, {n_frames})")
        offsets = frame_offsets(self.frame_window)
        needed = np.clip(np.arange(start + offsets[0], stop + offsets[-1]), 0, n_frames - 1)
        codes = self.frame_encoder(self._as_tensor(frame_windows(features, needed, self.step_window)))
        neighbours = codes.unfold(0, self.frame_window, 1).transpose(1, 2)  # (stop - start, w, code_dim)
        return self.smoother(neighbours)

    def _check_features(self, features) -> None:
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise InputError(f"audio features have shape {tuple(features.shape)}, the model expects "
                             f"(steps, {self.n_features})",
                             "extract features with the model's audio feature spec")

    def _as_tensor(self, array) -> torch.Tensor:
        param = self.smoother.mix.weight
        return torch.as_tensor(array).to(device=param.device, dtype=param.dtype)
