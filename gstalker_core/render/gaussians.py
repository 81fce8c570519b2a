"""A set of 3D Gaussians: parameters, initialisation, 3DGS densification, save/load, .ply export.

Parameters are stored unconstrained (the 3DGS convention): means, quaternions (w, x, y,
z; normalised by the rasteriser), log-scales, opacity logits and SH coefficients
(``sh0`` (N, 1, 3) and ``shN`` (N, K-1, 3)). Colours initialise through SH degree 0, so
``sh0 = (rgb - 0.5) / C0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import GaussianConfig
from .rasterize import SH_C0, means2d_grads, quat_to_rotmat
from ..runtime import adam

PARAMS = ("means", "quats", "log_scales", "opacity_logits", "sh0", "shN")
FORMAT = "gstalker-gaussians-1"


def _inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


class GaussianModel(nn.Module):
    def __init__(self, cfg: GaussianConfig, means: torch.Tensor, rgb: torch.Tensor, scales: torch.Tensor,
                 seed: int = 0):
        super().__init__()
        self.cfg = cfg
        n = len(means)
        gen = torch.Generator().manual_seed(seed)
        quats = torch.randn(n, 4, generator=gen)
        self.means = nn.Parameter(means.float().clone())
        self.quats = nn.Parameter(quats / quats.norm(dim=-1, keepdim=True))
        self.log_scales = nn.Parameter(torch.log(scales.float()).clone())
        self.opacity_logits = nn.Parameter(_inverse_sigmoid(torch.full((n,), cfg.init_opacity)))
        self.sh0 = nn.Parameter(((rgb.float() - 0.5) / SH_C0)[:, None, :].clone())
        self.shN = nn.Parameter(torch.zeros(n, (cfg.sh_degree + 1) ** 2 - 1, 3))
        # densification statistics: buffers, so that ``.to(device)`` moves them with the
        # parameters; not persistent (checkpoints carry them through ``state()``)
        self.register_buffer("grad_accum", torch.zeros(n), persistent=False)
        self.register_buffer("grad_count", torch.zeros(n), persistent=False)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def init_random(cls, cfg: GaussianConfig, n: int, lo: np.ndarray, hi: np.ndarray, seed: int = 0) -> "GaussianModel":
        """``n`` Gaussians uniformly inside the ellipsoid inscribed in the box [lo, hi], grey."""
        gen = torch.Generator().manual_seed(seed)
        lo_t, hi_t = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        direction = torch.randn(n, 3, generator=gen)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        radius = torch.rand(n, 1, generator=gen) ** (1 / 3)
        means = (lo_t + hi_t) / 2 + direction * radius * (hi_t - lo_t) / 2
        spacing = float(torch.prod(hi_t - lo_t) / n) ** (1 / 3)  # mean distance between neighbours
        rgb = 0.5 + 0.05 * torch.randn(n, 3, generator=gen)
        return cls(cfg, means, rgb.clamp(0.01, 0.99), torch.full((n, 3), 0.5 * spacing), seed)

    @classmethod
    def init_points(cls, cfg: GaussianConfig, xyz: np.ndarray, rgb: np.ndarray, seed: int = 0) -> "GaussianModel":
        """Gaussians on given points with given colours, sized by their spread."""
        pts = torch.as_tensor(xyz, dtype=torch.float32)
        extent = (pts.max(0).values - pts.min(0).values).clamp_min(1e-6)
        spacing = float(torch.prod(extent) / len(pts)) ** (1 / 3)
        return cls(cfg, pts, torch.as_tensor(rgb, dtype=torch.float32).clamp(0.01, 0.99),
                   torch.full((len(pts), 3), 0.5 * spacing), seed)

    @property
    def sh_degree(self) -> int:
        return self.cfg.sh_degree

    def __len__(self) -> int:
        return len(self.means)

    def sh_coefficients(self) -> torch.Tensor:
        return torch.cat([self.sh0, self.shN], dim=1)

    def scene_extent(self) -> float:
        m = self.means.detach()
        return float((m - m.mean(0)).norm(dim=-1).max()) or 1.0

    # -- optimisation ----------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Adam:
        c = self.cfg
        rates = {"means": c.lr_means * self.scene_extent(), "quats": c.lr_quats, "log_scales": c.lr_scales,
                 "opacity_logits": c.lr_opacity, "sh0": c.lr_sh0, "shN": c.lr_sh0 / 20}
        return adam([{"params": [getattr(self, p)], "lr": rates[p], "name": p} for p in PARAMS], eps=1e-15)

    def _reset_stats(self) -> None:
        self.grad_accum = torch.zeros(len(self.means), device=self.means.device)
        self.grad_count = torch.zeros(len(self.means), device=self.means.device)

    @torch.no_grad()
    def densify_step(self, step: int, meta: dict, optimizer: torch.optim.Optimizer) -> None:
        """Accumulate view-space gradients; every ``densify_every`` steps clone, split and prune."""
        c = self.cfg
        if step >= c.densify_until:
            return
        grads = means2d_grads(meta)  # (C, N, 2) pixels
        visible = (meta["radii"] > 0).all(-1)  # (C, N)
        scale = torch.tensor([meta["width"] / 2, meta["height"] / 2], device=grads.device)
        norms = (grads * scale).norm(dim=-1) * visible
        self.grad_accum += norms.sum(0)
        self.grad_count += visible.sum(0)
        if step >= c.densify_from and (step + 1) % c.densify_every == 0:
            self._densify_and_prune(optimizer)
        if step > 0 and step % c.opacity_reset_every == 0:
            self.opacity_logits.data.clamp_(max=float(_inverse_sigmoid(torch.tensor(0.01))))
            _reset_state(optimizer, "opacity_logits")

    def _densify_and_prune(self, optimizer: torch.optim.Optimizer) -> None:
        c = self.cfg
        avg = self.grad_accum / self.grad_count.clamp_min(1)
        big_grad = avg > c.densify_grad_threshold
        max_scale = torch.exp(self.log_scales.detach()).max(-1).values
        extent = self.scene_extent()
        small = max_scale <= c.dense_scale_fraction * extent
        alive = (torch.sigmoid(self.opacity_logits.detach()) > c.prune_opacity) & (
            max_scale <= c.prune_scale_fraction * extent)
        room = max(c.max_gaussians - len(self), 0)
        clone = big_grad & small & alive
        split = big_grad & ~small & alive
        clone &= torch.cumsum(clone.long(), 0) <= room // 2
        split &= torch.cumsum(split.long(), 0) <= room // 4
        new = {}
        if clone.any():
            new = {p: getattr(self, p).detach()[clone] for p in PARAMS}
        if split.any():
            idx = torch.nonzero(split).squeeze(1).repeat(2)
            scales = torch.exp(self.log_scales.detach()[idx])
            offsets = (quat_to_rotmat(self.quats.detach()[idx]) @ (torch.randn_like(scales) * scales)[..., None])[..., 0]
            pieces = {p: getattr(self, p).detach()[idx] for p in PARAMS}
            pieces["means"] = pieces["means"] + offsets
            pieces["log_scales"] = torch.log(scales / 1.6)
            new = {p: torch.cat([new[p], pieces[p]]) if p in new else pieces[p] for p in PARAMS}
        keep = ~split & alive
        self._surgery(optimizer, keep, new)
        self._reset_stats()

    def _surgery(self, optimizer: torch.optim.Optimizer, keep: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
        """Drop rows not in ``keep``, append ``new`` rows; Adam moments follow (zeros for new rows)."""
        for group in optimizer.param_groups:
            name = group["name"]
            old = group["params"][0]
            extra = new.get(name, old.detach()[:0])
            param = nn.Parameter(torch.cat([old.detach()[keep], extra]))
            state = optimizer.state.pop(old, None)
            if state:
                for k in ("exp_avg", "exp_avg_sq"):
                    state[k] = torch.cat([state[k][keep], torch.zeros_like(extra)])
                optimizer.state[param] = state
            group["params"][0] = param
            setattr(self, name, param)

    # -- persistence -----------------------------------------------------------------------
    def state(self) -> dict:
        """What a resumed training run needs: config, parameters and the densification statistics
        gathered since the last densification (a checkpoint rarely falls on one)."""
        return {"config": self.cfg.model_dump(), "params": {p: getattr(self, p).detach().clone() for p in PARAMS},
                "densify": {"grad_accum": self.grad_accum.clone(), "grad_count": self.grad_count.clone()}}

    @classmethod
    def from_state(cls, state: dict) -> "GaussianModel":
        """The model of ``state()``; without statistics (a saved file) they start at zero."""
        cfg = GaussianConfig.model_validate(state["config"])
        params = state["params"]
        n = len(params["means"])
        model = cls(cfg, torch.zeros(n, 3), torch.full((n, 3), 0.5), torch.ones(n, 3))
        for p in PARAMS:
            setattr(model, p, nn.Parameter(params[p].clone()))
        model._reset_stats()
        if "densify" in state:
            model.grad_accum = state["densify"]["grad_accum"].clone()
            model.grad_count = state["densify"]["grad_count"].clone()
        return model.to(params["means"].device)

    def with_geometry(self, means: torch.Tensor, quats: torch.Tensor, log_scales: torch.Tensor) -> "GaussianModel":
        """A copy with these (N, ...) means, rotations and log-scales (one deformed frame), the
        same opacities and colours."""
        state = self.state()
        geometry = {"means": means.detach(), "quats": quats.detach(), "log_scales": log_scales.detach()}
        return GaussianModel.from_state({"config": state["config"], "params": {**state["params"], **geometry}})

    def save(self, path: Path) -> Path:
        save_file({p: getattr(self, p).detach().cpu().contiguous() for p in PARAMS}, str(path),
                  metadata={"format": FORMAT, "config": self.cfg.model_dump_json()})
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "GaussianModel":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a gstalker Gaussian file (format {meta.get('format')!r})")
        return cls.from_state({"config": json.loads(meta["config"]), "params": load_file(str(path))})

    def export_ply(self, path: Path) -> Path:
        """Standard 3DGS (INRIA) binary little-endian .ply, readable by common splat viewers."""
        n = len(self)
        rest = self.shN.detach().transpose(1, 2).reshape(n, -1)  # channel-major, as INRIA writes f_rest
        zeros = torch.zeros(n, device=self.means.device)
        columns = {"x": self.means[:, 0], "y": self.means[:, 1], "z": self.means[:, 2], "nx": zeros, "ny": zeros, "nz": zeros,
                   **{f"f_dc_{i}": self.sh0[:, 0, i] for i in range(3)},
                   **{f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])},
                   "opacity": self.opacity_logits,
                   **{f"scale_{i}": self.log_scales[:, i] for i in range(3)},
                   **{f"rot_{i}": self.quats[:, i] for i in range(4)}}
        data = np.stack([v.detach().float().cpu().numpy() for v in columns.values()], axis=1).astype("<f4")
        header = "ply\nformat binary_little_endian 1.0\nelement vertex {}\n{}end_header\n".format(
            n, "".join(f"property float {name}\n" for name in columns))
        with open(path, "wb") as f:
            f.write(header.encode())
            f.write(data.tobytes())
        return Path(path)


def _reset_state(optimizer: torch.optim.Optimizer, name: str) -> None:
    for group in optimizer.param_groups:
        if group["name"] == name:
            state = optimizer.state.get(group["params"][0])
            if state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
