"""Streaming training samples over a tracked clip, memory bounded by one chunk.

Frames (ingest) and labels (track) are chunked alike, so a pass that visits the frames
chunk by chunk decompresses each chunk once; the random order is therefore grouped by
chunk: chunks in random order, frames in random order within a chunk.

The order (what training draws) leaves out frames whose mouth the tracker found covered:
a hand over the mouth would teach the head a hand and the audio a frozen mouth. Indexing
still reaches every frame of the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from ..audio import frame_windows
from .frames import ChunkReader
from ..tracking.topology import Topology, topology_named
from ..tracking.track import (BLINK, INTRINSICS, LANDMARKS, MOUTH_COVERED, TEMPLATE, TORSO_SHIFT, VALID, VIEWMATS,
                              TrackManifest)


@dataclass
class TrackArrays:
    viewmats: np.ndarray  # (N, 4, 4) float32 world-to-camera
    K: np.ndarray  # (3, 3) float32
    landmarks: np.ndarray  # (N, P, 3) float32: pixel x, y; relative depth z in pixels (P: the track's topology)
    blink: np.ndarray  # (N,) float32 eye closure in [0, 1]
    valid: np.ndarray  # (N,) bool, False where interpolated
    mouth_covered: np.ndarray  # (N,) bool, True where a hand (or object) hides the mouth
    template: np.ndarray  # (P, 3) float32 world points
    torso_shift: np.ndarray  # (N, 2) float32 pixels: where the torso layer is drawn (tracking.torso)

    @classmethod
    def load(cls, parts: dict[str, Path]) -> "TrackArrays":
        names = (VIEWMATS, INTRINSICS, LANDMARKS, BLINK, VALID, MOUTH_COVERED, TEMPLATE, TORSO_SHIFT)
        return cls(*(np.load(parts[name]) for name in names))


@dataclass
class Sample:
    index: int
    rgb: torch.Tensor  # (H, W, 3) uint8
    labels: torch.Tensor  # (H, W) uint8: 0 background, 1 head, 2 neck, 3 torso
    viewmat: torch.Tensor  # (4, 4) float32
    K: torch.Tensor  # (3, 3) float32
    blink: torch.Tensor  # () float32
    valid: bool
    audio: torch.Tensor | None  # (step_window, spec width) float32 when audio features were given


class SpeakerDataset(torch.utils.data.IterableDataset):
    """Samples of one split (``train`` or ``test``) of a tracked clip.

    Indexing (``ds[k]``) gives the k-th frame of the split; iterating gives one epoch, in
    chunk-grouped random order when ``shuffle`` (a new order every epoch), else in order.
    ``audio_features``: the audio stage's (steps, spec width) array, 2 steps per frame.
    """

    def __init__(self, frames: Sequence[np.ndarray] | ChunkReader, labels: Sequence[np.ndarray] | ChunkReader,
                 manifest: TrackManifest, arrays: TrackArrays, split: Literal["train", "test", "all"] = "train",
                 audio_features: np.ndarray | None = None, step_window: int = 16, shuffle: bool = True,
                 seed: int = 0):
        self.frames, self.labels, self.manifest, self.arrays = frames, labels, manifest, arrays
        part = {"train": manifest.train, "test": manifest.test}.get(split)
        self.indices = np.arange(part.start, part.stop) if part else np.arange(manifest.n_frames)
        self.drawn = self.indices[~arrays.mouth_covered[self.indices]]
        self.audio_features, self.step_window = audio_features, step_window
        self.shuffle, self.seed, self._epoch = shuffle, seed, 0
        self._cached_order: tuple[int, np.ndarray | None] = (-1, None)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def topology(self) -> Topology:
        """The landmark groups of ``arrays.landmarks`` (the tracking backend's)."""
        return topology_named(self.manifest.landmark_topology)

    def __getitem__(self, k: int) -> Sample:
        return self.sample(int(self.indices[k]))

    def sample(self, i: int) -> Sample:
        """The sample of clip frame ``i``."""
        a = self.arrays
        audio = None
        if self.audio_features is not None:
            audio = torch.from_numpy(frame_windows(self.audio_features, [i], self.step_window)[0])
        return Sample(index=i, rgb=torch.from_numpy(np.array(self.frames[i])),
                      labels=torch.from_numpy(np.array(self.labels[i])),
                      viewmat=torch.from_numpy(a.viewmats[i]), K=torch.from_numpy(a.K),
                      blink=torch.tensor(float(a.blink[i])), valid=bool(a.valid[i]), audio=audio)

    def order(self, epoch: int = 0) -> np.ndarray:
        """Frame indices of epoch ``epoch`` (covered mouths left out): chunk-grouped random order (or in order).

        The order depends only on (seed, epoch), so a training run resumed at any step
        draws exactly the frames an uninterrupted run would.
        """
        if not self.shuffle:
            return self.drawn
        rng = np.random.default_rng([self.seed, epoch])
        chunk = self.drawn // self.manifest.chunk_frames
        groups = [self.drawn[chunk == c] for c in np.unique(chunk)]
        rng.shuffle(groups)
        return np.concatenate([rng.permutation(g) for g in groups])

    def index_at(self, step: int) -> int:
        """The frame a training loop visits at ``step`` (epochs back to back)."""
        epoch, k = divmod(step, len(self.drawn))
        if self._cached_order[0] != epoch:
            self._cached_order = (epoch, self.order(epoch))
        return int(self._cached_order[1][k])

    def __iter__(self) -> Iterator[Sample]:
        """One epoch; each new iteration is the next epoch."""
        epoch, self._epoch = self._epoch, self._epoch + 1
        for i in self.order(epoch):
            yield self.sample(int(i))
