"""Deformation network throughput: face field (tri-plane + MLP) and audio encoder, forward and forward+backward.

    .venv/bin/python bench/field_bench.py [--frames 4] [--points 5000 20000 50000] [--profile preview|paper]
                                          [--repeats 5] [--threads N]

A training step evaluates the tri-plane once for the static centres and the MLP for B frames
(``--frames``), so the face figures are per step of B frames. The audio figures are a training
batch of B random frames (B x frame_window windows) and one 250-frame (10 s) chunk of
``conditions`` as dubbing uses it. Runs on the CPU, and on CUDA too when available.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gstalker_core.deform import AudioEncoder, DeformConfig, FaceDeformField  # noqa: E402

# paper-profile values (GPU); preview = DeformConfig() defaults
PAPER = DeformConfig(hash_levels=16, hash_features=2, hash_log2_table=17, hash_base_resolution=32,
                     hash_max_resolution=512, audio_channels=128, audio_code_dim=64, frame_window=8,
                     face_mlp_width=128, face_mlp_depth=3)
N_FEATURES, STEP_WINDOW = 80, 16


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def bench_face(cfg: DeformConfig, n_points: int, n_frames: int, repeats: int,
               device: torch.device) -> tuple[float, float]:
    field = FaceDeformField(cfg, [-1, -1, -1], [1, 1, 1]).to(device)
    torch.nn.init.normal_(field.mlp.head.weight, std=1e-3)  # a trained head: backward reaches the grids
    means = (torch.rand(n_points, 3, device=device) * 2 - 1).requires_grad_(True)
    audio = torch.randn(n_frames, cfg.audio_code_dim, device=device)
    eye = torch.rand(n_frames, device=device)

    def forward():
        with torch.no_grad():
            field(field.encode(means), audio, eye)

    def forward_backward():
        deltas = field(field.encode(means), audio, eye)
        (deltas.d_means.square().sum() + deltas.d_quats.square().sum() + deltas.d_log_scales.square().sum()).backward()

    return timed(forward, repeats, device), timed(forward_backward, repeats, device)


def bench_audio(cfg: DeformConfig, n_frames: int, repeats: int, device: torch.device) -> tuple[float, float, float]:
    enc = AudioEncoder(cfg, N_FEATURES, STEP_WINDOW).to(device)
    feats = np.random.default_rng(0).normal(size=(2 * 1500, N_FEATURES)).astype(np.float32)  # 60 s
    frames = np.random.default_rng(1).integers(0, 1500, n_frames)

    def forward():
        with torch.no_grad():
            enc(enc.windows(feats, frames))

    def forward_backward():
        enc(enc.windows(feats, frames)).square().sum().backward()

    def chunk():
        with torch.no_grad():
            enc.conditions(feats, 500, 750)

    return timed(forward, repeats, device), timed(forward_backward, repeats, device), timed(chunk, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4, help="frames per training step (batch)")
    parser.add_argument("--points", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--profile", choices=["preview", "paper"], default="preview")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PAPER if args.profile == "paper" else DeformConfig()
    torch.manual_seed(0)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"profile {args.profile}: {cfg.hash_levels} levels x {cfg.hash_features} features, "
          f"table 2^{cfg.hash_log2_table}, "
          f"res {cfg.hash_base_resolution}-{cfg.hash_max_resolution}, MLP {cfg.face_mlp_depth}x{cfg.face_mlp_width}; "
          f"{args.frames} frames per step; CPU threads {torch.get_num_threads()}")
    for device in devices:
        for n in args.points:
            fwd, both = bench_face(cfg, n, args.frames, args.repeats, device)
            print(f"{device.type:4s} face field  {n:6d} Gaussians x {args.frames} frames: "
                  f"forward {fwd:8.1f} ms   forward+backward {both:8.1f} ms")
        fwd, both, chunk = bench_audio(cfg, args.frames, args.repeats, device)
        print(f"{device.type:4s} audio encoder {args.frames} frames (x{cfg.frame_window} windows): "
              f"forward {fwd:6.1f} ms   "
              f"forward+backward {both:6.1f} ms;  250-frame chunk conditions {chunk:6.1f} ms")


if __name__ == "__main__":
    main()
