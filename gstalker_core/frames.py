"""Chunked uint8 image sequences: the on-disk form of frames and masks.

A sequence is a folder of ``<name>_<chunk:05d>.npz`` files, each holding one array
``data`` of shape (n, H, W[, C]) uint8, zlib-compressed. Writers hold one chunk in memory;
readers decompress one chunk at a time, so memory is bounded by the chunk size whatever
the clip length, and any frame is reachable without reading the ones before its chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np


def chunk_name(name: str, index: int) -> str:
    return f"{name}_{index:05d}.npz"


class ChunkWriter:
    """Append frames; every ``chunk_frames`` frames become one compressed file."""

    def __init__(self, directory: Path, name: str, chunk_frames: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.chunk_frames = chunk_frames
        self._buffer: list[np.ndarray] = []
        self.n_frames = 0
        self.files: list[Path] = []

    def write(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8:
            raise TypeError(f"frames are stored as uint8, got {frame.dtype}")
        if self._buffer and frame.shape != self._buffer[0].shape:
            raise ValueError(f"frame shape {frame.shape} differs from {self._buffer[0].shape}")
        self._buffer.append(frame)
        self.n_frames += 1
        if len(self._buffer) == self.chunk_frames:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            path = self.directory / chunk_name(self.name, len(self.files))
            np.savez_compressed(path, data=np.stack(self._buffer))
            self.files.append(path)
            self._buffer = []

    def close(self) -> int:
        """Write the last partial chunk; return the number of frames written."""
        self._flush()
        return self.n_frames


class ChunkReader:
    """Random and sequential access to a chunked sequence, one chunk in memory."""

    def __init__(self, paths: list[Path], chunk_frames: int, n_frames: int):
        self.paths = [Path(p) for p in paths]
        self.chunk_frames = chunk_frames
        self.n_frames = n_frames
        self._cached: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_parts(cls, parts: dict[str, Path], name: str, chunk_frames: int, n_frames: int) -> "ChunkReader":
        """Reader over a stage's parts (as returned by ``fetch_stage``) named ``<name>_*.npz``."""
        n_chunks = -(-n_frames // chunk_frames)
        return cls([parts[chunk_name(name, i)] for i in range(n_chunks)], chunk_frames, n_frames)

    def __len__(self) -> int:
        return self.n_frames

    def chunk(self, index: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != index:
            with np.load(self.paths[index]) as z:
                self._cached = (index, z["data"])
        return self._cached[1]

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n_frames <= i < self.n_frames:
            raise IndexError(f"frame {i} out of range 0..{self.n_frames - 1}")
        i %= self.n_frames
        return self.chunk(i // self.chunk_frames)[i % self.chunk_frames]

    def __iter__(self) -> Iterator[np.ndarray]:
        for c in range(len(self.paths)):
            yield from self.chunk(c)
