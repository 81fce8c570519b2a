"""Knobs of the deformation networks (tri-plane hash field, audio encoder, face and torso fields).

Defaults are the preview profile: sized so that a 2-core CPU evaluates ~20k Gaussians for a
few frames per training step quickly (most hash levels fit a dense grid, evaluated by
``grid_sample``). The paper profile (GPU) uses more levels, finer grids, bigger tables and
wider MLPs (ER-NeRF-sized tri-plane).

The audio feature layout (``n_features``, ``step_window``) is not here: it belongs to the
audio features the model is trained on (``AudioConfig`` / ``AudioFeatureSpec``) and is
passed to the audio encoder explicitly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import Section


class DeformConfig(Section):
    """Deformation networks. Changing any field changes the trained model (and its cache key)."""

    grid_backend: Literal["torch", "tcnn"] = Field(
        default="torch", description="hash grid implementation; 'tcnn' needs tinycudann and CUDA, and its "
                                     "weights do not load into the portable 'torch' backend")
    hash_levels: int = Field(default=8, ge=1, le=32, description="resolution levels per plane")
    hash_features: int = Field(default=2, ge=1, le=8, description="features per level")
    hash_log2_table: int = Field(default=14, ge=8, le=24,
                                 description="log2 of the hash table size per level; levels whose grid fits are dense")
    hash_base_resolution: int = Field(default=16, ge=2, description="cells per side at the coarsest level")
    hash_max_resolution: int = Field(default=256, ge=2, description="cells per side at the finest level")
    audio_channels: int = Field(default=64, ge=4, description="conv width of the per-frame audio encoder")
    audio_code_dim: int = Field(default=32, ge=2, description="per-frame audio code = the face field's audio condition")
    frame_window: int = Field(default=8, ge=1, le=32,
                              description="neighbouring frames the temporal smoother weighs (t-w/2 .. t+w/2-1)")
    face_mlp_width: int = Field(default=64, ge=4)
    face_mlp_depth: int = Field(default=2, ge=1, description="hidden layers of the face field MLP")
    torso_mlp_width: int = Field(default=32, ge=4)
    torso_mlp_depth: int = Field(default=2, ge=1, description="hidden layers of the torso field MLP")
    torso_frequencies: int = Field(default=4, ge=0, le=12, description="sin/cos octaves encoding torso centres")
    torso_latent_dim: int = Field(default=8, ge=0, le=64, description="per-training-frame latent of the torso field")

    @model_validator(mode="after")
    def _resolutions_ordered(self) -> "DeformConfig":
        if self.hash_max_resolution < self.hash_base_resolution:
            raise ValueError(f"hash_max_resolution ({self.hash_max_resolution}) must be >= "
                             f"hash_base_resolution ({self.hash_base_resolution})")
        return self

