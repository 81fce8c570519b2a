"""Backend parity: our PyTorch reference vs gsplat on the same scenes, on CUDA.

    .venv/bin/python bench/gsplat_parity.py          # needs a CUDA device and gsplat

Both backends run in float32 on the GPU on the head-like scenes of raster_bench.py (and a
small sparse scene), in "classic" and "antialiased" modes, with SH degree 1. Prints the max
absolute difference of the image, alpha and depth, and of the gradients of a fixed random
linear loss w.r.t. means, quats, scales, opacities and SH coefficients (relative to the
gradient's max magnitude), with PASS/FAIL against the stated tolerances. Exit status 1 on
any FAIL.

Tolerances (float32, two implementations summing in different orders):
- image / alpha: 1e-3 absolute (colours and alphas in [0, 1]);
- expected depth: 1e-3 relative to the scene depth;
- gradients: 2e-2 of each gradient tensor's max magnitude (a pixel whose transmittance lands
  on the 1e-4 stop, or an alpha on the 1/255 threshold, in one backend but not the other
  moves a few gradient entries by a whole contribution; the bulk agrees far closer).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from raster_bench import camera, head_scene  # noqa: E402
from gstalker_core.render.rasterize import rasterization  # noqa: E402

IMAGE_TOL = 1e-3
DEPTH_REL_TOL = 1e-3
GRAD_REL_TOL = 2e-2
NAMES = ("means", "quats", "scales", "opacities", "sh")


def render_with_grads(params: list[torch.Tensor], size: int, backend: str, mode: str, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [p.detach().clone().requires_grad_() for p in params]
    viewmats, Ks = camera(size, "cuda")
    img, alpha, _ = rasterization(*leaves[:4], leaves[4], viewmats, Ks, size, size, sh_degree=1,
                                  render_mode="RGB+ED", rasterize_mode=mode, backend=backend)
    out = torch.cat([img, alpha], dim=-1)
    (out * weights).sum().backward()
    return out.detach(), [p.grad.detach() for p in leaves]


def compare(label: str, params: list[torch.Tensor], size: int, mode: str) -> bool:
    gen = torch.Generator(device="cuda").manual_seed(1)
    weights = torch.rand(1, size, size, 5, device="cuda", generator=gen)
    ref, ref_grads = render_with_grads(params, size, "torch", mode, weights)
    gs, gs_grads = render_with_grads(params, size, "gsplat", mode, weights)
    ok = True
    rgb_diff = (ref[..., :3] - gs[..., :3]).abs().max().item()
    alpha_diff = (ref[..., 4] - gs[..., 4]).abs().max().item()
    depth_diff = ((ref[..., 3] - gs[..., 3]).abs().max() / gs[..., 3].abs().max().clamp_min(1e-12)).item()
    for name, value, tol in (("rgb", rgb_diff, IMAGE_TOL), ("alpha", alpha_diff, IMAGE_TOL),
                             ("depth(rel)", depth_diff, DEPTH_REL_TOL)):
        verdict = value <= tol
        ok &= verdict
        print(f"{label:<22} {mode:<11} {name:<14} {value:10.2e}  tol {tol:.0e}  {'PASS' if verdict else 'FAIL'}")
    for name, a, b in zip(NAMES, ref_grads, gs_grads):
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        verdict = rel <= GRAD_REL_TOL
        ok &= verdict
        print(f"{label:<22} {mode:<11} {'d/' + name:<14} {rel:10.2e}  tol {GRAD_REL_TOL:.0e}  "
              f"{'PASS' if verdict else 'FAIL'}")
    return ok


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gsplat_parity needs a CUDA device (gsplat has no CPU path)")
    ok = True
    for n, size in ((200, 64), (5000, 128), (20000, 256)):
        params = head_scene(n, "cuda")
        for mode in ("classic", "antialiased"):
            ok &= compare(f"head n={n} {size}px", params, size, mode)
    print("ALL PASS" if ok else "SOME FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
