"""face-alignment's 3D-FAN as a landmark backend: 68 points (``topology.IBUG68``) with depth.

The weights are the three files face-alignment itself downloads into torch hub's cache
(``~/.cache/torch/hub/checkpoints``): the S3FD face detector, 3D-FAN-4 and its depth network.
They are read from ``track.model_dir``, which may be that cache folder; nothing is fetched.

face-alignment's own ``FaceAlignment`` runs one frame at a time and downloads missing
weights, so this backend builds its networks (``FAN``, ``ResNetDepth``, ``SFDDetector``) from
the local files and runs its steps (detect, crop, heatmaps, depth) on batches of frames on
the configured device, with face-alignment's own crop and heatmap helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..model_files import import_optional, require_files
from .topology import IBUG68

DETECTOR, FAN_WEIGHTS, DEPTH_WEIGHTS = "s3fd-619a316812.pth", "3DFAN4-7835d9f11d.pth.tar", "depth-2a464da4ea.pth.tar"
FAN_MODULES = 4  # 3D-FAN-4: four stacked hourglasses
BATCH_FRAMES = 8
USER = "track.landmark_backend=face_alignment"


def weight_files(folder: Path, setting: str) -> list[Path]:
    return require_files(folder, [DETECTOR, FAN_WEIGHTS, DEPTH_WEIGHTS], setting, USER)


def _load(net: torch.nn.Module, state: dict, path: Path, device: str) -> torch.nn.Module:
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # missing / unexpected / mis-shaped tensors: another model in the file
        first = str(e).splitlines()[1:3]
        raise ConfigError(f"{path} does not hold {type(net).__name__} weights of face-alignment's 3D-FAN-4 with "
                          f"68 points: {' '.join(line.strip() for line in first)}",
                          f"put face-alignment's own {path.name} in {path.parent}") from None
    return net.to(device).eval()


class FaceAlignment3D:
    name = "face_alignment"
    topology = IBUG68
    batch_frames = BATCH_FRAMES

    def __init__(self, files: list[Path], device: str, setting: str):
        import_optional("face_alignment", "face-alignment", USER)
        from face_alignment.detection.sfd.sfd_detector import SFDDetector
        from face_alignment.models import FAN, ResNetDepth

        detector, fan, depth = files
        self.device = str(device)
        try:
            self._detector = SFDDetector(device=self.device, path_to_detector=str(detector))
        except RuntimeError as e:
            raise ConfigError(f"{detector} does not hold face-alignment's S3FD face detector: {str(e).splitlines()[0]}",
                              f"put face-alignment's own {DETECTOR} in {setting}") from None
        self._fan = _load(FAN(FAN_MODULES), torch.load(fan, map_location="cpu", weights_only=True), fan, self.device)
        # The published depth checkpoint is a whole training checkpoint (face-alignment loads it
        # unrestricted too): it may run pickled code, so model_dir must hold files one trusts.
        checkpoint = torch.load(depth, map_location="cpu", weights_only=False)
        state = {k.replace("module.", ""): v for k, v in checkpoint["state_dict"].items()}
        self._depth = _load(ResNetDepth(), state, depth, self.device)

    @torch.no_grad()
    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        from face_alignment.utils import CENTER_Y_OFFSET, crop, draw_gaussian, get_preds_fromhm

        images = torch.from_numpy(np.stack([np.ascontiguousarray(f) for f in frames])).permute(0, 3, 1, 2)
        boxes = self._detector.detect_from_batch(images.float())
        found = [i for i, b in enumerate(boxes) if len(b)]
        out: list[np.ndarray | None] = [None] * len(frames)
        if not found:
            return out
        centres, scales, crops = [], [], []
        for i in found:
            x0, y0, x1, y1 = max(boxes[i], key=lambda b: b[4])[:4]  # the most confident face
            centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2 - (y1 - y0) * CENTER_Y_OFFSET])
            scale = (x1 - x0 + y1 - y0) / self._detector.reference_scale
            centres.append(centre)
            scales.append(scale)
            crops.append(crop(np.ascontiguousarray(frames[i]), centre, scale).transpose(2, 0, 1))
        batch = torch.from_numpy(np.stack(crops)).to(self.device, torch.float32) / 255.0
        heatmaps = self._fan(batch)[-1].float().cpu().numpy()
        preds = get_preds_fromhm(heatmaps)[0]  # (B, 68, 2) in heatmap pixels
        size = heatmaps.shape[-1]
        crop_res = batch.shape[-1]
        targets = np.zeros((len(found), 68, crop_res, crop_res), np.float32)
        for b, points in enumerate(preds * (crop_res / size)):
            for j, point in enumerate(points):
                if point[0] > 0 and point[1] > 0:
                    draw_gaussian(targets[b, j], point, 2)
        depth = self._depth(torch.cat([batch, torch.from_numpy(targets).to(self.device)], dim=1)).float().cpu().numpy()
        for b, i in enumerate(found):
            span = 200.0 * scales[b]  # face-alignment's crop side in image pixels
            xy = (preds[b] - size / 2) * (span / size) + centres[b] + 0.5  # their pixel centres sit at integers
            # 3D-FAN's depth grows towards the camera (300W-LP's fitted faces); ours grows away from it
            z = -depth[b] * (span / crop_res)
            out[i] = np.concatenate([xy, (z - np.median(z))[:, None]], axis=1).astype(np.float32)
        return out

    def close(self) -> None:
        self._fan = self._depth = self._detector = None
