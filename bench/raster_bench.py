"""Rasteriser speed: forward + backward of a head-like scene.

    .venv/bin/python bench/raster_bench.py            # CPU: reference and numba, 5k/20k/50k at 128 and 256 px
    .venv/bin/python bench/raster_bench.py --gsplat   # also gsplat at 512 px (CUDA machine)

The scene: Gaussians in an ellipsoid 0.2 units across, 0.6 in front of a camera with a
20 degree field of view (like a tracked head filling the crop), sized so they overlap
as a fitted head does. Prints median milliseconds over a few repeats (the first call of
each configuration is left out: it warms caches, and for numba compiles or loads the
kernels), the numba/reference speedup, the cold first numba call of the process and peak
RSS. The two CPU backends run in alternation, a round each, so that a slow spell of a
shared machine slows both: the speedup is the median of the rounds' ratios, their range in
brackets. Fifteen rounds by default: at 128 px a numba call takes 20-30 ms and a slow spell of
the machine can double one, so five rounds' medians moved by a third from run to run.
Threads: torch.set_num_threads / NUMBA_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gstalker_core.render.rasterize import rasterization  # noqa: E402


def head_scene(n: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    means = direction * torch.rand(n, 1, generator=gen) ** (1 / 3) * torch.tensor([0.09, 0.12, 0.1])
    means[:, 2] += 0.6
    spacing = (0.2 * 0.24 * 0.2 / n) ** (1 / 3)
    scales = torch.full((n, 3), 0.7 * spacing) * torch.exp(0.3 * torch.randn(n, 3, generator=gen))
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1)
    opacities = torch.rand(n, generator=gen) * 0.5 + 0.5  # fitted heads are mostly opaque
    colors = torch.rand(n, 4, 3, generator=gen) * 0.5  # SH degree 1
    return [t.to(device).requires_grad_() for t in (means, quats, scales, opacities, colors)]


def camera(size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = 0.5 * size / math.tan(math.radians(10))
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]], device=device)[None]
    return torch.eye(4, device=device)[None], K


def time_call(params: list[torch.Tensor], size: int, backend: str, device: str) -> tuple[float, int]:
    """Milliseconds of one forward + backward, and the (pixel, Gaussian) pairs composited."""
    viewmats, Ks = camera(size, device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    img, alpha, meta = rasterization(*params[:4], params[4], viewmats, Ks, size, size, sh_degree=1, backend=backend)
    (img.sum() + alpha.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1000
    for p in params:
        p.grad = None
    return ms, meta.get("n_pairs", 0)


def time_backend(n: int, size: int, backend: str, device: str, repeats: int) -> tuple[float, int]:
    params = head_scene(n, device)
    times = [time_call(params, size, backend, device) for _ in range(repeats + 1)]
    return statistics.median(ms for ms, _ in times[1:]), times[-1][1]


def compare_cpu_backends(n: int, size: int, repeats: int) -> dict:
    """The reference and numba timed in alternation on one scene, so that a slow spell of this
    shared machine falls on both: medians of each, and each round's ratio."""
    params = head_scene(n, "cpu")
    rounds = [(time_call(params, size, "torch", "cpu"), time_call(params, size, "numba", "cpu"))
              for _ in range(repeats + 1)][1:]
    return {"torch_ms": statistics.median(t for (t, _), _ in rounds),
            "numba_ms": statistics.median(m for _, (m, _) in rounds),
            "ratios": [t / m for (t, _), (m, _) in rounds],
            "pairs": (rounds[-1][0][1], rounds[-1][1][1])}


def cold_first_call() -> str:
    """The process's first numba render: its kernels compiled (empty cache) or loaded from the disk cache."""
    params = head_scene(100, "cpu")
    viewmats, Ks = camera(32, "cpu")
    start = time.perf_counter()
    img, alpha, _ = rasterization(*params, viewmats, Ks, 32, 32, sh_degree=1, backend="numba")
    (img.sum() + alpha.sum()).backward()
    ms = (time.perf_counter() - start) * 1000
    from gstalker_core.render import cpu_tiles

    source = "loaded from the disk cache" if cpu_tiles._forward.stats.cache_hits else "compiled, cache was empty"
    return f"numba cold first call (fwd+bwd, kernels {source}): {ms:.0f} ms; " \
           f"{numba.get_num_threads()} threads, {numba.threading_layer()} layer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsplat", action="store_true", help="also time gsplat at 512 px on CUDA")
    parser.add_argument("--repeats", type=int, default=15, help="rounds per configuration (default 15)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(cold_first_call())
    print("gaussians  px   torch fwd+bwd ms  numba fwd+bwd ms  speedup (range)        (pixel, gaussian) pairs "
          "torch / numba")
    for size in (128, 256):
        for n in (5000, 20000, 50000):
            r = compare_cpu_backends(n, size, args.repeats)
            ratios = r["ratios"]
            spread = f"({min(ratios):.1f}-{max(ratios):.1f}x)"
            print(f"{n:>9}  {size:<4} {r['torch_ms']:>16.1f}  {r['numba_ms']:>16.1f}  "
                  f"{statistics.median(ratios):>6.1f}x {spread:<14} "
                  f"{r['pairs'][0]} / {r['pairs'][1]}")
    if args.gsplat:
        for n in (5000, 20000, 50000):
            ms, _ = time_backend(n, 512, "gsplat", "cuda", args.repeats * 10)
            print(f"gsplat cuda {n:>9} Gaussians  512 px  {ms:>10.2f} ms")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
