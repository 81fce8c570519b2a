"""Deformation training: audio-driven face field, pose-driven torso field, on top of the static fit.

Schedule (``TrainConfig``), in two phases on one step counter:
1. ``guide_iterations`` landmark steps: the audio encoder and face field learn to predict the
   tracked landmarks' motion in the head frame (``deform.landmark_motion``) on batches of
   ``guide_batch`` frames, without rendering: cheap, and a strong signal where the pixels
   give a weak one (lips move by a pixel or two at preview resolution).
2. ``iterations`` rendering steps: the photometric loss over the composited frame, plus the
   landmark loss at ``guide_weight``, with the audio encoder as the landmark steps left it
   (``set_learning_rates`` says why). The fields train alone first, from the static fit
   (their last layers start at zero); from ``unfreeze_step`` the static head Gaussians join
   at ``static_lr_scale`` times their static-fit learning rates; from ``lip_start`` the mouth
   box (from the tracked mouth landmarks) weighs more. Both counted in rendering steps, over
   which all learning rates decay exponentially to ``lr_final_scale`` of their start.
Every ``checkpoint_every`` steps the full state (parameters, optimiser, step) goes to the
store, and frames are drawn as a pure function of (seed, step), so a run resumed after a
crash ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from pydantic import BaseModel

from .. import __version__, audio, tracking
from ..model import lip_gain
from ..model.bundle import FORMAT_VERSION, Bundle, BundleManifest, save_bundle
from ..data.conditions import FrameSource, to_device
from ..config import PipelineConfig, TrainConfig
from ..deform.landmark_motion import canonical_offsets, guide_loss
from ..errors import InputError
from ..metrics import psnr_of_mse
from ..render.gaussians import GaussianModel
from ..runtime import adam, configure
from .static_fit import HEAD, TORSO, layer_losses, read_plate
from ..storage import ArtifactStore, StageManifest, StageRun, StageWork, fetch_part, run_stage
from ..storage.checkpoints import Checkpoints
from ..model.talking_head import TalkingHead
from ..tracking import SpeakerDataset
from ..tracking.topology import Topology

STAGE = "deform"
CODE_VERSION = "11"  # 2: audio features standardised, bounded audio code; 3: landmark guide;
# 4: torso Gaussians frozen, learning-rate decay; 5: pitch-shifted audio for half of the frames;
# 6: lip gain calibrated after training (model.lip_gain), the torso drawn at its tracked shift
# 7: the calibration's FaceMesh tracks each stream of images apart, covered mouths left out;
# frequency masks on the frames that hear a shifted voice; 8: and on every landmark step's frame;
# 9: the audio encoder learns in the landmark steps only; 10: the calibration gains around the mean motion;
# 11: the calibration keeps the rest code (model.lip_gain)

Progress = Callable[[int, Optional[int], dict], None]


class DeformTrainManifest(BaseModel):
    iterations: int  # rendering steps
    guide_iterations: int  # landmark steps before them
    wall_s: float
    train_psnr: float  # mean over the last 100 steps
    guide_loss: float  # landmark loss (1 = predicts no motion), mean over the last 100 steps
    resumed_from: int


def mouth_weights(landmarks: np.ndarray, topology: Topology, size: int, margin: float = 0.3) -> np.ndarray:
    """(H, W) mask of the mouth box (mouth landmarks' extent grown by ``margin``)."""
    pts = landmarks[topology.mouth, :2]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pad = (hi - lo) * margin
    (x0, y0), (x1, y1) = np.floor(lo - pad).astype(int), np.ceil(hi + pad).astype(int)
    mask = np.zeros((size, size), np.float32)
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1.0
    return mask


def make_optimizer(model: TalkingHead, cfg: TrainConfig) -> torch.optim.Adam:
    """One group for the audio encoder, one for the fields, then the static head Gaussians' own
    per-attribute groups (as in the static fit) at ``static_lr_scale`` times their static-fit
    rates; each group keeps its starting rate as ``base_lr`` for ``set_learning_rates``.

    The torso Gaussians stay as the static fit left them: held-out frames show them undeformed
    (``talking_head.NO_FRAME``), and retraining them behind the torso field fitted the
    training frames at the cost of held-out ones (-0.05 dB torso PSNR on cnn_anchor_71s)."""
    fields = [*model.face_field.parameters(), *model.torso_field.parameters()]
    groups = [{"params": list(model.audio_encoder.parameters()), "base_lr": cfg.lr_networks, "name": "encoder"},
              {"params": fields, "base_lr": cfg.lr_networks, "name": "networks"}]
    for group in model.head.make_optimizer().param_groups:
        groups.append({"params": group["params"], "base_lr": group["lr"] * cfg.static_lr_scale,
                       "eps": group["eps"], "name": f"head.{group['name']}"})
    return adam(groups, lr=0.0)


def set_learning_rates(optimizer: torch.optim.Adam, cfg: TrainConfig, step: int) -> None:
    """The rates of ``step`` (counted over both phases). Over the rendering steps they decay
    exponentially to ``lr_final_scale`` of their start: at a constant rate, one frame per step
    leaves the fields fitted to the last frames drawn (cnn_anchor_71s preview, held-out PSNR:
    22.75 dB constant, 22.87 dB decayed to 0.1; the torso region 16.81 -> 16.93 dB). The head
    Gaussians' rate is 0 before rendering step ``unfreeze_step``.

    The audio encoder learns in the landmark steps only. In the rendering steps it overfitted
    the training audio (cnn_anchor_71s, the field's lip gap against the tracked one at the
    template's mouth points: held-out corr 0.67 after the landmark steps, 0.50 once the
    rendering steps had also trained the encoder, 0.67 with it frozen there; the held-out
    renders' mouth-open corr 0.44 against 0.55)."""
    render_step = step - cfg.guide_iterations
    decay = cfg.lr_final_scale ** (max(render_step, 0) / cfg.iterations)
    for group in optimizer.param_groups:
        if group["name"] == "encoder":
            group["lr"] = group["base_lr"] if render_step < 0 else 0.0
            continue
        frozen = group["name"] != "networks" and render_step < cfg.unfreeze_step
        group["lr"] = 0.0 if frozen else group["base_lr"] * decay


class LandmarkGuide:
    """The landmark loss of a batch of training frames drawn as a function of (seed, step).

    Frames whose landmarks are guesses (interpolated gaps, covered mouth) are never drawn.
    """

    def __init__(self, model: TalkingHead, train: SpeakerDataset, source: FrameSource, cfg: TrainConfig):
        a = train.arrays
        self.model, self.source, self.cfg = model, source, cfg
        self.frames = train.drawn[a.valid[train.drawn]]
        if len(self.frames) == 0:
            raise InputError("no training frame has reliable landmarks (every one is a gap or a covered mouth)",
                             "check the tracking stage's QA video and warnings; train on a clip with a visible face")
        offsets = canonical_offsets(a.landmarks, a.viewmats, a.K, a.template)
        self.scale = float(np.square(offsets[self.frames]).mean().clip(min=1e-12))
        self.offsets = to_device(offsets, source.device)
        self.points = to_device(a.template, source.device)

    def loss(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.cfg.seed, step])
        frames = rng.choice(self.frames, size=self.cfg.guide_batch)
        voices = self.source.draw_voices(rng, len(frames))
        # every landmark step's frame loses bands: here the lips learn from the audio alone, and
        # masks on every frame here lifted the new voices' lip sync (README, lip sync)
        every_frame = np.ones(len(frames), bool)
        cond = self.source.conditions(self.model, frames, voices=voices,
                                      hidden_bands=self.source.draw_hidden_bands(rng, every_frame, self.cfg.band_masks,
                                                                                 self.cfg.band_mask_share))
        field = self.model.face_field
        deltas = field(field.encode(self.points), self.model.audio_encoder(cond.audio), cond.eye)
        return guide_loss(deltas.d_means, self.offsets[to_device(frames, self.source.device)], self.scale)


def train_deformation(model: TalkingHead, train: SpeakerDataset, source: FrameSource, cfg: TrainConfig,
                      checkpoints: Checkpoints | None = None, progress: Progress | None = None
                      ) -> DeformTrainManifest:
    """Train ``model`` (on ``source``'s device) on the clip's training frames."""
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model.torso.requires_grad_(False)  # not in the optimizer (make_optimizer says why): no gradients to compute
    optimizer = make_optimizer(model, cfg)
    step0 = 0
    saved = checkpoints.load() if checkpoints else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step0 = saved["step"]
    guide = LandmarkGuide(model, train, source, cfg)
    photometric = PhotometricLoss(model, train, source, cfg)
    total = cfg.guide_iterations + cfg.iterations
    recent: list[float] = []
    recent_guide: list[float] = []
    for step in range(step0, total):
        loss = guide.loss(step)
        recent_guide = (recent_guide + [loss.item()])[-100:]
        info = {"landmark loss": recent_guide[-1]}
        render_step = step - cfg.guide_iterations
        set_learning_rates(optimizer, cfg, step)
        if render_step >= 0:
            render_loss, render_mse = photometric.loss(render_step)
            loss = cfg.guide_weight * loss + render_loss
            render_psnr = psnr_of_mse(render_mse.item())
            recent = (recent + [render_psnr])[-100:]
            info["psnr"] = render_psnr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, total, {"loss": loss.item(), **info})
        if checkpoints and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            checkpoints.save({"step": step + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    return DeformTrainManifest(iterations=cfg.iterations, guide_iterations=cfg.guide_iterations,
                               wall_s=time.perf_counter() - start_time,
                               train_psnr=float(np.mean(recent)) if recent else 0.0,
                               guide_loss=float(np.mean(recent_guide)) if recent_guide else 0.0, resumed_from=step0)


class PhotometricLoss:
    """L1 + D-SSIM of the composite and its layers for the frames of rendering step ``step``
    (chunk-grouped epoch order, a function of (seed, step)), the mouth box weighted from
    ``lip_start``. The step's frames are rendered in one rasteriser call per layer."""

    def __init__(self, model: TalkingHead, train: SpeakerDataset, source: FrameSource, cfg: TrainConfig):
        self.model, self.train, self.source, self.cfg = model, train, source, cfg

    def loss(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mean squared error of the rendered composite), on the model's device."""
        cfg, train, source = self.cfg, self.train, self.source
        frames = [train.index_at(step * cfg.frames_per_step + k) for k in range(cfg.frames_per_step)]
        rng = np.random.default_rng([cfg.seed, step, 1])
        voices = source.draw_voices(rng, len(frames))
        # in the rendering steps only the frames that hear a shifted voice lose bands: masking
        # the original audio there too cost held-out mouth accuracy
        shifted = None if voices is None else voices > 0
        cond = source.conditions(self.model, frames, track=frames, voices=voices,
                                 hidden_bands=source.draw_hidden_bands(rng, shifted, cfg.band_masks, cfg.band_mask_share))
        head, torso = self.model.frames(cond)
        layers = source.render(head, torso, frames)
        target = source.targets([train.sample(i) for i in frames])
        losses = layer_losses(layers, target, source.plate, cfg.ssim_weight)
        loss = losses["composite"] + cfg.layer_loss_weight * (losses["head"] + losses["torso"])
        if step >= cfg.lip_start and cfg.lip_weight > 0:
            size = source.plate.shape[0]
            boxes = [mouth_weights(train.arrays.landmarks[i], train.topology, size) for i in frames]
            mouth = to_device(np.stack(boxes), source.device)[..., None]
            loss = loss + cfg.lip_weight * ((layers.rgb - target["rgb"]).abs() * mouth).sum() / mouth.sum().clamp_min(1)
        loss = loss + cfg.latent_smoothness_weight * self.model.torso_field.latent_smoothness()
        return loss, (layers.rgb.detach() - target["rgb"]).square().mean()


# -- the stage: trains and publishes the model bundle --------------------------------------

def _inputs(track_run: StageManifest, audio_run: StageManifest, static_run: StageManifest) -> dict[str, str]:
    return {"track": track_run.key, "audio": audio_run.key, "static": static_run.key}


def work(track_run: StageManifest, audio_run: StageManifest, static_run: StageManifest,
         cfg: PipelineConfig) -> StageWork:
    return StageWork(STAGE, CODE_VERSION, {"deform": cfg.deform.resolved(), "train": cfg.train},
                     _inputs(track_run, audio_run, static_run))


def stage_key(track_run: StageManifest, audio_run: StageManifest, static_run: StageManifest,
              cfg: PipelineConfig) -> str:
    return work(track_run, audio_run, static_run, cfg).key


def run(store: ArtifactStore, ingest_run: StageManifest, track_run: StageManifest, audio_run: StageManifest,
        static_run: StageManifest, cfg: PipelineConfig, progress: Progress | None = None) -> StageRun:
    """The ``deform`` stage: trains the deformation and publishes the model bundle as its parts."""
    stage_work = work(track_run, audio_run, static_run, cfg)
    checkpoints = Checkpoints(store, STAGE, stage_work.key)

    def build(workdir) -> dict:
        train = tracking.open_dataset(store, track_run, ingest_run, cfg.cache_dir, split="train", seed=cfg.train.seed)
        features = audio.load_features(store, audio_run, cfg.cache_dir)
        augmented = audio.load_augmented(store, audio_run, cfg.cache_dir)
        spec = audio.AudioFeaturesMeta.model_validate(audio_run.meta).spec
        plate = read_plate(store, track_run, cfg.cache_dir)
        head = GaussianModel.load(fetch_part(store, static_run, HEAD, cfg.cache_dir))
        torso = GaussianModel.load(fetch_part(store, static_run, TORSO, cfg.cache_dir))
        viewmats = train.arrays.viewmats[train.indices]
        device = configure(cfg.runtime)
        model = TalkingHead(cfg.deform.resolved(), head, torso, spec.width, cfg.audio.step_window,
                            torch.from_numpy(viewmats))
        model.audio_encoder.set_feature_stats(features[: 2 * len(train.indices)])
        a = train.arrays
        source = FrameSource.build(a.viewmats, a.blink, a.K, plate, device, features, augmented, a.torso_shift,
                                   maskable_bands=spec.n_features)
        report = train_deformation(model.to(device), train, source, cfg.train, checkpoints, progress)
        gain = (lip_gain.calibrate(model, train, source, cfg.track, cfg.train.lip_gain_frames, cfg.train.lip_gain_max,
                                   cfg.runtime.batch_frames) if cfg.train.lip_gain_frames else None)
        manifest = BundleManifest(format_version=FORMAT_VERSION, gstalker_version=__version__,
                                  resolution=plate.shape[0], fps=25, audio_spec=spec,
                                  step_window=cfg.audio.step_window, deform=cfg.deform.resolved(),
                                  n_train_frames=len(train.indices), sources=_inputs(track_run, audio_run, static_run),
                                  lip_gain=gain)
        save_bundle(Bundle(manifest, model, viewmats, a.blink[train.indices], a.K, plate, a.torso_shift[train.indices]),
                    workdir)
        return {"bundle": manifest.model_dump(mode="json"), "training": report.model_dump(mode="json")}

    result = run_stage(store, stage_work, build, cfg.cache_dir)
    checkpoints.clear()
    return result
