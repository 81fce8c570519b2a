"""Tracking throughput and peak memory (target: faster than real time, > 25 frames/s, on 2 cores at 256 px).

    .venv/bin/python bench/track_bench.py [VIDEO] [--resolution 256] [--frames N] [--keep DIR]

Decodes the video with ffmpeg (centre square crop, scaled to the resolution) into chunked
frames in a temporary folder (streamed: memory stays one chunk), then times ``track_clip``
on them (QA video included) and prints frames/s, the manifest's figures and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gstalker_core import media  # noqa: E402
from gstalker_core.data.frames import ChunkReader, ChunkWriter  # noqa: E402
from gstalker_core.tracking import TrackConfig, track_clip  # noqa: E402

CHUNK = 100


def decode(video: Path, resolution: int, max_frames: int | None, dest: Path) -> ChunkReader:
    info = media.probe(video)
    side = min(info.width, info.height)
    crop = ((info.width - side) // 2, (info.height - side) // 2, side, side)
    writer = ChunkWriter(dest, "frames", CHUNK)
    for i, frame in enumerate(media.stream_frames(video, 25, resolution, resolution, crop)):
        if max_frames is not None and i >= max_frames:
            break
        writer.write(frame)
    n = writer.close()
    return ChunkReader(writer.files, CHUNK, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", default=str(REPO.parent / "shared/data/cnn_anchor_71s.mp4"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--frames", type=int, default=None, help="only the first N frames")
    parser.add_argument("--keep", type=Path, default=None, help="write the stage parts here (else a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        frames = decode(Path(args.video), args.resolution, args.frames, Path(tmp) / "frames")
        decoded = time.perf_counter()
        workdir = args.keep or Path(tmp) / "track"
        manifest = track_clip(frames, TrackConfig(), workdir, chunk_frames=CHUNK)
        tracked = time.perf_counter()
    n = manifest.n_frames
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"video: {Path(args.video).name}, {n} frames at {args.resolution} px")
    print(f"decode: {n / (decoded - start):.1f} frames/s; track (incl. QA video): {n / (tracked - decoded):.1f} frames/s "
          f"({tracked - decoded:.1f} s)")
    print(f"peak RSS: {own:.0f} MiB (this process)")
    print(json.dumps(manifest.model_dump(mode="json", exclude={"K"}), indent=1))


if __name__ == "__main__":
    main()
