"""Static fit: head and torso Gaussians fitted to every tracked training frame.

The head is initialised as a random point cloud inside its bounding volume (from the
template landmarks, grown to hold hair and the back of the head); the torso from the
neck/torso pixels of a few frames, lifted to the head's depth. Each step renders one
training frame: head layer, torso layer and their composite over the plate are each
compared with their ground truth (L1 + 0.2 D-SSIM, alpha vs mask), so each layer learns
only its own pixels. Densification and pruning follow 3DGS.

Stage parts: ``head.safetensors``, ``torso.safetensors``, ``heldout.png`` (held-out frame
next to its ground truth). Meta: ``StaticFitManifest``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from pydantic import BaseModel

from .. import tracking
from ..model.avatar import GaussianState, Layers
from ..data.conditions import FrameSource
from ..config import PipelineConfig, StaticFitConfig
from ..metrics import photometric_loss, psnr
from ..render.gaussians import GaussianModel
from ..runtime import configure
from ..storage import ArtifactStore, StageManifest, StageRun, StageWork, fetch_part, run_stage
from ..storage.checkpoints import Checkpoints
from ..tracking import SpeakerDataset

STAGE = "static"
CODE_VERSION = "4"  # 2: the torso layer continues the neck behind the chin; 3: drawn at its tracked shift;
# 4: the layers own the silhouette ring
HEAD, TORSO, HELDOUT = "head.safetensors", "torso.safetensors", "heldout.png"

Progress = Callable[[int, Optional[int], dict], None]


class StaticFitManifest(BaseModel):
    iterations: int
    n_head: int
    n_torso: int
    resolution: int
    heldout_psnr: float  # composited frame, held-out 1/11, mouth frozen
    heldout_frames: int
    train_psnr: float  # last 100 steps
    wall_s: float
    backend: str


# -- initialisation ------------------------------------------------------------------------

def head_volume(template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box holding the whole head, from the face template (+x left eye, +y chin, +z into the face).

    The face landmarks span the face only: the box grows upward for hair, backward for the
    skull and sideways for the ears.
    """
    lo, hi = template.min(axis=0), template.max(axis=0)
    size = hi - lo
    lo = lo - np.array([0.25, 0.6, 0.1]) * size[[0, 1, 0]]
    hi = hi + np.array([0.25, 0.05, 1.0]) * size[[0, 1, 0]]
    return lo.astype(np.float32), hi.astype(np.float32)


def torso_points(dataset: SpeakerDataset, K: np.ndarray, depth: float, n: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` camera-space points (and their colours) on the torso layer's pixels of a few frames, at
    ``depth``, each frame's pixels moved back by its torso shift (the torso is fitted unshifted)."""
    rng = np.random.default_rng(seed)
    frames = [dataset.sample(int(i)) for i in np.linspace(dataset.indices[0], dataset.indices[-1], 4).astype(int)]
    pixels, colours = [], []
    for s in frames:  # the torso layer's target pixels: neck, torso, their silhouette ring and the neck behind the chin
        layers = tracking.compose_targets(s.rgb[None], s.labels[None], s.rgb)  # the frame is its own plate
        _, _, torso_rgb, torso_alpha = (layer[0].numpy() for layer in layers)
        ys, xs = np.nonzero(torso_alpha)
        pixels.append(np.stack([xs, ys], 1) - dataset.arrays.torso_shift[s.index])
        colours.append(torso_rgb[ys, xs])
    pixels, colours = np.concatenate(pixels), np.concatenate(colours)
    if len(pixels) == 0:
        raise ValueError("no torso pixels in the sampled frames")
    pick = rng.integers(0, len(pixels), n)
    uv = pixels[pick] + rng.random((n, 2))
    z = depth * (1 + rng.normal(0, 0.03, n))
    xyz = np.stack([(uv[:, 0] - K[0, 2]) * z / K[0, 0], (uv[:, 1] - K[1, 2]) * z / K[1, 1], z], 1)
    return xyz.astype(np.float32), colours[pick].astype(np.float32)


# -- one training step ---------------------------------------------------------------------

def layer_losses(layers: Layers, target: dict[str, torch.Tensor], plate: torch.Tensor, ssim_weight: float
                 ) -> dict[str, torch.Tensor]:
    """Composite, head-layer and torso-layer losses (each layer over the plate vs its target)."""
    head_img = layers.head_rgb + (1 - layers.head_alpha) * plate
    torso_img = layers.torso_rgb + (1 - layers.torso_alpha) * plate
    return {
        "composite": photometric_loss(layers.rgb, target["rgb"], ssim_weight),
        "head": photometric_loss(head_img, target["head_rgb"], ssim_weight)
        + (layers.head_alpha - target["head_alpha"]).abs().mean(),
        "torso": photometric_loss(torso_img, target["torso_rgb"], ssim_weight)
        + (layers.torso_alpha - target["torso_alpha"]).abs().mean(),
    }


def step_loss(head: GaussianModel, torso: GaussianModel, source: FrameSource, sample, cfg: StaticFitConfig
              ) -> tuple[Layers, dict[str, torch.Tensor], torch.Tensor]:
    """Render one training sample; its layers, targets and loss, on ``source``'s device."""
    target = source.targets([sample])
    layers = source.render(GaussianState.of(head), GaussianState.of(torso), [sample.index], backend=cfg.backend)
    losses = layer_losses(layers, target, source.plate, cfg.ssim_weight)
    return layers, target, losses["composite"] + cfg.layer_loss_weight * (losses["head"] + losses["torso"])


# -- the fit -------------------------------------------------------------------------------

def fit_static(train: SpeakerDataset, test: SpeakerDataset, plate: np.ndarray, template: np.ndarray,
               cfg: StaticFitConfig, checkpoints: Checkpoints | None = None, progress: Progress | None = None,
               device: torch.device = torch.device("cpu")
               ) -> tuple[GaussianModel, GaussianModel, StaticFitManifest, np.ndarray]:
    """Fit head and torso Gaussians on ``device``; returns them, the manifest and a held-out
    comparison image."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    a = train.arrays
    source = FrameSource.build(a.viewmats, a.blink, a.K, plate, device, torso_shift=a.torso_shift)
    head_lo, head_hi = head_volume(template)
    head = GaussianModel.init_random(cfg.gaussians, cfg.n_head, head_lo, head_hi, seed=cfg.seed)
    depth = float(np.median(a.viewmats[:, 2, 3]))
    xyz, rgb = torso_points(train, a.K, depth, cfg.n_torso, cfg.seed)
    torso = GaussianModel.init_points(cfg.gaussians, xyz, rgb, seed=cfg.seed)
    step0 = 0
    saved = checkpoints.load() if checkpoints else None
    if saved is not None:
        head, torso = GaussianModel.from_state(saved["head"]), GaussianModel.from_state(saved["torso"])
        step0 = saved["step"]
    head, torso = head.to(device), torso.to(device)
    head_opt, torso_opt = head.make_optimizer(), torso.make_optimizer()
    if saved is not None:
        head_opt.load_state_dict(saved["head_opt"])
        torso_opt.load_state_dict(saved["torso_opt"])
    recent: list[float] = []
    for step in range(step0, cfg.iterations):
        layers, target, loss = step_loss(head, torso, source, train.sample(train.index_at(step)), cfg)
        head_opt.zero_grad(set_to_none=True)
        torso_opt.zero_grad(set_to_none=True)
        loss.backward()
        head_opt.step()
        torso_opt.step()
        with torch.no_grad():
            head.densify_step(step, layers.head_meta, head_opt)
            torso.densify_step(step, layers.torso_meta, torso_opt)
            recent = (recent + [psnr(layers.rgb, target["rgb"])])[-100:]
        if progress:
            progress(step + 1, cfg.iterations, {"loss": loss.item(), "psnr": recent[-1], "gaussians": len(head) + len(torso)})
        if checkpoints and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.iterations:
            checkpoints.save({"step": step + 1, "head": head.state(), "torso": torso.state(),
                              "head_opt": head_opt.state_dict(), "torso_opt": torso_opt.state_dict()})
    heldout_psnr, strip, n_eval = evaluate_static(head, torso, test, source, cfg)
    manifest = StaticFitManifest(iterations=cfg.iterations, n_head=len(head), n_torso=len(torso),
                                 resolution=plate.shape[0], heldout_psnr=heldout_psnr, heldout_frames=n_eval,
                                 train_psnr=float(np.mean(recent)) if recent else 0.0,
                                 wall_s=time.perf_counter() - start, backend=cfg.backend)
    return head, torso, manifest, strip


@torch.no_grad()
def evaluate_static(head: GaussianModel, torso: GaussianModel, test: SpeakerDataset, source: FrameSource,
                    cfg: StaticFitConfig) -> tuple[float, np.ndarray, int]:
    """PSNR of the composite over (up to ``eval_frames``) held-out frames, and a rendered|truth
    strip. ``source``: the clip's poses (all frames) on the fit's device."""
    picks = np.unique(np.linspace(0, len(test) - 1, min(cfg.eval_frames, len(test))).astype(int))
    errors, strip = [], None
    for k in picks:
        sample = test[int(k)]
        layers = source.render(GaussianState.of(head), GaussianState.of(torso), [sample.index], backend=cfg.backend)
        rendered = layers.rgb[0].clamp(0, 1).cpu().numpy()
        truth = sample.rgb.numpy().astype(np.float32) / 255.0
        errors.append(float(np.mean((rendered - truth) ** 2)))
        if strip is None:
            strip = np.concatenate([rendered, truth], axis=1)
    mean_psnr = float(-10 * np.log10(np.mean(errors)))
    return mean_psnr, (strip * 255).round().astype(np.uint8), len(picks)


# -- the stage -----------------------------------------------------------------------------

def work(track_run: StageManifest, ingest_run: StageManifest, cfg: PipelineConfig) -> StageWork:
    return StageWork(STAGE, CODE_VERSION, cfg.static, {"track": track_run.key, "ingest": ingest_run.key})


def stage_key(track_run: StageManifest, ingest_run: StageManifest, cfg: PipelineConfig) -> str:
    return work(track_run, ingest_run, cfg).key


def read_plate(store: ArtifactStore, track_run: StageManifest, cache_dir: Path) -> np.ndarray:
    """The tracked clip's background plate, (H, W, 3) uint8 RGB."""
    import cv2

    return cv2.cvtColor(cv2.imread(str(fetch_part(store, track_run, tracking.PLATE, cache_dir))), cv2.COLOR_BGR2RGB)


def run(store: ArtifactStore, ingest_run: StageManifest, track_run: StageManifest, cfg: PipelineConfig,
        progress: Progress | None = None) -> StageRun:
    """The ``static`` stage: fitted head and torso Gaussians, resumable from checkpoints."""
    import cv2

    stage_work = work(track_run, ingest_run, cfg)
    checkpoints = Checkpoints(store, STAGE, stage_work.key)

    def build(workdir: Path) -> dict:
        train = tracking.open_dataset(store, track_run, ingest_run, cfg.cache_dir, split="train", seed=cfg.static.seed)
        test = tracking.open_dataset(store, track_run, ingest_run, cfg.cache_dir, split="test", shuffle=False)
        plate = read_plate(store, track_run, cfg.cache_dir)
        template = train.arrays.template
        head, torso, manifest, strip = fit_static(train, test, plate, template, cfg.static, checkpoints, progress,
                                                  configure(cfg.runtime))
        head.save(workdir / HEAD)
        torso.save(workdir / TORSO)
        cv2.imwrite(str(workdir / HELDOUT), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
        return manifest.model_dump(mode="json")

    result = run_stage(store, stage_work, build, cfg.cache_dir)
    checkpoints.clear()
    return result
