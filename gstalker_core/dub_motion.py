"""Head pose / blink tracks for audio of any length.

A dubbed video reuses the training clip's real head motion and blinks. The track is
extended by ping-pong over a stretch of training frames (forward, then backward, ...):
consecutive output frames are always neighbouring training frames, so there is never a
jump, whatever the length of the audio.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def ping_pong_indices(n_out: int, start: int, stop: int) -> np.ndarray:
    """Training-frame index for each of ``n_out`` output frames, bouncing within [start, stop)."""
    length = stop - start
    if length < 1:
        raise InputError(f"the pose stretch [{start}, {stop}) is empty", "choose a stretch of at least 2 frames")
    if length == 1:
        return np.full(n_out, start, dtype=np.int64)
    period = 2 * (length - 1)
    phase = np.arange(n_out) % period
    return start + np.where(phase < length, phase, period - phase)


def pose_track_indices(n_out: int, n_train: int, stretch: tuple[int, int] | None = None) -> np.ndarray:
    """Indices into the training track for a dub of ``n_out`` frames (default stretch: all training frames)."""
    start, stop = stretch if stretch is not None else (0, n_train)
    if not (0 <= start < stop <= n_train):
        raise InputError(f"pose stretch {start}-{stop} is outside the training track (0-{n_train})",
                         f"choose a stretch within 0-{n_train}")
    return ping_pong_indices(n_out, start, stop)
