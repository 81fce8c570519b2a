"""Evaluation on the held-out last 1/11 of the clip, always against two baselines.

Methods, rendered for the same held-out frames with the same poses and blinks:
- ``gstalker``: our deformation driven by each frame's own (training-clip) audio, with the
  static torso (``talking_head.NO_FRAME``: no training frame stands for a held-out pose);
- ``static``: the static fit stage's Gaussians (before deformation training), mouth frozen;
- ``nearest``: our model driven by the audio of the training frame whose audio features are
  closest (retrieval instead of generalisation).

Metrics: PSNR and SSIM on the full composite and on the face box; PSNR per parsed region
(head, neck + torso, background: where a method wins or loses); mouth-landmark distance
(our landmarker on rendered vs ground truth frames, mouth points, centred, in 512 px
pixels); lip sync without downloaded weights: correlation of rendered with true mouth
opening, and of rendered mouth opening with audio energy; landmark jitter. Frames whose
mouth tracking flagged as covered are left out of the mouth metrics (the truth's mouth is
not visible there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from . import audio, ingest, tracking
from .metrics import lipsync
from .train import static_fit
from .model.avatar import GaussianState, render_avatar
from .model.bundle import fetch_bundle
from .data.conditions import FrameSource, to_device
from .config import PipelineConfig, TrackConfig
from .media import VideoWriter
from .render.gaussians import GaussianModel
from .metrics import ssim
from .runtime import configure
from .model.talking_head import CanonicalCodes, TalkingHead
from .storage import ArtifactStore, StageManifest, StageRun, StageWork, fetch_part, run_stage
from .tracking import SpeakerDataset
from .tracking.landmarks import FACE_OVAL, MediapipeFaceMesh

STAGE = "evaluate"
CODE_VERSION = "2"  # 2: per-region PSNR, covered mouths out of the mouth metrics
METHODS = ("gstalker", "static", "nearest")
# parsing labels (tracking.parsing) grouped into the regions reported
REGIONS = {"head": (1,), "torso": (2, 3), "background": (0,)}
REPORT_JSON, REPORT_MD, VIDEO = "report.json", "report.md", "side_by_side.mp4"


class MethodScores(BaseModel):
    psnr: float
    ssim: float
    face_psnr: float
    face_ssim: float
    region_psnr: dict[str, float]  # REGIONS -> PSNR over that region's pixels of all frames
    mouth_landmark_distance_px512: float | None  # None: the landmarker found no face in any rendered frame
    mouth_opening_correlation: float  # with ground truth mouth opening
    audio_energy_correlation: float  # rendered mouth opening vs audio loudness
    jitter_px: float
    frames_without_face: int


class EvalReport(BaseModel):
    frames: int
    first_frame: int
    resolution: int
    mouth_frames: int  # frames scored on the mouth metrics (mouth not covered)
    truth_audio_energy_correlation: float  # the same correlation on the real frames, for scale
    methods: dict[str, MethodScores]

    def markdown(self) -> str:
        rows = ["| method | PSNR | SSIM | face PSNR | face SSIM | head / torso / background PSNR | "
                "mouth LMD (px@512) | mouth-open corr | audio-energy corr | jitter (px) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in self.methods.items():
            regions = " / ".join(f"{m.region_psnr[r]:.2f}" for r in REGIONS)
            rows.append(f"| {name} | {m.psnr:.2f} | {m.ssim:.4f} | {m.face_psnr:.2f} | {m.face_ssim:.4f} | {regions} | "
                        f"{_fmt(m.mouth_landmark_distance_px512)} | {m.mouth_opening_correlation:.3f} | "
                        f"{m.audio_energy_correlation:.3f} | {m.jitter_px:.3f} |")
        rows.append(f"\nHeld-out frames {self.first_frame}-{self.first_frame + self.frames - 1} "
                    f"({self.frames} frames, {self.resolution} px; mouth metrics on the {self.mouth_frames} with the mouth "
                    f"uncovered); real frames' audio-energy correlation: "
                    f"{self.truth_audio_energy_correlation:.3f}.")
        return "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "no face" if value is None else f"{value:.2f}"


def nearest_training_frames(features: np.ndarray, test_frames: np.ndarray, train_frames: np.ndarray) -> np.ndarray:
    """For each test frame, the training frame whose two audio steps are closest (L2)."""
    per_frame = features[: 2 * (len(features) // 2)].reshape(-1, 2 * features.shape[1])
    train = per_frame[train_frames]
    out = []
    for t in test_frames:
        out.append(train_frames[int(np.argmin(((train - per_frame[t]) ** 2).sum(axis=1)))])
    return np.asarray(out)


def face_box(landmarks: np.ndarray, size: int) -> tuple[slice, slice]:
    """The face oval's bounding box within the frame, at least one pixel (every frame is scored)."""
    pts = landmarks[FACE_OVAL, :2]
    (x0, y0), (x1, y1) = np.floor(pts.min(0)).astype(int), np.ceil(pts.max(0)).astype(int)
    y0, x0 = min(max(y0, 0), size - 1), min(max(x0, 0), size - 1)
    return slice(y0, min(max(y1, y0 + 1), size)), slice(x0, min(max(x1, x0 + 1), size))


def render_methods(model: TalkingHead, static: tuple[GaussianState, GaussianState], source: FrameSource,
                   frames: np.ndarray, nearest: np.ndarray, codes: CanonicalCodes | None = None
                   ) -> dict[str, torch.Tensor]:
    """(B, H, W, 3) composites in [0, 1] of held-out ``frames`` by each method, one rasteriser
    call per layer and method; ``nearest``: the training frame whose audio the ``nearest``
    baseline borrows for each; ``codes``: the model's ``canonical_codes()``."""
    rendered = {}
    for name in METHODS:
        if name == "static":
            head, torso = static
        else:
            cond = source.conditions(model, nearest if name == "nearest" else frames, poses=frames)
            head, torso = model.frames(cond, codes=codes)
        rendered[name] = render_avatar(head, torso, source.viewmats[to_device(frames, source.device)], source.K,
                                       source.plate).rgb.clamp(0, 1)
    return rendered


@torch.no_grad()
def evaluate(model: TalkingHead, static: tuple[GaussianModel, GaussianModel], test: SpeakerDataset,
             train_frames: np.ndarray, features: np.ndarray, samples_16k: np.ndarray, plate: np.ndarray,
             track_cfg: TrackConfig, video: Path | None = None, audio: Path | None = None, batch_frames: int = 8
             ) -> EvalReport:
    """Render the held-out frames with each method, ``batch_frames`` at a time on the model's
    device, score them, optionally write a side-by-side video."""
    frames = test.indices
    size = plate.shape[0]
    a = test.arrays
    source = FrameSource.build(a.viewmats, a.blink, a.K, plate, next(model.parameters()).device, features)
    static_states = (GaussianState.of(static[0].to(source.device)), GaussianState.of(static[1].to(source.device)))
    nearest = nearest_training_frames(features, frames, train_frames)
    codes = model.canonical_codes()
    detectors = {name: MediapipeFaceMesh(track_cfg) for name in (*METHODS, "truth")}
    landmarks = {name: [] for name in detectors}
    sums = {name: {"se": 0.0, "ssim": 0.0, "face_se": 0.0, "face_ssim": 0.0} for name in METHODS}
    region_se = {name: dict.fromkeys(REGIONS, 0.0) for name in METHODS}
    region_pixels = dict.fromkeys(REGIONS, 0)
    writer = VideoWriter(video, 4 * size, size, 25, audio=audio) if video else None
    try:
        for first in range(0, len(frames), batch_frames):
            batch = slice(first, first + batch_frames)
            batch_rgb = render_methods(model, static_states, source, frames[batch], nearest[batch], codes)
            images = {name: (rgb * 255).round().byte().cpu().numpy() for name, rgb in batch_rgb.items()}
            for k, t in enumerate(frames[batch]):
                sample = test.sample(int(t))
                truth = sample.rgb.numpy()
                rendered = {name: image[k] for name, image in images.items()}
                truth_lm = detectors["truth"].detect(truth)
                landmarks["truth"].append(truth_lm)
                box = face_box(truth_lm if truth_lm is not None else a.landmarks[t], size)
                truth_f = torch.from_numpy(truth.astype(np.float32) / 255.0)
                masks = {r: np.isin(sample.labels.numpy(), labels) for r, labels in REGIONS.items()}
                for r, mask in masks.items():
                    region_pixels[r] += int(mask.sum())
                for name, img in rendered.items():
                    img_f = torch.from_numpy(img.astype(np.float32) / 255.0)
                    pixel_se = ((img_f - truth_f) ** 2).mean(dim=-1).numpy()
                    for r, mask in masks.items():
                        region_se[name][r] += float(pixel_se[mask].sum())
                    s = sums[name]
                    s["se"] += float(pixel_se.mean())
                    s["ssim"] += ssim(img_f[None], truth_f[None]).item()
                    s["face_se"] += float(pixel_se[box].mean())
                    s["face_ssim"] += ssim(img_f[box][None], truth_f[box][None]).item()
                    landmarks[name].append(detectors[name].detect(img))
                if writer:
                    writer.write(np.concatenate([rendered["gstalker"], rendered["static"], rendered["nearest"], truth], 1))
    finally:
        for d in detectors.values():
            d.close()
    if writer:
        writer.close()
    energy = lipsync.audio_energy_per_frame(samples_16k, 16000, int(frames[-1]) + 1)[frames]
    # where the landmarker misses a real frame, the tracked landmarks of that frame stand in
    truth_lm = np.stack([f if f is not None else test.arrays.landmarks[t] for f, t in zip(landmarks["truth"], frames)])
    uncovered = ~test.arrays.mouth_covered[frames]
    truth_open = lipsync.mouth_opening(truth_lm)
    n = len(frames)
    scores = {}
    for name in METHODS:
        # landmark metrics only on frames where the landmarker found the rendered face: a
        # method is never credited with the truth's landmarks; lost frames are counted
        detected = np.array([x is not None for x in landmarks[name]])
        found = detected & uncovered
        lm = _stack(landmarks[name], found, truth_lm[:0])
        opening = lipsync.mouth_opening(lm)
        s = sums[name]
        scores[name] = MethodScores(
            psnr=_psnr(s["se"], n), ssim=s["ssim"] / n, face_psnr=_psnr(s["face_se"], n),
            face_ssim=s["face_ssim"] / n,
            region_psnr={r: _psnr(region_se[name][r], region_pixels[r]) for r in REGIONS},
            mouth_landmark_distance_px512=lipsync.mouth_landmark_distance(lm, truth_lm[found], size)
            if found.any() else None,
            mouth_opening_correlation=lipsync.pearson(opening, truth_open[found]),
            audio_energy_correlation=lipsync.pearson(opening, energy[found]),
            jitter_px=lipsync.landmark_jitter(_stack(landmarks[name], detected, truth_lm[:0])),
            frames_without_face=int((~detected).sum()))
    return EvalReport(frames=n, first_frame=int(frames[0]), resolution=size, mouth_frames=int(uncovered.sum()),
                      truth_audio_energy_correlation=lipsync.pearson(truth_open[uncovered], energy[uncovered]),
                      methods=scores)


def _stack(per_frame: list[np.ndarray | None], keep: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """The kept frames' landmarks as one array (``empty`` when none is kept)."""
    kept = [x for x, use in zip(per_frame, keep) if use]
    return np.stack(kept) if kept else empty


def _psnr(squared_error: float, count: int) -> float:
    """PSNR of the mean of ``count`` summed squared errors (pixels, or per-frame means); 0 when
    there are none (a region absent from every frame)."""
    return float(-10 * np.log10(max(squared_error / count, 1e-10))) if count else 0.0


def work(bundle_run: StageManifest, ingest_run: StageManifest, cfg: PipelineConfig) -> StageWork:
    return StageWork(STAGE, CODE_VERSION, cfg.track, {"bundle": bundle_run.key, "ingest": ingest_run.key})


def stage_key(bundle_run: StageManifest, ingest_run: StageManifest, cfg: PipelineConfig) -> str:
    return work(bundle_run, ingest_run, cfg).key


def run(store: ArtifactStore, ingest_run: StageManifest, track_run: StageManifest, audio_run: StageManifest,
        static_run: StageManifest, bundle_run: StageManifest, cfg: PipelineConfig) -> StageRun:
    """The ``evaluate`` stage: report (JSON + markdown) and side-by-side video of the held-out frames."""
    from .media import decode_audio

    def build(workdir: Path) -> dict:
        bundle = fetch_bundle(store, bundle_run, cfg.cache_dir)
        test = tracking.open_dataset(store, track_run, ingest_run, cfg.cache_dir, split="test", shuffle=False)
        train_frames = np.arange(bundle.manifest.n_train_frames)
        features = audio.load_features(store, audio_run, cfg.cache_dir, expected=bundle.manifest.audio_spec)
        wav = ingest.audio_path(store, ingest_run, cfg.cache_dir)
        samples = decode_audio(wav, 16000)
        first, last = int(test.indices[0]), int(test.indices[-1]) + 1
        segment = workdir.parent / f"{workdir.name}-heldout.wav"
        _cut_wav(wav, segment, first / 25, (last - first) / 25)
        try:
            static = tuple(GaussianModel.load(fetch_part(store, static_run, name, cfg.cache_dir))
                           for name in (static_fit.HEAD, static_fit.TORSO))
            report = evaluate(bundle.model.to(configure(cfg.runtime)), static, test, train_frames, features, samples,
                              bundle.plate, cfg.track, video=workdir / VIDEO, audio=segment,
                              batch_frames=cfg.runtime.batch_frames)
        finally:
            segment.unlink(missing_ok=True)
        (workdir / REPORT_JSON).write_text(report.model_dump_json(indent=2))
        (workdir / REPORT_MD).write_text(report.markdown() + "\n")
        return report.model_dump(mode="json")

    return run_stage(store, work(bundle_run, ingest_run, cfg), build, cfg.cache_dir)


def _cut_wav(source: Path, dest: Path, start_s: float, duration_s: float) -> Path:
    import ffmpeg

    (ffmpeg.input(str(source), ss=start_s, t=duration_s).output(str(dest), loglevel="error")
     .overwrite_output().run(capture_stdout=True, capture_stderr=True))
    return dest
