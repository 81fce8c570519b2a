"""Backend parity: our PyTorch reference vs gsplat on the same scenes, on CUDA.

    .venv/bin/python bench/gsplat_parity.py          # needs a CUDA device and gsplat

Both backends run in float32 on the GPU on the head-like scenes of raster_bench.py (three
sizes), and on per-camera Gaussians (every tensor with a leading camera dimension, means
(C, N, 3): a deformed head per frame, each seen by its own camera), in "classic" and
"antialiased" modes, with SH degree 1. Prints the max absolute difference of the image,
alpha and depth, and of the gradients of a fixed random linear loss w.r.t. means, quats,
scales, opacities and SH coefficients (relative to the gradient's max magnitude), with
PASS/FAIL against the stated tolerances and how many entries exceed them (one or two: a
threshold flip, see below; many: a bug). Exit status 1 on any FAIL. ``run_checks`` is the
same comparison for other scripts (bench/gpu_bench.py).

Tolerances (float32, two implementations summing in different orders):
- image / alpha: 1e-3 absolute (colours and alphas in [0, 1]);
- expected depth: 1e-3 relative to the scene depth;
- gradients: 2e-2 of each gradient tensor's max magnitude (a pixel whose transmittance lands
  on the 1e-4 stop, or an alpha on the 1/255 threshold, in one backend but not the other
  moves a few gradient entries by a whole contribution; the bulk agrees far closer).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from raster_bench import camera, head_scene  # noqa: E402
from gstalker_core.render.rasterize import rasterization  # noqa: E402

IMAGE_TOL = 1e-3
DEPTH_REL_TOL = 1e-3
GRAD_REL_TOL = 2e-2
NAMES = ("means", "quats", "scales", "opacities", "sh")
MODES = ("classic", "antialiased")


@dataclass
class Scene:
    label: str
    params: list[torch.Tensor]  # means, quats, scales, opacities, SH colours: shared, or with a leading camera dim
    viewmats: torch.Tensor  # (C, 4, 4)
    Ks: torch.Tensor  # (C, 3, 3)
    size: int


@dataclass
class Check:
    scene: str
    mode: str
    quantity: str
    value: float  # max difference: absolute, or relative to gsplat's largest magnitude
    tolerance: float
    over: int  # entries whose difference exceeds the tolerance: one or two are a threshold flip, many a bug
    entries: int

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance  # NaN fails

    def line(self) -> str:
        return (f"{self.scene:<26} {self.mode:<11} {self.quantity:<14} {self.value:10.2e}  tol {self.tolerance:.0e}  "
                f"{'PASS' if self.passed else 'FAIL'}  ({self.over} of {self.entries} over)")


def difference(scene: Scene, mode: str, quantity: str, ours: torch.Tensor, theirs: torch.Tensor, scale: torch.Tensor,
               tolerance: float) -> Check:
    """``ours`` vs ``theirs`` relative to ``scale`` (1 for absolute differences)."""
    diff = (ours - theirs).abs() / scale.clamp_min(1e-12)
    return Check(scene.label, mode, quantity, diff.max().item(), tolerance, int((diff > tolerance).sum()), diff.numel())


def head(n: int, size: int, device: str) -> Scene:
    viewmats, Ks = camera(size, device)
    return Scene(f"head n={n} {size}px", head_scene(n, device), viewmats, Ks, size)


def per_camera_heads(n: int, size: int, cameras: int, device: str) -> Scene:
    """``cameras`` cameras turned a little about the head, each seeing its own jittered copy of
    a head scene (as deformation gives each frame its own Gaussians)."""
    gen = torch.Generator().manual_seed(2)
    means, quats, scales, opacities, colors = (p.detach().cpu() for p in head_scene(n, "cpu"))
    jitter = lambda shape, s: s * torch.randn(cameras, *shape, generator=gen)  # noqa: E731
    params = [means + jitter(means.shape, 2e-3), F.normalize(quats + jitter(quats.shape, 0.05), dim=-1),
              scales * torch.exp(jitter(scales.shape, 0.05)), opacities.expand(cameras, -1).clone(),
              colors.expand(cameras, -1, -1, -1).clone()]
    _, Ks = camera(size, "cpu")
    viewmats = torch.eye(4).repeat(cameras, 1, 1)
    for c, angle in enumerate(torch.linspace(-0.05, 0.05, cameras).tolist()):
        viewmats[c, 0, 0] = viewmats[c, 2, 2] = math.cos(angle)  # a turn about the vertical axis
        viewmats[c, 0, 2], viewmats[c, 2, 0] = math.sin(angle), -math.sin(angle)
    return Scene(f"per-camera C={cameras} n={n} {size}px", [p.to(device) for p in params], viewmats.to(device),
                 Ks.expand(cameras, 3, 3).to(device), size)


def scenes(device: str = "cuda") -> list[Scene]:
    return [head(200, 64, device), head(5000, 128, device), head(20000, 256, device),
            per_camera_heads(5000, 128, 4, device)]


def render_with_grads(scene: Scene, backend: str, mode: str, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [p.detach().clone().requires_grad_() for p in scene.params]
    img, alpha, _ = rasterization(*leaves, scene.viewmats, scene.Ks, scene.size, scene.size, sh_degree=1,
                                  render_mode="RGB+ED", rasterize_mode=mode, backend=backend)
    out = torch.cat([img, alpha], dim=-1)
    (out * weights).sum().backward()
    return out.detach(), [p.grad.detach() for p in leaves]


def compare(scene: Scene, mode: str) -> list[Check]:
    """Image, alpha, depth and gradient differences of the two backends on ``scene``."""
    device = scene.viewmats.device
    gen = torch.Generator(device=device).manual_seed(1)
    weights = torch.rand(len(scene.viewmats), scene.size, scene.size, 5, device=device, generator=gen)
    ref, ref_grads = render_with_grads(scene, "torch", mode, weights)
    gs, gs_grads = render_with_grads(scene, "gsplat", mode, weights)
    one = torch.ones((), device=device)
    checks = [difference(scene, mode, "rgb", ref[..., :3], gs[..., :3], one, IMAGE_TOL),
              difference(scene, mode, "alpha", ref[..., 4], gs[..., 4], one, IMAGE_TOL),
              difference(scene, mode, "depth(rel)", ref[..., 3], gs[..., 3], gs[..., 3].abs().max(), DEPTH_REL_TOL)]
    for name, a, b in zip(NAMES, ref_grads, gs_grads):
        checks.append(difference(scene, mode, f"d/{name}", a, b, b.abs().max(), GRAD_REL_TOL))
    return checks


def run_checks(report: Callable[[str], None] = print) -> list[Check]:
    """Every scene in every mode; ``report`` gets each check's line as it is made."""
    checks = []
    for scene in scenes():
        for mode in MODES:
            for check in compare(scene, mode):
                report(check.line())
                checks.append(check)
    return checks


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gsplat_parity needs a CUDA device (gsplat has no CPU path)")
    ok = all(check.passed for check in run_checks())
    print("ALL PASS" if ok else "SOME FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
