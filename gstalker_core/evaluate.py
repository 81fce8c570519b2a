"""Evaluation on the held-out last 1/11 of the clip, always against three baselines.

Methods, rendered for the same held-out frames with the same poses and blinks:
- ``gstalker``: our deformation driven by each frame's own (training-clip) audio, with the
  static torso (``talking_head.NO_FRAME``: no training frame stands for a held-out pose) at
  the frame's tracked torso shift (``tracking.torso``, as the head at its tracked pose), and
  the lip gain a dub of the held-out audio gets (``model.lip_gain``);
- ``no_lip_gain``: the same at gain 1 (what the calibrated gain adds or costs);
- ``no_deformation``: the trained model's Gaussians with no deformation (the ablation: what
  the fields add over the Gaussians they were trained with);
- ``static``: the static fit stage's Gaussians (before deformation training), mouth frozen;
- ``nearest``: our model driven by the audio of the training frame whose audio features are
  closest (retrieval instead of generalisation), with our lip gain.

Metrics: PSNR and SSIM on the full composite and on the face box; PSNR per parsed region
(head, neck + torso, background: where a method wins or loses); person coverage (the share
of the person mask's pixels the composite covers opaquely, mean and worst frame: background
showing between chin and collar lowers it; and its mean inside the silhouette's 1 px edge,
where holes show without the anti-aliased edge); mouth-landmark distance (our landmarker on
rendered vs ground truth frames, mouth points, centred, in pixels of the rendered frames);
lip sync without downloaded weights: correlation of rendered with true mouth opening, and of
rendered mouth opening with audio energy, and the mouth opening's spread; landmark jitter. Frames whose mouth tracking
flagged as covered are left out of the mouth metrics (the truth's mouth is not visible
there). Per-frame curves (PSNR of each method, mouth opening of ours and of the truth) are
stored beside the report and plotted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, model_validator

from . import audio, ingest, tracking
from .metrics import lipsync
from .train import static_fit
from .model.avatar import GaussianState
from .model.bundle import fetch_bundle
from .data.conditions import FrameSource
from .config import PipelineConfig, TrackConfig
from .media import VideoWriter
from .render.gaussians import GaussianModel
from .metrics import person_coverage, silhouette_interior, ssim
from .runtime import configure
from .model.lip_gain import LipGain, utterance_motion
from .model.talking_head import CanonicalCodes, LipMotion, TalkingHead
from .storage import ArtifactStore, StageManifest, StageRun, StageWork, fetch_part, run_stage
from .tracking import SpeakerDataset
from .tracking.landmarks import MediapipeFaceMesh
from .tracking.topology import FACEMESH, Topology

STAGE = "evaluate"
# 3: person coverage, the no-deformation ablation, face SSIM of small boxes, mouth-landmark
# distance in rendered pixels, per-frame curves and their plot; 4: coverage inside the silhouette;
# 5: lip gain (and the no_lip_gain row), mouth-opening spread; 6: the gain around the utterance's mean motion;
# 7: the mouth rests in the held-out audio's pauses, as in a dub; 8: the pauses found in the held-out
# audio alone, the nearest baseline resting in them too, the lip-gain-1 row with the rest
CODE_VERSION = "8"
METHODS = ("gstalker", "no_lip_gain", "no_deformation", "static", "nearest")
METHOD_LABELS = {"gstalker": "gstalker", "no_lip_gain": "gstalker, lip gain 1",
                 "no_deformation": "trained Gaussians, no deformation",
                 "static": "static fit (mouth frozen)", "nearest": "nearest-neighbour audio"}
VIDEO_PANELS = (*METHODS, "truth")  # the side-by-side video, left to right
# parsing labels (tracking.parsing) grouped into the regions reported
REGIONS = {"head": (1,), "torso": (2, 3), "background": (0,)}
REPORT_JSON, REPORT_MD, VIDEO, CURVES_JSON, PLOT = (
    "report.json", "report.md", "side_by_side.mp4", "curves.json", "curves.png")


class MethodScores(BaseModel):
    psnr: float
    ssim: float
    face_psnr: float
    face_ssim: float
    region_psnr: dict[str, float]  # REGIONS -> PSNR over that region's pixels of all frames
    # share of person-mask pixels with composite alpha >= metrics.COVERED_ALPHA, mean over frames
    # and worst frame; None: a report from before coverage was measured
    person_coverage: float | None = None
    person_coverage_worst_frame: float | None = None
    # the same share inside the silhouette's 1 px edge ring (metrics.silhouette_interior), mean
    # over frames: holes, not anti-aliased edges; None: a report from before it was measured
    person_coverage_interior: float | None = None
    # in pixels of the rendered frames (EvalReport.resolution); None: the landmarker found no
    # face in any rendered frame
    mouth_landmark_distance_px: float | None
    mouth_opening_correlation: float  # with ground truth mouth opening
    mouth_opening_std: float | None = None  # spread over the frames; None: a report from before it was measured
    audio_energy_correlation: float  # rendered mouth opening vs audio loudness
    jitter_px: float
    frames_without_face: int


class EvalReport(BaseModel):
    frames: int
    first_frame: int
    resolution: int
    mouth_frames: int  # frames scored on the mouth metrics (mouth not covered)
    truth_audio_energy_correlation: float  # the same correlation on the real frames, for scale
    truth_mouth_opening_std: float | None = None  # the real frames' mouth-opening spread
    lip_gain: float | None = None  # the held-out utterance's lip gain (gstalker, nearest)
    methods: dict[str, MethodScores]

    @model_validator(mode="before")
    @classmethod
    def _read_code_version_2(cls, data):
        """A report of evaluation code version 2 gave the mouth-landmark distance in pixels of a
        512 px frame: read back in rendered pixels (the inverse of its scaling)."""
        if not (isinstance(data, dict) and isinstance(data.get("methods"), dict)):
            return data
        methods = {}
        for name, scores in data["methods"].items():
            if isinstance(scores, dict) and "mouth_landmark_distance_px512" in scores:
                scores = dict(scores)  # the caller's dict (a stage manifest's meta) stays as stored
                px512 = scores.pop("mouth_landmark_distance_px512")
                scores["mouth_landmark_distance_px"] = None if px512 is None else px512 * data["resolution"] / 512
            methods[name] = scores
        return {**data, "methods": methods}

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Column names and one row of formatted figures per method (the markdown report and
        the CLI's table)."""
        columns = ["method", "PSNR", "SSIM", "face PSNR", "face SSIM", "head / torso / background PSNR",
                   "person covered (mean / worst frame; inside the edge)", f"mouth LMD (px@{self.resolution})", "mouth-open corr",
                   "mouth-open std", "audio-energy corr", "jitter (px)"]
        rows = []
        for name, m in self.methods.items():
            rows.append([METHOD_LABELS.get(name, name), f"{m.psnr:.2f}", f"{m.ssim:.4f}", f"{m.face_psnr:.2f}",
                         f"{m.face_ssim:.4f}", " / ".join(f"{m.region_psnr[r]:.2f}" for r in REGIONS),
                         _coverage(m), _fmt(m.mouth_landmark_distance_px), f"{m.mouth_opening_correlation:.3f}",
                         _fmt(m.mouth_opening_std, ".4f", "not measured"), f"{m.audio_energy_correlation:.3f}", f"{m.jitter_px:.3f}"])
        return columns, rows

    def caption(self) -> str:
        truth_std = ("" if self.truth_mouth_opening_std is None
                     else f", mouth-opening std: {self.truth_mouth_opening_std:.4f}")
        gain = "" if self.lip_gain is None else f" Lip gain of the held-out audio: {self.lip_gain:.2f}."
        return (f"Held-out frames {self.first_frame}-{self.first_frame + self.frames - 1} ({self.frames} frames, "
                f"{self.resolution} px; mouth metrics on the {self.mouth_frames} with the mouth uncovered); real "
                f"frames' audio-energy correlation: {self.truth_audio_energy_correlation:.3f}{truth_std}.{gain}")

    def markdown(self) -> str:
        columns, rows = self.table()
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + f"\n\n{self.caption()}"


def _fmt(value: float | None, spec: str = ".2f", missing: str = "no face") -> str:
    return missing if value is None else f"{value:{spec}}"


def _coverage(m: MethodScores) -> str:
    if m.person_coverage is None:
        return "not measured"
    inside = "" if m.person_coverage_interior is None else f"; {100 * m.person_coverage_interior:.1f}%"
    return f"{100 * m.person_coverage:.1f}% / {100 * m.person_coverage_worst_frame:.1f}%{inside}"


class FrameCurves(BaseModel):
    """Per-frame series over the held-out frames (``CURVES_JSON``, plotted in ``PLOT``)."""

    frames: list[int]
    psnr: dict[str, list[float]]  # method -> PSNR of each frame
    person_coverage: dict[str, list[float]]  # method -> share of the frame's person pixels covered
    # method or "truth" -> inner-lip gap over mouth width; None where the frame is not scored
    # (mouth covered, or no face found in the render)
    mouth_opening: dict[str, list[float | None]]


def plot_curves(curves: FrameCurves, path: Path) -> Path:
    """PNG of the per-frame PSNR of each method and the mouth opening of ours against the truth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever backend the process chose: no display needed
    psnr_ax, mouth_ax = fig.subplots(2, 1, sharex=True)
    for name, series in curves.psnr.items():
        psnr_ax.plot(curves.frames, series, label=METHOD_LABELS.get(name, name), linewidth=1)
    psnr_ax.set_ylabel("PSNR (dB)")
    psnr_ax.set_title("held-out frames")
    psnr_ax.legend(fontsize="small")
    for name, label, colour in (("truth", "truth", "black"), ("gstalker", "gstalker", "tab:blue")):
        opening = [np.nan if v is None else v for v in curves.mouth_opening[name]]
        mouth_ax.plot(curves.frames, opening, label=label, color=colour, linewidth=1)
    mouth_ax.set_ylabel("mouth opening (gap / width)")
    mouth_ax.set_xlabel("frame")
    mouth_ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


def nearest_training_frames(features: np.ndarray, test_frames: np.ndarray, train_frames: np.ndarray) -> np.ndarray:
    """For each test frame, the training frame whose two audio steps are closest (L2)."""
    per_frame = features[: 2 * (len(features) // 2)].reshape(-1, 2 * features.shape[1])
    train = per_frame[train_frames]
    out = []
    for t in test_frames:
        out.append(train_frames[int(np.argmin(((train - per_frame[t]) ** 2).sum(axis=1)))])
    return np.asarray(out)


def face_box(landmarks: np.ndarray, topology: Topology, size: int) -> tuple[slice, slice]:
    """The face oval's bounding box within the frame, at least one pixel (every frame is scored)."""
    pts = landmarks[topology.face_oval, :2]
    (x0, y0), (x1, y1) = np.floor(pts.min(0)).astype(int), np.ceil(pts.max(0)).astype(int)
    y0, x0 = min(max(y0, 0), size - 1), min(max(x0, 0), size - 1)
    return slice(y0, min(max(y1, y0 + 1), size)), slice(x0, min(max(x1, x0 + 1), size))


@dataclass
class MethodRender:
    """A method's rendered batch: (B, H, W, 3) composites in [0, 1] and their (B, H, W, 1)
    opacity (``Layers.alpha``)."""

    rgb: torch.Tensor
    alpha: torch.Tensor


def render_methods(model: TalkingHead, static: tuple[GaussianState, GaussianState], source: FrameSource,
                   frames: np.ndarray, nearest: np.ndarray, codes: CanonicalCodes | None = None,
                   lip: LipMotion | None = None) -> dict[str, MethodRender]:
    """Each method's render of held-out ``frames``, one rasteriser call per layer and method;
    ``nearest``: the training frame whose audio the ``nearest`` baseline borrows for each;
    ``codes``: the model's ``canonical_codes()``; ``lip``: the held-out utterance's lip motion (the
    ``no_lip_gain`` row keeps its rest in pauses at gain 1). Every method that moves rests where
    the held-out audio pauses."""
    at_gain_1 = None if lip is None else LipMotion(lip.reference, 1.0, rest=lip.rest)
    rendered = {}
    for name in METHODS:
        if name == "static":
            head, torso = static
        else:
            cond = source.conditions(model, nearest if name == "nearest" else frames, poses=frames, pauses=frames)
            head, torso = model.frames(cond, deform=name != "no_deformation", codes=codes,
                                       lip=at_gain_1 if name == "no_lip_gain" else lip)
        layers = source.render(head, torso, frames)
        rendered[name] = MethodRender(layers.rgb.clamp(0, 1), layers.alpha)
    return rendered


def held_out_pauses(samples_16k: np.ndarray, frames: np.ndarray, n_frames: int, fps: int = 25) -> np.ndarray:
    """(n_frames,) ``audio.speaking`` of the clip's frames: the held-out ``frames`` (consecutive)
    measured on their own audio, as a dub of it would be; 1 (speech) elsewhere."""
    per_frame = 16000 // fps
    first, stop = int(frames[0]), int(frames[-1]) + 1
    pauses = np.ones(n_frames, np.float32)
    held_out = audio.Signal.of_array(samples_16k[first * per_frame:stop * per_frame], 16000)
    pauses[first:stop] = audio.speaking(held_out, stop - first, fps)
    return pauses


@dataclass
class Evaluation:
    """What ``evaluate`` measured: the summary (the stage's metadata) and the per-frame series."""

    report: EvalReport
    curves: FrameCurves


@torch.no_grad()
def evaluate(model: TalkingHead, static: tuple[GaussianModel, GaussianModel], test: SpeakerDataset,
             train_frames: np.ndarray, features: np.ndarray, samples_16k: np.ndarray, plate: np.ndarray,
             track_cfg: TrackConfig, video: Path | None = None, audio: Path | None = None, batch_frames: int = 8,
             calibration: LipGain | None = None) -> Evaluation:
    """Render the held-out frames with each method, ``batch_frames`` at a time on the model's
    device, score them, optionally write a side-by-side video. ``calibration``: the model's
    lip gain (the bundle's), applied as a dub of the held-out audio applies it."""
    frames = test.indices
    size = plate.shape[0]
    a = test.arrays
    source = FrameSource.build(a.viewmats, a.blink, a.K, plate, next(model.parameters()).device, features,
                               torso_shift=a.torso_shift,
                               speaking=held_out_pauses(samples_16k, frames, len(features) // 2))
    static_states = (GaussianState.of(static[0].to(source.device)), GaussianState.of(static[1].to(source.device)))
    nearest = nearest_training_frames(features, frames, train_frames)
    codes = model.canonical_codes()
    lip = utterance_motion(model, model.audio_encoder.conditions(features, int(frames[0]), int(frames[-1]) + 1),
                           calibration)
    detectors = {name: MediapipeFaceMesh(track_cfg) for name in VIDEO_PANELS}
    landmarks = {name: [] for name in detectors}
    sums = {name: {"se": 0.0, "ssim": 0.0, "face_se": 0.0, "face_ssim": 0.0} for name in METHODS}
    region_se = {name: dict.fromkeys(REGIONS, 0.0) for name in METHODS}
    region_pixels = dict.fromkeys(REGIONS, 0)
    frame_psnr = {name: [] for name in METHODS}
    coverage = {name: [] for name in METHODS}
    interior_coverage = {name: [] for name in METHODS}
    writer = VideoWriter(video, len(VIDEO_PANELS) * size, size, 25, audio=audio) if video else None
    try:
        for first in range(0, len(frames), batch_frames):
            batch = slice(first, first + batch_frames)
            renders = render_methods(model, static_states, source, frames[batch], nearest[batch], codes, lip)
            images = {name: (r.rgb * 255).round().byte().cpu().numpy() for name, r in renders.items()}
            alphas = {name: r.alpha.cpu() for name, r in renders.items()}
            for k, t in enumerate(frames[batch]):
                sample = test.sample(int(t))
                truth = sample.rgb.numpy()
                rendered = {name: image[k] for name, image in images.items()}
                truth_lm = detectors["truth"].detect(truth)
                landmarks["truth"].append(truth_lm)
                box = (face_box(truth_lm, FACEMESH, size) if truth_lm is not None
                       else face_box(a.landmarks[t], test.topology, size))
                truth_f = torch.from_numpy(truth.astype(np.float32) / 255.0)
                masks = {r: np.isin(sample.labels.numpy(), labels) for r, labels in REGIONS.items()}
                person = torch.from_numpy(~masks["background"])
                interior = silhouette_interior(person)
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
                    frame_psnr[name].append(_psnr(float(pixel_se.mean()), 1))
                    coverage[name].append(person_coverage(alphas[name][k], person))
                    interior_coverage[name].append(person_coverage(alphas[name][k], interior))
                    landmarks[name].append(detectors[name].detect(img))
                if writer:
                    writer.write(np.concatenate([*(rendered[name] for name in METHODS), truth], 1))
    finally:
        for d in detectors.values():
            d.close()
    if writer:
        writer.close()
    energy = lipsync.audio_energy_per_frame(samples_16k, 16000, int(frames[-1]) + 1)[frames]
    # where the landmarker misses a real frame, the tracked landmarks of that frame stand in when
    # they are FaceMesh's too; with a track of another topology (unknown: NaN) that frame is left
    # out of the mouth metrics like a covered mouth
    unknown = np.full((FACEMESH.n_points, 3), np.nan, np.float32)
    tracked = test.topology is FACEMESH
    truth_lm = np.stack([f if f is not None else a.landmarks[t] if tracked else unknown
                         for f, t in zip(landmarks["truth"], frames)])
    uncovered = ~test.arrays.mouth_covered[frames] & np.isfinite(truth_lm).all(axis=(1, 2))
    truth_open = lipsync.mouth_opening(truth_lm, FACEMESH)
    n = len(frames)
    scores = {}
    opening_curves = {"truth": _per_frame(truth_open[uncovered], uncovered)}
    for name in METHODS:
        # landmark metrics only on frames where the landmarker found the rendered face: a
        # method is never credited with the truth's landmarks; lost frames are counted
        detected = np.array([x is not None for x in landmarks[name]])
        found = detected & uncovered
        lm = _stack(landmarks[name], found, truth_lm[:0])
        opening = lipsync.mouth_opening(lm, FACEMESH)
        opening_curves[name] = _per_frame(opening, found)
        s = sums[name]
        scores[name] = MethodScores(
            psnr=_psnr(s["se"], n), ssim=s["ssim"] / n, face_psnr=_psnr(s["face_se"], n),
            face_ssim=s["face_ssim"] / n,
            region_psnr={r: _psnr(region_se[name][r], region_pixels[r]) for r in REGIONS},
            person_coverage=float(np.mean(coverage[name])), person_coverage_worst_frame=float(np.min(coverage[name])),
            person_coverage_interior=float(np.mean(interior_coverage[name])),
            mouth_landmark_distance_px=lipsync.mouth_landmark_distance(lm, truth_lm[found], FACEMESH)
            if found.any() else None,
            mouth_opening_correlation=lipsync.pearson(opening, truth_open[found]),
            mouth_opening_std=float(np.std(opening)) if len(opening) > 1 else None,
            audio_energy_correlation=lipsync.pearson(opening, energy[found]),
            jitter_px=lipsync.landmark_jitter(_stack(landmarks[name], detected, truth_lm[:0])),
            frames_without_face=int((~detected).sum()))
    report = EvalReport(frames=n, first_frame=int(frames[0]), resolution=size, mouth_frames=int(uncovered.sum()),
                        truth_audio_energy_correlation=lipsync.pearson(truth_open[uncovered], energy[uncovered]),
                        truth_mouth_opening_std=float(np.std(truth_open[uncovered])) if uncovered.sum() > 1 else None,
                        lip_gain=lip.gain,
                        methods=scores)
    curves = FrameCurves(frames=[int(t) for t in frames], psnr=frame_psnr, person_coverage=coverage,
                         mouth_opening=opening_curves)
    return Evaluation(report, curves)


def _per_frame(kept_values: np.ndarray, kept: np.ndarray) -> list[float | None]:
    """The kept frames' values in place over all frames, None at the others."""
    values = iter(kept_values)
    return [float(next(values)) if use else None for use in kept]


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
    """The ``evaluate`` stage: report (JSON + markdown), side-by-side video, per-frame curves
    (JSON + plot) of the held-out frames."""
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
            result = evaluate(bundle.model.to(configure(cfg.runtime)), static, test, train_frames, features, samples,
                              bundle.plate, cfg.track, video=workdir / VIDEO, audio=segment,
                              batch_frames=cfg.runtime.batch_frames, calibration=bundle.manifest.lip_gain)
        finally:
            segment.unlink(missing_ok=True)
        (workdir / REPORT_JSON).write_text(result.report.model_dump_json(indent=2))
        (workdir / REPORT_MD).write_text(result.report.markdown() + "\n")
        (workdir / CURVES_JSON).write_text(result.curves.model_dump_json())
        plot_curves(result.curves, workdir / PLOT)
        return result.report.model_dump(mode="json")

    return run_stage(store, work(bundle_run, ingest_run, cfg), build, cfg.cache_dir)


def _cut_wav(source: Path, dest: Path, start_s: float, duration_s: float) -> Path:
    import ffmpeg

    (ffmpeg.input(str(source), ss=start_s, t=duration_s).output(str(dest), loglevel="error")
     .overwrite_output().run(capture_stdout=True, capture_stderr=True))
    return dest
