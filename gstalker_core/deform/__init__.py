"""Audio-driven deformation networks: tri-plane hash encoding, audio encoder, face and torso fields."""

from .audio_encoder import AudioEncoder, audio_windows, frame_offsets, receptive_steps
from ..config import DeformConfig
from .fields import (POSE_DIM, DeformDeltas, FaceDeformField, TorsoDeformField, pose_condition, quat_multiply,
                     reference_pose)
from .hashgrid import HashGrid2D, TcnnHashGrid2D, level_resolutions, make_hash_grid, spatial_hash
from .triplane import TriPlaneEncoder

__all__ = ["AudioEncoder", "DeformConfig", "DeformDeltas", "FaceDeformField", "HashGrid2D", "POSE_DIM",
           "TcnnHashGrid2D", "TorsoDeformField", "TriPlaneEncoder", "audio_windows", "frame_offsets",
           "level_resolutions", "make_hash_grid", "pose_condition", "quat_multiply", "receptive_steps",
           "reference_pose", "spatial_hash"]
