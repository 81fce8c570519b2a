"""Pose/blink track extension: any length, never a jump."""

from __future__ import annotations

import numpy as np
import pytest

from gstalker_core.errors import InputError
from gstalker_core.dub_motion import pose_track_indices


@pytest.mark.parametrize("n_out, n_train", [(10, 100), (1000, 37), (1, 5), (250, 2)])
def test_track_covers_any_length_without_jumps(n_out, n_train):
    idx = pose_track_indices(n_out, n_train)
    assert len(idx) == n_out and idx.min() >= 0 and idx.max() < n_train
    assert np.all(np.abs(np.diff(idx)) <= 1)
    if n_out >= n_train:
        assert set(idx) == set(range(n_train))  # all of the real motion is used
    assert idx[0] == 0


def test_stretch_is_respected_and_validated():
    idx = pose_track_indices(500, 100, stretch=(20, 30))
    assert idx.min() == 20 and idx.max() == 29 and np.all(np.abs(np.diff(idx)) == 1)
    with pytest.raises(InputError, match="outside the training track"):
        pose_track_indices(5, 100, stretch=(90, 120))
