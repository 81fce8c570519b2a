"""GPU figures of the paper profile in one run: gsplat parity, training step times, render FPS,
where a step's time goes, and a short real training with held-out PSNR.

    bash bench/gpu.sh                                               # the GPU box: wheels, ffmpeg, then this
    python3 bench/gpu_bench.py --payload bench/gpu_payload --budget-s 400
    .venv/bin/python bench/gpu_bench.py --device cpu --smoke         # here: every section but parity, tiny sizes

The speaker comes prepared (bench/prepare_gpu_payload.py: the ingest, track and audio stages
of a clip at 512 px, since the box cannot track one); the bench works on a scratch copy of
its store. ``--smoke`` prepares a tiny-profile speaker from 3 s of the sample clip instead
(unless ``--payload`` names one) and runs every section at toy sizes, so that the code paths
run on a CPU.

Sections, in order, each timed; one that fails, or that the budget or the time limit's
SIGTERM stops, is recorded with its reason and the next one runs:
a. parity: our PyTorch reference vs gsplat (bench/gsplat_parity.py): images, alpha, depth and
   gradients, shared and per-camera Gaussians; gsplat's first use builds its CUDA kernels
   (timed apart);
b. steps: the median time of a static-fit step (``static_fit.step_loss`` + backward + Adam,
   the sample fetched as the fit does), a landmark step and a deformation rendering step
   (``PhotometricLoss`` of ``frames_per_step`` frames + landmark guide + backward + Adam, past
   the head's unfreezing and the lips' weighting), with the profile's networks over the static
   fit's initial Gaussians, after warm-up, synchronised;
c. fps: ``dub.render_chunk`` at the speaker's resolution with deformation, 1 frame (one
   stream) and batches, against the targets (>= 250 FPS single, >= 500 batched);
d. profile: torch.profiler over a few static-fit steps, deformation rendering steps and
   single-frame dub renders: the device's busy time against the wall time, kernel launches
   and host waits a call; operator tables (by device time, host time and Python stack) and
   two chrome traces go to --profile-dir;
e. training: ``static_fit.run`` and ``train_deform.run`` with the paper profile and the
   iteration counts asked (scaled down to the budget left, by b's step times; the schedule's
   milestones compressed with them), then held-out
   PSNR of every evaluation method (``evaluate.render_methods``: ours and its baselines) and the trained
   model's render FPS.
The markdown table is printed last; --results-md, --append-md and --results-json write it too.
If gsplat's kernels do not build, gsplat is hidden so that the stages' ``auto`` rasteriser
falls back to the PyTorch reference: sections b-e then measure that, as the header says.
--sections picks the sections to run (c and d need b's model and steps; e plans its
iteration counts with b's step times, and runs them as asked without).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gstalker_core import audio, evaluate, tracking  # noqa: E402
from gstalker_core.train import static_fit, train_deform  # noqa: E402
from gstalker_core.audio import AudioFeatureSpec  # noqa: E402
from gstalker_core.model.avatar import GaussianState  # noqa: E402
from gstalker_core.model.bundle import fetch_bundle  # noqa: E402
from gstalker_core.data.conditions import FrameSource  # noqa: E402
from gstalker_core.config import PipelineConfig, load_config  # noqa: E402
from gstalker_core.dub import render_chunk  # noqa: E402
from gstalker_core.metrics import psnr_of_mse  # noqa: E402
from gstalker_core.render.gaussians import GaussianModel  # noqa: E402
from gstalker_core.runtime import configure  # noqa: E402
from gstalker_core.storage import ArtifactStore, StageManifest, fetch_part, find_stage, open_store  # noqa: E402
from gstalker_core.model.lip_gain import utterance_motion  # noqa: E402
from gstalker_core.model.talking_head import TalkingHead  # noqa: E402
from gstalker_core.tracking import SpeakerDataset  # noqa: E402
from prepare_gpu_payload import DEFAULT_CLIP, DEFAULT_OUT, PAYLOAD_FILE, prepare_store  # noqa: E402

FPS_TARGETS = {"single": 250.0, "batched": 500.0}
TIMED_LIP_GAIN = 1.5  # render FPS is timed with a lip gain, as a calibrated speaker is dubbed
# Training set-up and scoring beside the steps (decoding, checkpoints, held-out rendering).
RESERVE_S = 30.0
# Densification grows the Gaussians past b's initial count, so real steps run slower than b's.
STEP_SAFETY = 1.5
MEASURE_CAP_S = 20.0  # a step-time or FPS measurement stops repeating after this
SMOKE_ARGS = dict(static_iters=12, guide_iters=4, render_iters=6, warmup=1, step_repeats=3, fps_repeats=2, batches=[4])
SMOKE_CLIP_S = 3.0  # of the sample clip, at the tiny profile: the smoke run's speaker
Add = Callable[..., None]  # SectionResult.add: name, value[, note]


class Skip(Exception):
    """The section cannot run here; the message says why."""


class OutOfTime(Exception):
    """The time limit's SIGTERM arrived."""


def stop_on_term(signum, frame) -> None:
    raise OutOfTime("stopped by the time limit (SIGTERM)")


@dataclass
class Figure:
    name: str
    value: str
    note: str = ""


@dataclass
class SectionResult:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    error: str = ""
    figures: list[Figure] = field(default_factory=list)

    def add(self, name: str, value: str, note: str = "") -> None:
        print(f"  {name}: {value}  {note}", flush=True)
        self.figures.append(Figure(name, value, note))


# -- the prepared speaker ------------------------------------------------------------------

@dataclass
class Speaker:
    payload: dict
    overrides: list[str]  # the payload's, then the bench's home, store and device
    cfg: PipelineConfig
    store: ArtifactStore
    ingest: StageManifest
    track: StageManifest
    audio: StageManifest
    device: torch.device
    train: SpeakerDataset
    plate: np.ndarray
    features: np.ndarray
    spec: AudioFeatureSpec
    source: FrameSource  # the whole clip's poses and audio, on the device

    def config(self, *more: str) -> PipelineConfig:
        return load_config(self.payload["profile"], overrides=[*self.overrides, *more], environ={})


def open_speaker(payload_dir: Path, device: str, workdir: Path) -> Speaker:
    payload = json.loads((payload_dir / PAYLOAD_FILE).read_text())
    # the stages the bench adds go to a scratch copy: the carried payload stays as prepared
    shutil.copytree(payload_dir / "store", workdir / "store")
    overrides = [*payload["overrides"], f"home={workdir / 'home'}", f"store.url={workdir / 'store'}",
                 f"runtime.device={device}"]
    cfg = load_config(payload["profile"], overrides=overrides, environ={})
    store = open_store(cfg)
    runs = {stage: find_stage(store, stage, key) for stage, key in payload["stages"].items()}
    absent = [stage for stage, run in runs.items() if run is None]
    if absent:
        raise FileNotFoundError(f"stages {absent} are not in {payload_dir}'s store: run bench/prepare_gpu_payload.py")
    torch_device = configure(cfg.runtime)
    train = tracking.open_dataset(store, runs["track"], runs["ingest"], cfg.cache_dir, split="train",
                                  seed=cfg.static.seed)
    plate = static_fit.read_plate(store, runs["track"], cfg.cache_dir)
    features = audio.load_features(store, runs["audio"], cfg.cache_dir)
    spec = audio.AudioFeaturesMeta.model_validate(runs["audio"].meta).spec
    a = train.arrays
    return Speaker(payload, overrides, cfg, store, runs["ingest"], runs["track"], runs["audio"], torch_device, train,
                   plate, features, spec,
                   FrameSource.build(a.viewmats, a.blink, a.K, plate, torch_device, features,
                                     torso_shift=a.torso_shift, maskable_bands=spec.n_features))


# -- the run's state, shared by the sections -----------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, payload: Path, workdir: Path):
        self.args, self.payload, self.workdir = args, payload, workdir
        self.device = torch.device(args.device)
        self.deadline = time.monotonic() + args.budget_s
        self.stopped = False
        self.rasteriser: str | None = None
        self.kernel_build_s: float | None = None
        self.kernel_error = ""
        self.model: TalkingHead | None = None  # section b's, for c and d
        self.step_s: dict[str, float] = {}  # section b's, for e's plan
        self.steps: dict[str, Callable[[int], None]] = {}  # section b's, for d's profile
        self._speaker: Speaker | Exception | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def speaker(self) -> Speaker:
        """Opened once; a failure to open it fails every section that asks, with the same error."""
        if self._speaker is None:
            try:
                self._speaker = open_speaker(self.payload, self.args.device, self.workdir)
            except Exception as err:  # noqa: BLE001 - kept to be raised for every section that needs it
                self._speaker = err
        if isinstance(self._speaker, Exception):
            raise self._speaker
        return self._speaker

    def ensure_rasteriser(self) -> str:
        """What the stages' ``auto`` rasteriser uses here; on CUDA, gsplat's kernels are built
        (once) first, and gsplat is hidden when they do not build."""
        if self.rasteriser is None:
            if self.device.type != "cuda":
                self.rasteriser = "numba (CPU)"
            else:
                try:
                    self.kernel_build_s = build_gsplat_kernels()
                    self.rasteriser = "gsplat"
                except OutOfTime:
                    raise
                except Exception as err:  # noqa: BLE001 - recorded, and the reference takes over
                    traceback.print_exc()
                    self.kernel_error = f"{type(err).__name__}: {err}"
                    sys.modules["gsplat"] = None  # rasterize's `import gsplat` fails: auto picks the reference
                    self.rasteriser = "torch reference (gsplat unusable)"
        return self.rasteriser


def build_gsplat_kernels() -> float:
    """Seconds gsplat takes to JIT-build its CUDA kernels (or load them, when built before)."""
    start = time.perf_counter()
    from gsplat.cuda._backend import _C

    if _C is None:
        raise RuntimeError("gsplat found no CUDA toolkit (nvcc) to build its kernels with")
    return time.perf_counter() - start


def median_seconds(step: Callable[[int], None], warmup: int, repeats: int, device: torch.device
                   ) -> tuple[float, int]:
    """Median wall time of ``step(i)`` over ``repeats`` calls after ``warmup``, synchronised, and
    the number of calls timed: fewer when they pass MEASURE_CAP_S (a slow fallback rasteriser
    must not eat the budget of the sections after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, start_all = [], time.perf_counter()
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - start)
        if i >= warmup and time.perf_counter() - start_all > MEASURE_CAP_S:
            break
    timed = times[warmup:]
    return statistics.median(timed), len(timed)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# -- a. parity -----------------------------------------------------------------------------

def section_parity(bench: Bench, add: Add) -> None:
    if bench.device.type != "cuda":
        raise Skip("needs CUDA (gsplat has no CPU path)")
    bench.ensure_rasteriser()
    if bench.kernel_error:
        raise RuntimeError(f"gsplat's kernels did not build: {bench.kernel_error}")
    add("kernel build (JIT)", f"{bench.kernel_build_s:.0f} s",
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'unset')}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}")
    import gsplat_parity as parity

    torch.set_float32_matmul_precision("highest")  # TF32 products would move the reference by ~1e-3
    checks = parity.run_checks()
    add("checks passed", f"{sum(c.passed for c in checks)}/{len(checks)}",
        f"tolerances: image and alpha {parity.IMAGE_TOL:g} abs, depth {parity.DEPTH_REL_TOL:g} rel, "
        f"gradients {parity.GRAD_REL_TOL:g} rel; shared and per-camera Gaussians, classic and antialiased")
    groups = {"image/alpha": ("rgb", "alpha"), "depth": ("depth(rel)",),
              "gradients": tuple(f"d/{name}" for name in parity.NAMES)}
    for group, quantities in groups.items():
        worst = max((c for c in checks if c.quantity in quantities), key=lambda c: c.value)
        add(f"worst {group}", f"{worst.value:.1e}", f"{worst.scene}, {worst.mode}, {worst.quantity}")
    for c in checks:
        if not c.passed:
            add("FAIL", f"{c.value:.1e}", f"{c.scene}, {c.mode}, {c.quantity}: {c.over} of {c.entries} over")


# -- b. step times -------------------------------------------------------------------------

def initial_gaussians(sp: Speaker) -> tuple[GaussianModel, GaussianModel]:
    """The static fit's starting head and torso Gaussians (as ``fit_static`` makes them), on the device."""
    cfg, a = sp.cfg.static, sp.train.arrays
    head = GaussianModel.init_random(cfg.gaussians, cfg.n_head, *static_fit.head_volume(a.template), seed=cfg.seed)
    depth = float(np.median(a.viewmats[:, 2, 3]))
    torso = GaussianModel.init_points(cfg.gaussians, *static_fit.torso_points(sp.train, a.K, depth, cfg.n_torso,
                                                                              cfg.seed), seed=cfg.seed)
    return head.to(sp.device), torso.to(sp.device)


def static_step(sp: Speaker, head: GaussianModel, torso: GaussianModel) -> Callable[[int], None]:
    optimizers = (head.make_optimizer(), torso.make_optimizer())

    def step(i: int) -> None:
        _, _, loss = static_fit.step_loss(head, torso, sp.source, sp.train.sample(sp.train.index_at(i)), sp.cfg.static)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step


def talking_head(sp: Speaker, head: GaussianModel, torso: GaussianModel) -> TalkingHead:
    """A model of the profile's size over these Gaussians, set up as ``train_deform.run`` does."""
    cfg, train = sp.cfg, sp.train
    model = TalkingHead(cfg.deform.resolved(), head, torso, sp.spec.width, cfg.audio.step_window,
                        torch.from_numpy(train.arrays.viewmats[train.indices]))
    model.audio_encoder.set_feature_stats(sp.features[: 2 * len(train.indices)])
    return model.to(sp.device)


def deformation_steps(sp: Speaker, model: TalkingHead) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """A landmark step and a rendering step, as ``train_deformation`` takes them."""
    cfg = sp.cfg.train
    model.torso.requires_grad_(False)  # as train_deformation: the torso Gaussians are not trained
    optimizer = train_deform.make_optimizer(model, cfg)
    guide = train_deform.LandmarkGuide(model, sp.train, sp.source, cfg)
    photometric = train_deform.PhotometricLoss(model, sp.train, sp.source, cfg)

    def update(step: int, loss: torch.Tensor) -> None:
        train_deform.set_learning_rates(optimizer, cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def guide_step(i: int) -> None:
        update(i, guide.loss(i))

    # rendering steps past unfreeze_step and lip_start cost the most: the head Gaussians train, the mouth weighs
    first = max(cfg.unfreeze_step, cfg.lip_start)

    def render_step(i: int) -> None:
        step = cfg.guide_iterations + first + i
        update(step, cfg.guide_weight * guide.loss(step) + photometric.loss(first + i)[0])

    return guide_step, render_step


def section_steps(bench: Bench, add: Add) -> None:
    bench.ensure_rasteriser()
    sp, args = bench.speaker(), bench.args

    def measure(kind: str, step: Callable[[int], None]) -> str:
        bench.steps[kind] = step
        bench.step_s[kind], count = median_seconds(step, args.warmup, args.step_repeats, sp.device)
        return f"median of {count} after {args.warmup}"

    head, torso = initial_gaussians(sp)
    timing = measure("static", static_step(sp, head, torso))
    add("static-fit step", ms(bench.step_s["static"]), f"{len(head) + len(torso)} Gaussians, {timing}")
    bench.model = talking_head(sp, head, torso)
    guide_step, render_step = deformation_steps(sp, bench.model)
    timing = measure("guide", guide_step)
    add("landmark step", ms(bench.step_s["guide"]), f"batch of {sp.cfg.train.guide_batch} frames, {timing}")
    timing = measure("render", render_step)
    per_step = sp.cfg.train.frames_per_step
    add("deformation rendering step", ms(bench.step_s["render"]),
        f"{per_step} frame(s) a step, {ms(bench.step_s['render'] / per_step)} a frame, with the landmark guide; "
        f"{timing}")


# -- c. render FPS -------------------------------------------------------------------------

def dub_render(model: TalkingHead, source: FrameSource, batch: int) -> Callable[[int], None]:
    """``dub.render_chunk`` of call ``i``'s ``batch`` consecutive frames of the clip's audio at the
    training poses (the canonical codes computed once, as a dub does, and a lip gain around the
    utterance's mean motion, whose reference costs a dub a second face-field evaluation; the
    payload's source knows no pauses, so the rest's third evaluation, made only in chunks that
    hold a pause, is not timed)."""
    n_audio, n_poses = len(source.features) // 2, model.torso_field.n_train_frames
    with torch.no_grad():
        codes = model.canonical_codes()
        lip = utterance_motion(model, model.audio_encoder.conditions(source.features, 0, n_audio), None,
                               fixed_gain=TIMED_LIP_GAIN)

    @torch.no_grad()
    def render(i: int) -> None:
        frames = np.arange(i * batch, (i + 1) * batch)
        render_chunk(model, source, frames % n_audio, frames % n_poses, codes, lip)

    return render


def render_fps(model: TalkingHead, source: FrameSource, batch: int, warmup: int, repeats: int) -> tuple[float, int]:
    """Frames a second of ``dub_render`` with ``batch`` frames a call, and the number of calls timed."""
    seconds, count = median_seconds(dub_render(model, source, batch), warmup, repeats, source.device)
    return batch / seconds, count


def add_fps(add: Add, bench: Bench, model: TalkingHead, source: FrameSource, label: str) -> None:
    args = bench.args
    gaussians = len(model.head) + len(model.torso)
    for batch in (1, *args.batches):
        fps, count = render_fps(model, source, batch, args.warmup, args.fps_repeats)
        target = FPS_TARGETS["single" if batch == 1 else "batched"]
        add(f"render FPS {label}batch {batch}", f"{fps:.1f}",
            f"target >= {target:g}: {'met' if fps >= target else 'NOT met'}; {gaussians} Gaussians, "
            f"{source.plate.shape[0]} px, median of {count}")


def section_fps(bench: Bench, add: Add) -> None:
    if bench.model is None:
        raise Skip("needs section b's model")
    add_fps(add, bench, bench.model, bench.speaker().source, "")


# -- d. where a step's time goes -----------------------------------------------------------

PROFILED_CALLS = 5
# events that stand for one kernel launch, and for one wait of the host on the device
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
WAITS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profiled(step: Callable[[int], None], device: torch.device, calls: int, stacks: bool
             ) -> torch.profiler.profile:
    """torch.profiler over ``calls`` calls of ``step`` (warmed up by section b or c), synchronised."""
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
    # verbose: the operators keep their Python stacks, for key_averages(group_by_stack_n)
    with profile(activities=activities, with_stack=stacks, experimental_config=_ExperimentalConfig(verbose=stacks)
                 ) as prof:
        for i in range(calls):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def device_ms(averages) -> float:
    """Milliseconds of kernels, copies and fills in a profile: the events that ran on the device.
    An operator's row also carries the time of the kernels it launched, which have rows of their
    own, and a user annotation (Adam's step) spans its kernels: counting either would count twice."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1000


def section_profile(bench: Bench, add: Add) -> None:
    """Per call of each step: the device's busy time against b's or c's wall time (on a GPU),
    kernel launches and host waits; the top operators by device and host time, and by Python
    stack, go to ``--profile-dir``/profile.txt, and the chrome traces of a rendering step and a
    dub frame beside it."""
    if bench.model is None or not bench.steps.keys() >= {"static", "render"}:
        raise Skip("needs section b's model and steps")
    sp, args = bench.speaker(), bench.args
    dub_frame = dub_render(bench.model, sp.source, 1)
    dub_wall, _ = median_seconds(dub_frame, args.warmup, args.step_repeats, sp.device)
    kinds = {"static": bench.steps["static"], "render": bench.steps["render"], "dub frame": dub_frame}
    walls = {"static": bench.step_s["static"], "render": bench.step_s["render"], "dub frame": dub_wall}
    cuda = sp.device.type == "cuda"
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    report = []
    for kind, step in kinds.items():
        # b timed the static step with the torso training; the deformation steps froze it since
        bench.model.torso.requires_grad_(kind == "static")
        prof = profiled(step, sp.device, PROFILED_CALLS, stacks=True)
        averages = prof.key_averages()
        launches = sum(e.count for e in averages if e.key in LAUNCHES) / PROFILED_CALLS
        waits = {e.key: e.count / PROFILED_CALLS for e in averages if e.key in WAITS}
        ops = sum(e.count for e in averages if e.key.startswith("aten::")) / PROFILED_CALLS
        busy = device_ms(averages) / PROFILED_CALLS
        add(f"{kind}: device busy", f"{busy:.2f} ms of {ms(walls[kind])}" if cuda else "n/a (CPU)",
            (f"{busy / 1000 / walls[kind]:.0%} of the wall time; " if cuda else "")
            + f"{launches:.0f} kernel launches, {ops:.0f} aten calls (nested ones included), waits a call: "
            + (", ".join(f"{k} {v:g}" for k, v in waits.items()) or "none") + f" ({PROFILED_CALLS} calls profiled)")
        report += [f"==== {kind}: {PROFILED_CALLS} calls, by {sort}", averages.table(sort_by=sort, row_limit=30),
                   f"==== {kind}: by host time", averages.table(sort_by="self_cpu_time_total", row_limit=20),
                   f"==== {kind}: by Python stack (5 frames), host time",
                   prof.key_averages(group_by_stack_n=5).table(sort_by="self_cpu_time_total", row_limit=20)]
        if args.profile_dir and kind != "static":
            trace = args.profile_dir / f"trace_{kind.replace(' ', '_')}.json"
            prof.export_chrome_trace(str(trace))
            with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
                shutil.copyfileobj(raw, packed)
            trace.unlink()
    if args.profile_dir:
        (args.profile_dir / "profile.txt").write_text("\n".join(report))


# -- e. a short real training --------------------------------------------------------------

def planned_counts(bench: Bench) -> tuple[tuple[int, int, int], str]:
    """(static, landmark, rendering) iterations: as asked, or scaled down to fit the budget left."""
    args = bench.args
    asked = (args.static_iters, args.guide_iters, args.render_iters)
    if not bench.step_s.keys() >= {"static", "guide", "render"}:
        return asked, "as asked: no step times from section b to plan with"
    estimate = STEP_SAFETY * sum(n * bench.step_s[kind] for n, kind in zip(asked, ("static", "guide", "render")))
    room = bench.left() - RESERVE_S
    if room <= 0:
        raise Skip(f"{bench.left():.0f} s left, under the {RESERVE_S:g} s that set-up and scoring need")
    scale = min(1.0, room / estimate)
    counts = tuple(max(1, int(n * scale)) for n in asked)
    return counts, f"asked {asked}, x{scale:.2f} to fit: {estimate * scale:.0f} s of steps estimated, {bench.left():.0f} s left"


def short_run_overrides(cfg: PipelineConfig, static_iters: int, guide_iters: int, render_iters: int) -> list[str]:
    """The profile's schedule compressed to these counts: its milestones keep their share of the
    run (a 2000-step run under the paper's milestones would never unfreeze the head or weigh
    the lips, nor stop densifying). The lip-gain calibration is left out: it is FaceMesh's
    (mediapipe, not on the GPU box), and a short run's speaker is not one to dub."""
    s, r = static_iters / cfg.static.iterations, render_iters / cfg.train.iterations
    return ["train.lip_gain_frames=0", f"static.iterations={static_iters}",
            f"static.gaussians.densify_until={round(cfg.static.gaussians.densify_until * s)}",
            f"train.guide_iterations={guide_iters}", f"train.iterations={render_iters}",
            f"train.unfreeze_step={round(cfg.train.unfreeze_step * r)}", f"train.lip_start={round(cfg.train.lip_start * r)}"]


def progress_printer(stage: str) -> Callable[[int, int | None, dict], None]:
    """A stage's progress callback that prints about ten lines over the run."""
    def report(step: int, total: int | None, info: dict) -> None:
        if total and (step % max(1, total // 10) == 0 or step == total):
            print(f"  {stage} {step}/{total} " + " ".join(f"{k} {v:.4g}" for k, v in info.items()), flush=True)

    return report


@torch.no_grad()
def heldout_psnr(sp: Speaker, cfg: PipelineConfig, model: TalkingHead, static_run: StageManifest
                 ) -> tuple[dict[str, float], int]:
    """PSNR of each evaluation method over the held-out frames (rendered as ``evaluate`` does,
    ``runtime.batch_frames`` at a time, quantised to 8 bits), and the number of frames."""
    test = tracking.open_dataset(sp.store, sp.track, sp.ingest, cfg.cache_dir, split="test", shuffle=False)
    frames = test.indices
    static = tuple(GaussianState.of(GaussianModel.load(fetch_part(sp.store, static_run, name, cfg.cache_dir))
                                    .to(sp.device)) for name in (static_fit.HEAD, static_fit.TORSO))
    nearest = evaluate.nearest_training_frames(sp.features, frames, sp.train.indices)
    codes = model.canonical_codes()
    squared = dict.fromkeys(evaluate.METHODS, 0.0)
    for first in range(0, len(frames), cfg.runtime.batch_frames):
        batch = slice(first, first + cfg.runtime.batch_frames)
        truth = torch.stack([test.sample(int(t)).rgb for t in frames[batch]]).to(sp.device).float() / 255
        for name, render in evaluate.render_methods(model, static, sp.source, frames[batch], nearest[batch], codes).items():
            squared[name] += ((render.rgb * 255).round() / 255 - truth).square().mean(dim=(1, 2, 3)).sum().item()
    return {name: psnr_of_mse(total / len(frames)) for name, total in squared.items()}, len(frames)


def section_training(bench: Bench, add: Add) -> None:
    bench.ensure_rasteriser()
    sp = bench.speaker()
    counts, plan = planned_counts(bench)
    add("iterations static / landmark / rendering", " / ".join(map(str, counts)), plan)
    cfg = sp.config(*short_run_overrides(sp.cfg, *counts))
    start = time.perf_counter()
    static_run = static_fit.run(sp.store, sp.ingest, sp.track, cfg, progress=progress_printer("static")).manifest
    fit = static_run.meta
    add("static fit", f"{time.perf_counter() - start:.1f} s",
        f"{fit['n_head'] + fit['n_torso']} Gaussians; train PSNR {fit['train_psnr']:.2f} dB, held-out "
        f"{fit['heldout_psnr']:.2f} dB ({fit['heldout_frames']} frames)")
    start = time.perf_counter()
    bundle_run = train_deform.run(sp.store, sp.ingest, sp.track, sp.audio, static_run, cfg,
                                  progress=progress_printer("deform")).manifest
    report = bundle_run.meta["training"]
    add("deformation training", f"{time.perf_counter() - start:.1f} s",
        f"train PSNR {report['train_psnr']:.2f} dB, landmark loss {report['guide_loss']:.3f}")
    start = time.perf_counter()
    model = fetch_bundle(sp.store, bundle_run, cfg.cache_dir).model.to(sp.device)
    psnrs, n_frames = heldout_psnr(sp, cfg, model, static_run)
    add("held-out scoring", f"{time.perf_counter() - start:.1f} s", f"{n_frames} frames x {len(psnrs)} methods")
    for name, value in psnrs.items():
        add(f"held-out PSNR {name}", f"{value:.2f} dB", f"{n_frames} frames")
    add("held-out PSNR ours - static", f"{psnrs['gstalker'] - psnrs['static']:+.2f} dB")
    add_fps(add, bench, model, sp.source, "trained ")


# -- the run -------------------------------------------------------------------------------

SECTIONS = (("a. gsplat parity", section_parity), ("b. step times", section_steps), ("c. render FPS", section_fps),
            ("d. profile", section_profile), ("e. training", section_training))


def run_section(name: str, section: Callable[[Bench, Add], None], bench: Bench) -> SectionResult:
    result = SectionResult(name)
    if name[0] not in bench.args.sections:
        result.status = "skipped: not asked (--sections)"
        return result
    if bench.stopped or bench.left() <= 0:
        result.status = "skipped: " + ("stopped by the time limit" if bench.stopped else "no budget left")
        return result
    print(f"== {name} ({bench.left():.0f} s of budget left)", flush=True)
    start = time.perf_counter()
    try:
        section(bench, result.add)
        result.status = "done"
    except Skip as why:
        result.status = f"skipped: {why}"
    except OutOfTime as err:
        bench.stopped = True
        result.status, result.error = "stopped", str(err)
    except Exception as err:  # noqa: BLE001 - recorded; the next section runs
        traceback.print_exc()
        result.status, result.error = "failed", f"{type(err).__name__}: {err}"
    result.seconds = time.perf_counter() - start
    print(f"== {name}: {result.status} in {result.seconds:.1f} s", flush=True)
    return result


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def header(bench: Bench) -> dict[str, str]:
    cuda = bench.device.type == "cuda" and torch.cuda.is_available()
    payload_file = bench.payload / PAYLOAD_FILE
    p = json.loads(payload_file.read_text()) if payload_file.is_file() else {}
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(bench.device) if cuda else f"CPU ({os.cpu_count()} cores)",
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda})" if cuda else torch.__version__,
            "gsplat": version_of("gsplat"), "python": platform.python_version(),
            "rasteriser": bench.rasteriser or "not chosen", "budget": f"{bench.args.budget_s:.0f} s",
            "speaker": (f"{p['clip']}, first {p['seconds']:g} s: {p['frames']} frames at {p['resolution']} px, "
                        f"{p['profile']} profile (payload of {p['commit']})") if p else "no payload"}


def cell(text: str) -> str:
    """Text as one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")[:400]


def markdown(head: dict[str, str], results: list[SectionResult]) -> str:
    lines = [f"## gstalker GPU bench, {head['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in head.items() if key != "date"]
    lines += ["", "| section | figure | value | note |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | status | {r.status} ({r.seconds:.1f} s) | {cell(r.error)} |")
        lines += [f"| {r.name} | {cell(f.name)} | {cell(f.value)} | {cell(f.note)} |" for f in r.figures]
    return "\n".join(lines) + "\n"


def write_outputs(args: argparse.Namespace, head: dict[str, str], results: list[SectionResult], table: str) -> None:
    if args.results_md:
        args.results_md.write_text(table)
    if args.append_md:
        with open(args.append_md, "a") as f:
            f.write("\n" + table)
    if args.results_json:
        args.results_json.write_text(json.dumps({"header": head, "sections": [asdict(r) for r in results]}, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all sections together")
    parser.add_argument("--payload", type=Path, help=f"prepared speaker (default {DEFAULT_OUT.relative_to(REPO)}; "
                                                     "with --smoke, a tiny one made here)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and a tiny-profile speaker: the code paths on a CPU")
    parser.add_argument("--static-iters", type=int, default=3000)
    parser.add_argument("--guide-iters", type=int, default=500)
    parser.add_argument("--render-iters", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=20)
    parser.add_argument("--fps-repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32], help="batched render sizes")
    parser.add_argument("--results-md", type=Path, help="write the table here")
    parser.add_argument("--append-md", type=Path, help="append the table here (bench/RESULTS.md)")
    parser.add_argument("--results-json", type=Path, help="write every figure and error here")
    parser.add_argument("--profile-dir", type=Path, help="section d's operator tables and traces go here")
    parser.add_argument("--sections", default="abcde", help="the letters of the sections to run (b feeds c, d and e)")
    args = parser.parse_args(argv)
    if set(args.sections) - set("abcde"):
        parser.error(f"--sections takes letters of a-e, not {args.sections!r}")
    if args.smoke:
        vars(args).update(SMOKE_ARGS)
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, stop_on_term)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        workdir = Path(tmp)
        payload = args.payload or DEFAULT_OUT
        if args.smoke and not args.payload:
            payload = workdir / "payload"
            prepare_store(DEFAULT_CLIP, SMOKE_CLIP_S, "tiny", payload)
        bench = Bench(args, payload, workdir)
        results = [run_section(name, section, bench) for name, section in SECTIONS]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the table is written whatever comes now
        head = header(bench)
    table = markdown(head, results)
    write_outputs(args, head, results, table)
    print(table, flush=True)
    sys.exit(1 if any(r.status in ("failed", "stopped") for r in results) else 0)


if __name__ == "__main__":
    main()
