"""Stored frames: bytes per frame, fidelity and decode speed, video chunks against npz chunks.

    .venv/bin/python bench/frames_bench.py [VIDEO] [--seconds 20] [--resolutions 128 256 512]
                                           [--crf 8 12 16] [--ffv1]

For each resolution it crops VIDEO as ingest does (one face-centred square), stores the same
frames as the old zlib ``.npz`` chunks and as video chunks at each ``--crf`` (H.264 coded in RGB;
``--ffv1`` adds lossless FFV1), and prints: KB per frame, PSNR of the stored frames against
the decoded source (the npz holds it exactly), and frames per second read back in training
order (chunks in random order, frames random within a chunk: ``SpeakerDataset.order``), in
sequence, and in a fully random order (every read may decode a whole chunk: the worst case),
each as a ratio against npz in the same run, and the decode time a training step pays per
frame (one frame per step in the preview profile, against a step of about 400 ms at 128 px
on 2 cores). Chunks are the ingest config's 100 frames.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gstalker_core import ingest, media  # noqa: E402
from gstalker_core.config import load_config  # noqa: E402
from gstalker_core.data.frames import ChunkReader, ChunkWriter, VideoCodec  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def training_order(n: int, chunk: int, rng: np.random.Generator) -> np.ndarray:
    groups = [np.arange(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    rng.shuffle(groups)
    return np.concatenate([rng.permutation(g) for g in groups])


def read_fps(reader: ChunkReader, order: np.ndarray) -> float:
    reader._cached = None  # a cold reader: every run starts without a decoded chunk
    start = time.perf_counter()
    for i in order:
        reader[int(i)]
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", default=str(REPO.parent / "shared/data/cnn_anchor_71s.mp4"))
    parser.add_argument("--seconds", type=float, default=20.0, help="how much of the clip to store")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--crf", type=int, nargs="+", default=None, help="H.264 CRFs (default: the config's)")
    parser.add_argument("--ffv1", action="store_true", help="also lossless FFV1")
    args = parser.parse_args()
    cfg = load_config("preview").ingest
    crfs = args.crf or [cfg.frame_crf]
    codecs = [VideoCodec("h264", c) for c in crfs] + ([VideoCodec("ffv1")] if args.ffv1 else [])
    path = Path(args.video)
    info = media.probe(path)
    crop, _, _ = ingest.find_crop(path, info, cfg)
    n_max = int(args.seconds * cfg.fps)
    print(f"{path.name}: {info.width}x{info.height}, crop {crop.size} px at ({crop.x}, {crop.y}); "
          f"{n_max} frames, chunks of {cfg.chunk_frames}; default h264 CRF {cfg.frame_crf}")
    print("| res | format | KB/frame | PSNR dB | min frame PSNR | training order fps | sequential fps | random fps "
          "| ms per training frame |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for res in args.resolutions:
        with tempfile.TemporaryDirectory() as tmp:
            writers = {"npz": ChunkWriter(Path(tmp) / "npz", "frames", cfg.chunk_frames)}
            for codec in codecs:
                label = f"{codec.name} crf {codec.crf}" if codec.name == "h264" else codec.name
                writers[label] = ChunkWriter(Path(tmp) / label.replace(" ", "_"), "frames", cfg.chunk_frames, codec)
            encode_s = dict.fromkeys(writers, 0.0)
            for k, frame in enumerate(media.stream_frames(path, cfg.fps, res, res,
                                                          crop=(crop.x, crop.y, crop.size, crop.size))):
                if k == n_max:
                    break
                for label, writer in writers.items():
                    start = time.perf_counter()
                    writer.write(frame)
                    encode_s[label] += time.perf_counter() - start
            n = 0
            for label, writer in writers.items():
                start = time.perf_counter()
                n = writer.close()
                encode_s[label] += time.perf_counter() - start
            readers = {label: ChunkReader(w.files, cfg.chunk_frames, n, (res, res)) for label, w in writers.items()}
            orders = {"training": training_order(n, cfg.chunk_frames, rng), "sequential": np.arange(n),
                      "random": rng.permutation(n)[: min(n, 120)]}
            fps = {label: {name: read_fps(r, order) for name, order in orders.items()} for label, r in readers.items()}
            truth = readers["npz"]
            for label, writer in writers.items():
                size = sum(f.stat().st_size for f in writer.files) / n / 1024
                if label == "npz":
                    quality = ("exact", "exact")
                else:
                    per_frame = [psnr(truth[i], readers[label][i]) for i in range(n)]
                    pooled = psnr(np.stack([truth[i] for i in range(0, n, 5)]),
                                  np.stack([readers[label][i] for i in range(0, n, 5)]))
                    quality = (f"{pooled:.2f}", f"{min(per_frame):.2f}")
                speeds = " | ".join(f"{fps[label][o]:.0f} ({fps[label][o] / fps['npz'][o]:.2f}x)" for o in orders)
                step_ms = 1000 / fps[label]["training"]
                print(f"| {res} | {label} | {size:.1f} | {quality[0]} | {quality[1]} | {speeds} | {step_ms:.2f} |")
            print(f"| {res} | encode s/frame | " + ", ".join(f"{k} {v / n * 1000:.1f} ms" for k, v in encode_s.items())
                  + " | | | | | | |")


if __name__ == "__main__":
    main()
