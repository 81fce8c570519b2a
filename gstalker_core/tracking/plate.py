"""Static background plate: per-pixel median over sampled frames where the pixel is not
covered by the (dilated) person mask; pixels never uncovered are inpainted (Telea)."""

from __future__ import annotations

import cv2
import numpy as np

ROW_BAND = 32  # rows per median pass: bounds the float working copy whatever the resolution


def background_plate(frames: np.ndarray, person: np.ndarray, dilate_px: int) -> tuple[np.ndarray, float]:
    """Plate (H, W, 3) uint8 from sampled frames (F, H, W, 3) uint8 and person masks (F, H, W) bool.

    Returns the plate and the fraction of pixels that were inpainted.
    """
    if dilate_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        covered = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in person])
    else:
        covered = person.astype(bool)
    h, w = frames.shape[1:3]
    plate = np.zeros((h, w, 3), np.uint8)
    never = covered.all(axis=0)
    for y0 in range(0, h, ROW_BAND):
        rows = slice(y0, y0 + ROW_BAND)
        plate[rows] = _masked_median(frames[:, rows], covered[:, rows])
    if never.any():
        radius = max(3, int(0.02 * max(h, w)))
        plate = cv2.inpaint(plate, never.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    return plate, float(never.mean())


def _masked_median(values: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """Per-pixel median over axis 0 of (F, h, w, 3) uint8 ignoring ``masked`` (F, h, w); 0 where all masked.

    Sorting puts the masked entries (NaN) last, so the median of the k kept values sits at
    sorted positions (k - 1) // 2 and k // 2: one vectorised pass, no per-pixel Python.
    """
    band = values.astype(np.float32)
    band[masked] = np.nan
    band.sort(axis=0)
    kept = (~masked).sum(axis=0)[None, ..., None].repeat(3, axis=-1)
    lo = np.take_along_axis(band, np.maximum(kept - 1, 0) // 2, axis=0)[0]
    hi = np.take_along_axis(band, kept // 2, axis=0)[0]
    return np.nan_to_num((lo + hi) / 2).round().clip(0, 255).astype(np.uint8)
