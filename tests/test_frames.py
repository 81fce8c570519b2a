"""Stored frames: video chunks (H.264 in RGB, FFV1) against exact npz chunks, random access,
old stores, broken chunks."""

from __future__ import annotations

import numpy as np
import pytest

from gstalker_core import ingest
from gstalker_core.config import load_config
from gstalker_core.errors import StorageError
from gstalker_core.data.frames import ChunkReader, ChunkWriter, VideoCodec, chunk_name
from gstalker_core.storage import open_store
from tests.fixtures.media import render_frames


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def face_frames() -> np.ndarray:
    """60 frames of a real face (astronaut) drifting over a textured background, 128 px."""
    return np.stack(list(render_frames(60, 128, 128)))


def _store(frames, directory, chunk, codec=None) -> ChunkReader:
    writer = ChunkWriter(directory, "frames", chunk, codec)
    for frame in frames:
        writer.write(frame)
    n = writer.close()
    return ChunkReader(writer.files, chunk, n, frames.shape[1:3])


def test_default_h264_keeps_45_db_in_a_fraction_of_the_npz_bytes(face_frames, tmp_path):
    default = load_config("preview").ingest
    video = _store(face_frames, tmp_path / "h264", 25, VideoCodec(default.frame_codec, default.frame_crf))
    exact = _store(face_frames, tmp_path / "npz", 25)
    assert [p.suffix for p in video.paths] == [".mkv"] * 3 and [p.suffix for p in exact.paths] == [".npz"] * 3
    decoded = np.stack([video[i] for i in range(60)])
    assert decoded.shape == face_frames.shape and decoded.dtype == np.uint8
    assert _psnr(decoded, face_frames) >= 45.0
    assert min(_psnr(decoded[i], face_frames[i]) for i in range(60)) >= 43.0  # no frame falls apart
    assert sum(p.stat().st_size for p in video.paths) < 0.5 * sum(p.stat().st_size for p in exact.paths)
    assert np.array_equal(np.stack([exact[i] for i in range(60)]), face_frames)


def test_ffv1_is_lossless_and_any_frame_is_reachable_in_any_order(face_frames, tmp_path):
    reader = _store(face_frames, tmp_path, 25, VideoCodec("ffv1"))
    for i in (59, 0, 33, 26, 24, 58):  # across chunks, backwards, the short last chunk
        assert np.array_equal(reader[i], face_frames[i])
    assert np.array_equal(np.stack(list(reader)), face_frames)
    with pytest.raises(IndexError):
        reader[60]


def test_a_stage_stored_as_npz_chunks_is_still_read(face_frames, tmp_path):
    reader = _store(face_frames[:30], tmp_path, 25)
    parts = {p.name: p for p in reader.paths}
    again = ChunkReader.from_parts(parts, "frames", 25, 30, (128, 128))
    assert np.array_equal(again[29], face_frames[29])


def test_the_codec_settings_are_part_of_the_ingest_key(tiny_config, clip):
    path = str(clip("plain.mp4", seconds=2.0))
    base = ingest.stage_key(path, tiny_config())
    assert ingest.stage_key(path, tiny_config("ingest.frame_crf=20")) != base
    assert ingest.stage_key(path, tiny_config("ingest.frame_codec=ffv1")) != base


def test_ingest_stores_video_chunks_that_read_back(tiny_config, clip):
    cfg = tiny_config()
    run = ingest.run(open_store(cfg), str(clip("plain.mp4", seconds=2.0)), cfg)
    assert chunk_name("frames", 0, ".mkv") in run.manifest.parts
    frames = ingest.open_frames(open_store(cfg), run.manifest, cfg.cache_dir)
    assert len(frames) == 50 and frames[49].shape == (64, 64, 3) and frames[10].std() > 20


def test_a_broken_chunk_is_a_storage_error_with_its_fix(face_frames, tmp_path):
    reader = _store(face_frames[:10], tmp_path, 10, VideoCodec("h264", 14))
    reader.paths[0].write_bytes(b"not a video")
    with pytest.raises(StorageError, match="does not decode"):
        reader[3]
