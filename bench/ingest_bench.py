"""Ingest throughput and peak memory.

    .venv/bin/python bench/ingest_bench.py [VIDEO] [--profile preview]
    .venv/bin/python bench/ingest_bench.py --synthetic-1080p 120   # memory flat in clip length

Prints frames per second (the target is faster than real time, 25 fps, on 2 cores) and
the peak resident memory of this process and of its ffmpeg children. Each run uses a
fresh temporary home, so nothing is a cache hit.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gstalker_core import ingest  # noqa: E402
from gstalker_core.config import load_config  # noqa: E402
from gstalker_core.storage import open_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", default=str(REPO.parent / "shared/data/cnn_anchor_71s.mp4"))
    parser.add_argument("--profile", default="preview")
    parser.add_argument("--synthetic-1080p", type=float, metavar="SECONDS",
                        help="ingest a synthetic 1920x1080 face clip of this length instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        video = args.video
        if args.synthetic_1080p:
            from tests.fixtures.media import make_clip

            video = str(make_clip(Path(home) / "long1080p.mp4", seconds=args.synthetic_1080p, width=1920, height=1080))
            print(f"built a synthetic 1920x1080 clip of {args.synthetic_1080p:g} s")
        cfg = load_config(args.profile, overrides=[f"home={home}"])
        start = time.perf_counter()
        run = ingest.run(open_store(cfg), video, cfg)
        seconds = time.perf_counter() - start
    meta = ingest.manifest_of(run.manifest)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"video: {Path(video).name} {meta.source_width}x{meta.source_height} {meta.source_duration_s:.1f} s, "
          f"profile {args.profile} ({meta.resolution} px)")
    print(f"ingest: {meta.n_frames} frames in {seconds:.1f} s = {meta.n_frames / seconds:.1f} frames/s "
          f"({meta.n_frames / 25 / seconds:.2f}x real time)")
    print(f"peak RSS: python {own:.0f} MiB, largest ffmpeg child {children:.0f} MiB")


if __name__ == "__main__":
    main()
