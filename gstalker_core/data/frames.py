"""Chunked uint8 image sequences: the on-disk form of frames and masks.

A sequence is a folder of ``<name>_<chunk:05d>`` files of ``chunk_frames`` frames each:
- ``.mkv``, one video stream per chunk, for RGB frames: H.264 coded in RGB at a low CRF
  (cnn_anchor_71s at CRF 12: 47 dB in 2 KB a frame at 128 px, 50 dB in 13 KB at 512 px,
  against 27 and 276 KB as zlib) or FFV1 (lossless), written and read through
  ffmpeg-python. A chunk is one group of pictures, starting on a key frame, so any chunk
  decodes on its own;
- ``.npz``, one zlib-compressed array ``data`` of shape (n, H, W[, C]), for label maps and
  masks (which must stay exact; they compress well) and for frames stored before videos.
Writers hold one chunk in memory; readers decode one whole chunk on a miss and keep it, so
memory is bounded by one chunk whatever the clip length, and any frame is reachable without
decoding the chunks before its own. Training draws frames grouped by chunk
(``SpeakerDataset.order``), so each chunk is decoded once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import ffmpeg
import numpy as np

from ..errors import StorageError

ARRAY_SUFFIX, VIDEO_SUFFIX = ".npz", ".mkv"


@dataclass(frozen=True)
class VideoCodec:
    """How RGB chunks are encoded: ``h264`` at ``crf`` (lower is better and larger; 0 is
    lossless), coded in RGB (libx264rgb): no chroma subsampling, which blurs lips and eyes at
    128 px, and no RGB -> YUV rounding, which alone cost 3 dB at the same size; or ``ffv1``
    (lossless, 5-10x larger)."""

    name: Literal["h264", "ffv1"] = "h264"
    crf: int = 12

    def output_args(self, gop: int) -> dict:
        if self.name == "ffv1":
            return dict(vcodec="ffv1", level=3, pix_fmt="bgr0", g=gop)
        return dict(vcodec="libx264rgb", crf=self.crf, preset="medium", pix_fmt="rgb24", g=gop)


def chunk_name(name: str, index: int, suffix: str = ARRAY_SUFFIX) -> str:
    return f"{name}_{index:05d}{suffix}"


def encode_video_chunk(frames: np.ndarray, path: Path, codec: VideoCodec) -> None:
    """(n, H, W, 3) uint8 RGB frames -> one video file, a single group of pictures."""
    n, h, w, _ = frames.shape
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=25)
    stream = stream.output(str(path), **codec.output_args(gop=n), loglevel="error")
    try:
        stream.overwrite_output().run(input=np.ascontiguousarray(frames).tobytes(), capture_stdout=True,
                                      capture_stderr=True)
    except ffmpeg.Error as err:
        raise RuntimeError(f"ffmpeg could not encode {path.name} with {codec}: {err.stderr.decode()[-500:]}") from None


def decode_video_chunk(path: Path, height: int, width: int) -> np.ndarray:
    """One video chunk -> (n, H, W, 3) uint8 RGB."""
    try:
        raw, _ = (ffmpeg.input(str(path)).output("pipe:", format="rawvideo", pix_fmt="rgb24", loglevel="error")
                  .run(capture_stdout=True, capture_stderr=True))
    except ffmpeg.Error as err:
        raise StorageError(f"frame chunk {path} does not decode: {err.stderr.decode()[-300:]}",
                           "delete the local cache folder (it is refetched from the store) or rerun ingest") from None
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


class ChunkWriter:
    """Append frames; every ``chunk_frames`` frames become one compressed file: a video
    chunk with ``codec`` (RGB frames), else an exact ``.npz`` array."""

    def __init__(self, directory: Path, name: str, chunk_frames: int, codec: VideoCodec | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.chunk_frames = chunk_frames
        self.codec = codec
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
            suffix = ARRAY_SUFFIX if self.codec is None else VIDEO_SUFFIX
            path = self.directory / chunk_name(self.name, len(self.files), suffix)
            if self.codec is None:
                np.savez_compressed(path, data=np.stack(self._buffer))
            else:
                encode_video_chunk(np.stack(self._buffer), path, self.codec)
            self.files.append(path)
            self._buffer = []

    def close(self) -> int:
        """Write the last partial chunk; return the number of frames written."""
        self._flush()
        return self.n_frames


class ChunkReader:
    """Random and sequential access to a chunked sequence, one decoded chunk in memory.
    ``frame_size`` (height, width) is needed for video chunks."""

    def __init__(self, paths: list[Path], chunk_frames: int, n_frames: int, frame_size: tuple[int, int] | None = None):
        self.paths = [Path(p) for p in paths]
        self.chunk_frames = chunk_frames
        self.n_frames = n_frames
        self.frame_size = frame_size
        self._cached: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_parts(cls, parts: dict[str, Path], name: str, chunk_frames: int, n_frames: int,
                   frame_size: tuple[int, int] | None = None) -> "ChunkReader":
        """Reader over a stage's parts (as returned by ``fetch_stage``) named ``<name>_*.mkv``
        or ``<name>_*.npz``."""
        n_chunks = -(-n_frames // chunk_frames)
        suffix = VIDEO_SUFFIX if chunk_name(name, 0, VIDEO_SUFFIX) in parts else ARRAY_SUFFIX
        return cls([parts[chunk_name(name, i, suffix)] for i in range(n_chunks)], chunk_frames, n_frames, frame_size)

    def __len__(self) -> int:
        return self.n_frames

    def chunk(self, index: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != index:
            path = self.paths[index]
            if path.suffix == VIDEO_SUFFIX:
                if self.frame_size is None:
                    raise ValueError("reading video chunks needs the frame size")
                data = decode_video_chunk(path, *self.frame_size)
            else:
                with np.load(path) as z:
                    data = z["data"]
            self._cached = (index, data)
        return self._cached[1]

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n_frames <= i < self.n_frames:
            raise IndexError(f"frame {i} out of range 0..{self.n_frames - 1}")
        i %= self.n_frames
        return self.chunk(i // self.chunk_frames)[i % self.chunk_frames]

    def __iter__(self) -> Iterator[np.ndarray]:
        for c in range(len(self.paths)):
            yield from self.chunk(c)
