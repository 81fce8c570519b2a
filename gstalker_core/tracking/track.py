"""The tracking core: frames in, every per-frame track and the stage's parts out.

``track_clip`` takes any random-access sequence of RGB uint8 (R, R, 3) frames (a list in
tests, the ingest stage's ``ChunkReader`` in the pipeline) and makes two streaming passes:

1. detection: landmarks (the configured backend, a batch of frames at a time), selfie-
   segmentation person mask (kept as a temporary chunked sequence), frame level and
   difference (black frames, scene cuts), lip/cheek colour contrast (covered mouth), and a
   sample of frames + masks for the background plate;
2. after the clip-level solves (template, focal, poses, gaps, smoothing, blink, covered
   mouth): labels from person mask + landmarks, then the QA video.

Every landmark group is read through the backend's topology (``topology.py``), which the
manifest names (``landmark_topology``) for the stages that read the stored landmarks.

Memory: the per-frame tracks (P points) and at most ``plate_frames`` sampled frames,
plus one chunk of frames / masks and one batch of frames; never the whole clip's pixels.
"""

from __future__ import annotations

import tempfile
from itertools import islice
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
from pydantic import BaseModel

from ..errors import ConfigError, InputError
from ..data.frames import ChunkReader, ChunkWriter
from ..mediapipe_models import solutions
from . import pose
from .blink import eye_aspect_ratio, normalise_blink
from ..config import TrackConfig
from .landmarks import LandmarkBackend, make_backend
from .occlusion import covered_mouth, mouth_skin_contrast
from .parsing import Parser
from .plate import background_plate
from .topology import FACEMESH
from .torso import torso_shifts

Progress = Callable[[int, Optional[int]], None]

LABELS = "labels"
VIEWMATS, INTRINSICS, LANDMARKS, BLINK, VALID, MOUTH_COVERED, TEMPLATE, TORSO_SHIFT = (
    "viewmats.npy", "K.npy", "landmarks.npy", "blink.npy", "valid.npy", "mouth_covered.npy", "template.npy",
    "torso_shift.npy")
PLATE, QA_VIDEO = "plate.png", "qa.mp4"
SMOOTHING = "zero-lag one-euro: mean of forward and backward one-euro passes over rotation (deg) and translation (cm)"
THUMB = 32  # side of the grey thumbnails used for black-frame and scene-cut detection
SECOND_FACE_EVERY = 25  # frames between checks for a second face
# A focal search whose residual varies by less than this fraction of itself has found noise,
# not a minimum: the clip's head motion cannot separate distance from focal length.
FLAT_FOCAL_SEARCH = 0.05


class FrameRange(BaseModel):
    """Frames ``start`` .. ``stop - 1``."""

    start: int
    stop: int


class TrackManifest(BaseModel):
    """Meta of the ``track`` stage; arrays live in the parts named by the module constants."""

    n_frames: int
    resolution: int
    fps: int
    chunk_frames: int
    focal: float
    fov_deg: float
    focal_search_spread_px: float  # residual range over the focal search; small = focal weakly determined
    K: list[list[float]]
    reprojection_error_px: float  # stable points, smoothed poses, valid frames
    reprojection_error_raw_px: float  # same, unsmoothed fits
    jitter_raw_px: float  # mean acceleration of reprojected stable points, unsmoothed poses
    jitter_smoothed_px: float
    jitter_landmarks_px: float  # same figure on the detector's own stable landmarks
    smoothing: str
    # defaults: what tracks stored before the backends were optional had
    landmark_backend: str = "mediapipe"
    landmark_topology: str = FACEMESH.name  # the groups (``topology.topology_named``) that index landmarks.npy
    blink_open_ear: float
    blink_closed_ear: float
    blink_mean: float
    n_valid: int
    gaps: list[FrameRange]  # interpolated runs (valid=False inside)
    mouth_covered: list[FrameRange]  # mouth hidden (hand over it): landmarks there guessed, frames not trained on
    plate_inpainted_fraction: float
    torso_shift_max_px: float = 0.0  # the largest tracked torso shift (``tracking.torso``), either axis
    warnings: list[str]
    train: FrameRange
    test: FrameRange


def frame_ranges(flags: np.ndarray) -> list[FrameRange]:
    """Runs of True in a boolean array."""
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [FrameRange(start=int(a), stop=int(b)) for a, b in zip(edges[::2], edges[1::2])]


def describe(ranges: list[FrameRange], fps: int) -> str:
    return ", ".join(f"frames {r.start}-{r.stop - 1} ({r.start / fps:.2f}-{r.stop / fps:.2f} s)" for r in ranges)


def split_ranges(n: int) -> tuple[FrameRange, FrameRange]:
    """The field's protocol: train on the first 10/11 of the frames, test on the last 1/11."""
    n_test = max(1, n // 11)
    return FrameRange(start=0, stop=n - n_test), FrameRange(start=n - n_test, stop=n)


def _check_points(points: np.ndarray, backend: LandmarkBackend) -> np.ndarray:
    """A backend's points for one face, refused unless they have its topology's shape."""
    want = (backend.topology.n_points, 3)
    if np.shape(points) != want:
        raise ConfigError(f"track.landmark_backend={backend.name} returned points of shape {np.shape(points)} for a "
                          f"face, but its topology {backend.topology.name} has shape {want}: the model in "
                          "track.model_dir is not the one this backend expects",
                          "point track.model_dir at the backend's own model files (see the README, 'Optional "
                          "backends')")
    return points


def _detect_pass(frames: Sequence[np.ndarray], cfg: TrackConfig, person_writer: ChunkWriter,
                 progress: Progress | None, device: str) -> dict:
    n = len(frames)
    plate_at = set(np.linspace(0, n - 1, min(cfg.plate_frames, n)).round().astype(int).tolist())
    plate_frames, plate_masks = [], []
    second_face_checks, second_faces = 0, 0
    backend = make_backend(cfg, device)
    topology = backend.topology
    landmarks = np.zeros((n, topology.n_points, 3), np.float32)
    found = np.zeros(n, bool)
    level, change = np.zeros(n), np.zeros(n)
    mouth_contrast = np.full(n, np.nan)
    sol = solutions()
    segmenter = sol.selfie_segmentation.SelfieSegmentation(model_selection=0)
    detector = sol.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.6)
    previous = None
    remaining = iter(frames)
    try:
        for first in range(0, n, backend.batch_frames):
            batch = [np.ascontiguousarray(frame) for frame in islice(remaining, backend.batch_frames)]
            for i, frame in enumerate(batch, start=first):
                thumb = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (THUMB, THUMB),
                                   interpolation=cv2.INTER_AREA).astype(np.float32)
                level[i] = thumb.mean()
                change[i] = 0.0 if previous is None else float(np.abs(thumb - previous).mean())
                previous = thumb
            lit = [i for i in range(first, first + len(batch)) if level[i] >= cfg.black_level]
            faces = dict(zip(lit, backend.detect_batch([batch[i - first] for i in lit])))
            for i, frame in enumerate(batch, start=first):
                if i not in faces:
                    person = np.zeros(frame.shape[:2], bool)
                else:
                    if faces[i] is not None:
                        landmarks[i], found[i] = _check_points(faces[i], backend), True
                        mouth_contrast[i] = mouth_skin_contrast(frame, faces[i], topology)
                    person = segmenter.process(frame).segmentation_mask > cfg.person_threshold
                    if i % SECOND_FACE_EVERY == 0:
                        second_face_checks += 1
                        second_faces += len(detector.process(frame).detections or []) > 1
                person_writer.write(person.astype(np.uint8))
                if i in plate_at:
                    plate_frames.append(frame.copy())
                    plate_masks.append(person)
                if progress:
                    progress(i + 1, 2 * n)
    finally:
        backend.close()
        segmenter.close()
        detector.close()
    return dict(landmarks=landmarks, found=found, level=level, change=change, mouth_contrast=mouth_contrast,
                plate_frames=np.stack(plate_frames), plate_masks=np.stack(plate_masks),
                second_face_share=second_faces / max(second_face_checks, 1), backend=backend.name, topology=topology)


def _check_cuts(change: np.ndarray, black: np.ndarray, cfg: TrackConfig, fps: int) -> None:
    """Refuse the clip at a jump of the frame difference far above its typical level
    (cuts into or out of black frames are the black frames' business, not a cut)."""
    steady = ~(black | np.roll(black, 1))
    steady[0] = False
    if steady.sum() < 2:
        return
    threshold = max(cfg.scene_cut_min_level, cfg.scene_cut_factor * float(np.median(change[steady])))
    cuts = np.flatnonzero(steady & (change > threshold))
    if len(cuts):
        where = ", ".join(f"frame {c} ({c / fps:.2f} s)" for c in cuts[:10])
        raise InputError(f"the clip has {len(cuts)} scene cut(s), at {where}: tracking needs one continuous shot",
                         "trim the clip to a single shot of the speaker and submit it again")


def _check_gaps(bad: np.ndarray, causes: dict[str, np.ndarray], cfg: TrackConfig, fps: int) -> list[FrameRange]:
    gaps = frame_ranges(bad)
    long = [g for g in gaps if g.stop - g.start > cfg.max_gap_frames]
    if long:
        parts = []
        for g in long:
            why = [name for name, flags in causes.items() if flags[g.start:g.stop].any()]
            parts.append(f"{describe([g], fps)}: {' / '.join(why)}")
        raise InputError(
            f"{len(long)} stretch(es) longer than track.max_gap_frames={cfg.max_gap_frames} frames have no usable "
            f"face: " + "; ".join(parts),
            "trim those stretches out of the clip (or cut the clip there) and submit it again")
    return gaps


def track_clip(frames: Sequence[np.ndarray] | ChunkReader, cfg: TrackConfig, workdir: Path,
               progress: Progress | None = None, fps: int = 25, chunk_frames: int = 100, device: str = "cpu"
               ) -> TrackManifest:
    """Track a clip of square RGB uint8 frames; write every part into ``workdir``.

    ``frames`` needs ``len``, indexing and iteration (a list, or a ``ChunkReader`` whose
    sequential reads decompress each chunk once). ``chunk_frames``: chunk size of the
    stored labels; pass the frames' own so training reads one chunk of each together.
    ``device``: where a torch or ONNX landmark backend runs.
    Raises ``InputError`` for scene cuts, too small a face, no face at all, and stretches
    of unusable frames longer than ``cfg.max_gap_frames``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(frames)
    if n < 3:
        raise InputError(f"the clip has {n} frame(s)", "give a clip of at least a few seconds")
    height, width = np.asarray(frames[0]).shape[:2]
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gstalker-person-") as tmp:
        person_writer = ChunkWriter(Path(tmp), "person", chunk_frames)
        det = _detect_pass(frames, cfg, person_writer, progress, device)
        person_writer.close()
        person = ChunkReader(person_writer.files, chunk_frames, n)

        landmarks, found, topology = det["landmarks"], det["found"], det["topology"]
        black = det["level"] < cfg.black_level
        _check_cuts(det["change"], black, cfg, fps)
        if not found.any():
            raise InputError("no face was found in any frame of the clip",
                             "give a clip where the speaker's face is visible and frontal")
        face_width = float(np.median(np.ptp(landmarks[found][:, topology.face_oval, 0], axis=1))) / width
        if face_width < cfg.min_face_fraction:
            raise InputError(f"the face is only {face_width:.0%} of the crop's width "
                             f"(track.min_face_fraction={cfg.min_face_fraction:.0%})",
                             "re-ingest with a tighter crop (lower ingest.crop_scale) or use a closer shot")
        if det["second_face_share"] > 0.2:
            warnings.append(f"a second face is visible in {det['second_face_share']:.0%} of checked frames; "
                            "the tracker follows one face: check the QA video, crop the other person out if it jumps")

        fit_idx = np.flatnonzero(found)
        sample = fit_idx[np.linspace(0, len(fit_idx) - 1, min(300, len(fit_idx))).round().astype(int)]
        choice = pose.choose_focal(landmarks, found, width, (cfg.fov_min_deg, cfg.fov_max_deg), cfg.focal_fit_frames,
                                   topology)
        focal = choice.focal
        if choice.spread < FLAT_FOCAL_SEARCH * choice.residual:
            focal = pose.focal_from_fov(cfg.fov_prior_deg, width)
            warnings.append(f"this clip does not determine the focal length (the reprojection error varies by only "
                            f"{choice.spread:.3f} px over {cfg.fov_min_deg:g}-{cfg.fov_max_deg:g} deg, as when the "
                            f"head barely turns): using track.fov_prior_deg={cfg.fov_prior_deg:g}")
        template = pose.learn_template(pose.lift_landmarks(landmarks[sample], focal, width / 2, height / 2, topology),
                                       topology)
        points_2d = landmarks[..., :2]
        K = pose.intrinsics(focal, width, height)
        fit = pose.fit_poses(template, points_2d, found, K, topology)

        residual = fit.residual[found]
        med = float(np.median(residual))
        mad = float(np.median(np.abs(residual - med))) * 1.4826
        outlier = found & (np.nan_to_num(fit.residual) > max(med + cfg.outlier_mad * mad,
                                                             cfg.outlier_min_px_fraction * width))
        valid = found & ~black & ~outlier
        gaps = _check_gaps(~valid, {"black frames": black, "no face found": ~found & ~black,
                                    "pose fit failed": outlier}, cfg, fps)
        if gaps:
            warnings.append(f"{int((~valid).sum())} frame(s) interpolated: {describe(gaps, fps)}")

        rvecs, tvecs = pose.interpolate_poses(fit.rvecs, fit.tvecs, valid)
        landmarks = pose.interpolate_landmarks(landmarks, valid).astype(np.float32)
        smooth_r, smooth_t = pose.smooth_poses(rvecs, tvecs, fps, cfg.smooth_min_cutoff_hz, cfg.smooth_beta)
        views_raw, views = pose.viewmats(rvecs, tvecs), pose.viewmats(smooth_r, smooth_t)
        stable = template[topology.stable].astype(np.float64)
        proj_raw, proj = pose.project(stable, views_raw, K), pose.project(stable, views, K)
        observed = landmarks[:, topology.stable, :2]
        err_raw = float(np.linalg.norm(proj_raw - observed, axis=-1)[valid].mean())
        err = float(np.linalg.norm(proj - observed, axis=-1)[valid].mean())

        yaw = pose.yaw_pitch_roll_deg(smooth_r)[:, 0]
        turned = frame_ranges(np.abs(yaw) > cfg.profile_yaw_deg)
        if turned:
            warnings.append(f"head turned beyond {cfg.profile_yaw_deg:g} deg (near profile) in {describe(turned, fps)}: "
                            "landmarks there are less reliable; trim those stretches if the QA video shows errors")

        blink, open_ear, closed_ear = normalise_blink(eye_aspect_ratio(landmarks, topology), valid)
        covered = covered_mouth(det["mouth_contrast"], valid, cfg.mouth_cover_ratio)
        covered_ranges = frame_ranges(covered)
        if covered_ranges:
            warnings.append(f"the mouth looks covered (a hand or an object over it) in "
                            f"{describe(covered_ranges, fps)}: its landmarks there are guesses, so those "
                            f"{int(covered.sum())} frame(s) are left out of training; check the QA video, and "
                            "lower track.mouth_cover_ratio if the mouth is in fact visible")

        parser = Parser(height, width, cfg.neck_half_width, cfg.neck_length, topology)
        label_writer = ChunkWriter(workdir, LABELS, chunk_frames)
        for i in range(n):
            label_writer.write(parser.labels(person[i] > 0, landmarks[i]))
            if progress:
                progress(n + i + 1, 2 * n)
        label_writer.close()
        labels = ChunkReader(label_writer.files, chunk_frames, n)
        torso_shift = torso_shifts(frames, labels, float(np.percentile(landmarks[valid][:, topology.chin, 1], 99)))

    plate, inpainted = background_plate(det["plate_frames"], det["plate_masks"],
                                        round(cfg.plate_dilate_fraction * width))
    cv2.imwrite(str(workdir / PLATE), cv2.cvtColor(plate, cv2.COLOR_RGB2BGR))
    for name, array in ((VIEWMATS, views), (INTRINSICS, K.astype(np.float32)), (LANDMARKS, landmarks),
                        (BLINK, blink), (VALID, valid), (MOUTH_COVERED, covered), (TEMPLATE, template),
                        (TORSO_SHIFT, torso_shift)):
        np.save(workdir / name, array)
    if cfg.qa_video:
        from .qa import write_qa_video

        write_qa_video(workdir / QA_VIDEO, frames, labels,
                       landmarks, views, K, valid, topology, fps)

    train, test = split_ranges(n)
    return TrackManifest(
        n_frames=n, resolution=width, fps=fps, chunk_frames=chunk_frames, focal=focal,
        fov_deg=float(np.degrees(2 * np.arctan(height / 2 / focal))), K=K.tolist(),
        focal_search_spread_px=choice.spread,
        reprojection_error_px=err, reprojection_error_raw_px=err_raw,
        jitter_raw_px=pose.jitter(proj_raw), jitter_smoothed_px=pose.jitter(proj),
        jitter_landmarks_px=pose.jitter(observed), smoothing=SMOOTHING, landmark_backend=det["backend"],
        landmark_topology=topology.name,
        blink_open_ear=open_ear, blink_closed_ear=closed_ear, blink_mean=float(blink.mean()),
        torso_shift_max_px=float(np.abs(torso_shift).max()),
        n_valid=int(valid.sum()), gaps=gaps, mouth_covered=covered_ranges, plate_inpainted_fraction=inpainted,
        warnings=warnings, train=train, test=test)
