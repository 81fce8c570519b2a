"""Gaussian rendering: the rasteriser (gsplat on CUDA, a PyTorch reference anywhere) and Gaussian sets."""

from .gaussians import GaussianModel
from .rasterize import rasterization

__all__ = ["GaussianModel", "rasterization"]
