"""Multi-resolution 2D hash encoding (instant-ngp) in pure PyTorch, for one or several planes.

Level l has ``res_l = floor(base * b**l)`` cells per side, ``b = exp((ln max - ln base) / (L - 1))``,
so ``res_l + 1`` vertices per side. A point p in [0, 1]^2 sits at ``p * res_l`` in vertex units:
vertex (ix, iy) is at (ix / res_l, iy / res_l), and the feature is the bilinear blend of the
four surrounding vertices (``align_corners=True`` semantics: p = 0 and p = 1 hit the corner
vertices exactly).

Storage per level:
- ``(res + 1)**2 <= T`` (T = 2**log2_table_size): a dense grid, a ``(P, F, res+1, res+1)``
  parameter indexed ``[plane, feature, iy, ix]`` and evaluated by ``F.grid_sample`` (one fused
  kernel; on a CPU about 10x faster per level than gathering four corners by index);
- otherwise a hash table of T rows: vertex (ix, iy) lives in row ``(ix * 1 xor iy * 2654435761) mod T``
  (the instant-ngp spatial hash; T is a power of two, so mod is a mask and uint32 wrap-around
  in instant-ngp gives the same low bits as our int64 arithmetic). All hashed levels of all
  planes share one ``(P, L_hash, T, F)`` parameter and are evaluated in one vectorised gather.

``TcnnHashGrid2D`` is the optional tiny-cuda-nn backend with the same call signature (its
resolution convention and weight layout are tiny-cuda-nn's, so its weights are not
interchangeable with ``HashGrid2D``'s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

HASH_PRIME_Y = 2654435761  # instant-ngp's second coordinate prime (the first is 1)


def level_resolutions(n_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """Cells per side of each level, geometric from base to max (both included)."""
    if n_levels == 1:
        return [base_resolution]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (n_levels - 1))
    # the epsilon keeps base * growth**(L-1) == max from flooring to max - 1
    return [int(math.floor(base_resolution * growth**level + 1e-6)) for level in range(n_levels)]


def spatial_hash(ix: torch.Tensor, iy: torch.Tensor, table_size: int) -> torch.Tensor:
    """instant-ngp hash of integer vertex coordinates into ``[0, table_size)`` (a power of two)."""
    return torch.bitwise_xor(ix, iy * HASH_PRIME_Y) & (table_size - 1)


def dense_lookup(grid: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup in dense vertex grids ``(P, F, res+1, res+1)`` at ``xy`` (P, N, 2) in [0, 1] -> (P, N, F)."""
    sample_at = (xy * 2 - 1).unsqueeze(1)  # (P, 1, N, 2): x indexes width (ix), y height (iy)
    out = F.grid_sample(grid, sample_at, mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, :, 0].transpose(1, 2)


def table_lookup(tables: torch.Tensor, xy: torch.Tensor, resolutions: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup in per-level vertex tables ``(P, L, T, F)`` at ``xy`` (P, N, 2) in [0, 1] -> (P, L, N, F).

    A level whose ``(res + 1)**2`` vertices fit in T rows indexes them densely (``iy * (res+1) + ix``,
    the layout of a flattened dense grid), the others through ``spatial_hash``.
    """
    n_planes, n_levels, table_size, n_feat = tables.shape
    res = resolutions.to(xy.device)
    scaled = xy[:, None] * res.to(xy.dtype)[None, :, None, None]  # (P, L, N, 2)
    # p = 1 lands on vertex res: use the last cell with weight 1 on its far corner
    cell = torch.minimum(scaled.detach().floor().long(), (res - 1)[None, :, None, None])
    frac = scaled - cell
    ix0, iy0 = cell[..., 0], cell[..., 1]
    fx, fy = frac[..., 0], frac[..., 1]

    dense = ((res + 1) ** 2 <= table_size)[None, :, None]
    side = (res + 1)[None, :, None]

    def row(ix: torch.Tensor, iy: torch.Tensor) -> torch.Tensor:
        return torch.where(dense, iy * side + ix, spatial_hash(ix, iy, table_size))

    corners = torch.stack([row(ix0, iy0), row(ix0 + 1, iy0), row(ix0, iy0 + 1), row(ix0 + 1, iy0 + 1)], dim=-1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=-1)  # (P, L, N, 4)
    level_base = torch.arange(n_planes * n_levels, device=xy.device).view(n_planes, n_levels, 1, 1) * table_size
    # index_select, not F.embedding or [] indexing: its backward (index_add) is 3-6x faster on a CPU
    rows = tables.reshape(-1, n_feat).index_select(0, (corners + level_base).reshape(-1))
    rows = rows.view(*corners.shape, n_feat)  # (P, L, N, 4, F)
    return (rows * weights.unsqueeze(-1)).sum(dim=-2)


class HashGrid2D(nn.Module):
    """Multi-resolution hash encoding of points on ``n_planes`` independent 2D planes.

    ``forward(xy)``: ``xy`` (N, 2) when ``n_planes == 1`` or (P, N, 2), coordinates in [0, 1]
    (clamped) -> (N, L*F) or (P, N, L*F), level-major (level 0's F features first).
    Differentiable with respect to the grids, the tables and ``xy``.
    """

    def __init__(self, n_levels: int, features_per_level: int, log2_table_size: int, base_resolution: int,
                 max_resolution: int, n_planes: int = 1, init_scale: float = 1e-4):
        super().__init__()
        self.n_planes = n_planes
        self.features_per_level = features_per_level
        self.table_size = 2**log2_table_size
        self.resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        self.output_dim = n_levels * features_per_level
        dense = [r for r in self.resolutions if (r + 1) ** 2 <= self.table_size]
        hashed = self.resolutions[len(dense):]  # resolutions grow, so the dense levels come first

        def uniform(*shape: int) -> nn.Parameter:  # instant-ngp's init: tiny, so early training sees ~0 features
            return nn.Parameter(torch.empty(*shape).uniform_(-init_scale, init_scale))

        self.dense_grids = nn.ParameterList([uniform(n_planes, features_per_level, r + 1, r + 1) for r in dense])
        self.hash_tables = uniform(n_planes, len(hashed), self.table_size, features_per_level) if hashed else None
        self.register_buffer("hash_resolutions", torch.tensor(hashed, dtype=torch.long), persistent=False)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        single = xy.dim() == 2
        planes = (xy[None] if single else xy).clamp(0, 1)
        if planes.shape[0] != self.n_planes or planes.shape[-1] != 2:
            raise ValueError(f"expected points of shape ({self.n_planes}, N, 2), got {tuple(xy.shape)}")
        per_level = [dense_lookup(grid, planes) for grid in self.dense_grids]  # each (P, N, F)
        if self.hash_tables is not None:
            per_level.extend(table_lookup(self.hash_tables, planes, self.hash_resolutions).unbind(1))
        out = torch.cat(per_level, dim=-1)
        return out[0] if single else out


class TcnnHashGrid2D(nn.Module):
    """tiny-cuda-nn hash grids (one per plane) behind ``HashGrid2D``'s interface; CUDA only."""

    def __init__(self, n_levels: int, features_per_level: int, log2_table_size: int, base_resolution: int,
                 max_resolution: int, n_planes: int = 1):
        super().__init__()
        try:
            import tinycudann as tcnn
        except ImportError as e:
            raise ConfigError(f"deform.grid_backend is 'tcnn' but tinycudann does not import ({e})",
                              "install tiny-cuda-nn's torch bindings on the GPU machine, "
                              "or set deform.grid_backend=torch")
        if not torch.cuda.is_available():
            raise ConfigError("deform.grid_backend is 'tcnn' but CUDA is not available",
                              "use deform.grid_backend=torch on machines without a GPU")
        growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        encoding = {"otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": features_per_level,
                    "log2_hashmap_size": log2_table_size, "base_resolution": base_resolution,
                    "per_level_scale": growth}
        self.n_planes = n_planes
        self.output_dim = n_levels * features_per_level
        self.planes = nn.ModuleList([tcnn.Encoding(2, encoding) for _ in range(n_planes)])

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        single = xy.dim() == 2
        planes = (xy[None] if single else xy).clamp(0, 1)
        out = torch.stack([enc(p).float() for enc, p in zip(self.planes, planes)])
        return out[0] if single else out


def tcnn_usable() -> bool:
    """Whether the ``tcnn`` backend can run here: tinycudann imports and CUDA is present."""
    try:
        import tinycudann  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_hash_grid(backend: str, n_planes: int, n_levels: int, features_per_level: int, log2_table_size: int,
                   base_resolution: int, max_resolution: int) -> HashGrid2D | TcnnHashGrid2D:
    use_tcnn = backend == "tcnn" or (backend == "auto" and tcnn_usable())
    cls = TcnnHashGrid2D if use_tcnn else HashGrid2D
    return cls(n_levels, features_per_level, log2_table_size, base_resolution, max_resolution, n_planes=n_planes)
