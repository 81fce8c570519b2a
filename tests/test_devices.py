"""One device through every stage, proven on a CPU-only machine.

The model and every input go to the ``meta`` device (shapes, no data) and the rasteriser is
replaced by a shape-only stand-in that insists on one device for all its inputs. Torch
refuses any op that mixes a ``meta`` tensor with a CPU one, so a tensor that a training step,
an evaluation batch or a dub chunk makes on the wrong device (a CPU ``K``, plate, target,
index or constant beside the GPU model) fails here, as it would on a GPU. Also: checkpoints
saved on a GPU load on a CPU, the GPU a stage's slot stands for, and the runtime setting
staying out of every content key.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time

import numpy as np
import pytest
import torch

from gstalker_core.model import avatar
from gstalker_core import evaluate, runtime, tracking
from gstalker_core.train import static_fit, train_deform
from gstalker_core.audio import AudioFeaturesMeta, load_features
from gstalker_core.model.avatar import GaussianState
from gstalker_core.data.conditions import FrameSource
from gstalker_core.config import RuntimeConfig, load_config
from gstalker_core.dub import render_chunk
from gstalker_core.errors import ConfigError, InputError
from gstalker_core.render.gaussians import GaussianModel
from gstalker_core.storage import LocalStore, fetch_part
from gstalker_core.storage.checkpoints import Checkpoints
from gstalker_core.model.lip_gain import LipGain, utterance_motion
from gstalker_core.model.talking_head import TalkingHead
from tasks.gpu import claim_gpu

META = torch.device("meta")


def shape_only_rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None,
                             backend="auto", **_):
    """The rasteriser's contract without its maths: same devices in, right shapes out, and an
    image that depends on every input (so backward reaches them all)."""
    inputs = (means, quats, scales, opacities, colors, viewmats, Ks)
    devices = {t.device for t in inputs}
    assert devices == {means.device}, f"rasteriser inputs on several devices: {devices}"
    cameras, n = len(viewmats), means.shape[-2]
    if means.dim() == 3:  # a set of Gaussians per camera
        assert means.shape[0] == opacities.shape[0] == colors.shape[0] == cameras
    depends = sum(t.float().sum() for t in inputs) * 0
    image = torch.zeros(cameras, height, width, 3, device=means.device) + depends
    alpha = torch.zeros(cameras, height, width, 1, device=means.device) + depends
    means2d = torch.zeros(cameras, n, 2, device=means.device) + depends
    return image, alpha, {"means2d": means2d, "radii": torch.zeros(cameras, n, 2, dtype=torch.long, device=means.device),
                          "width": width, "height": height}


@pytest.fixture
def on_meta(tiny_speaker, monkeypatch):
    """The tiny speaker's model, static fit and data on the meta device."""
    monkeypatch.setattr(avatar, "rasterization", shape_only_rasterization)
    # the learning rate of the means reads the set's extent once on the host: meta has no values
    monkeypatch.setattr(GaussianModel, "scene_extent", lambda self: 1.0)
    sp = tiny_speaker
    head = GaussianModel.load(fetch_part(sp.store, sp.static, static_fit.HEAD, sp.cfg.cache_dir))
    torso = GaussianModel.load(fetch_part(sp.store, sp.static, static_fit.TORSO, sp.cfg.cache_dir))
    train = tracking.open_dataset(sp.store, sp.track, sp.ingest, sp.cfg.cache_dir, split="train")
    features = load_features(sp.store, sp.audio, sp.cfg.cache_dir)
    plate = static_fit.read_plate(sp.store, sp.track, sp.cfg.cache_dir)
    spec = AudioFeaturesMeta.model_validate(sp.audio.meta).spec
    model = TalkingHead(sp.cfg.deform, head, torso, spec.width, sp.cfg.audio.step_window,
                        torch.from_numpy(train.arrays.viewmats[train.indices])).to(META)
    a = train.arrays
    source = FrameSource.build(a.viewmats, a.blink, a.K, plate, META, features, maskable_bands=spec.n_features)
    return sp, model, train, source


def _all_on_meta(*tensors: torch.Tensor) -> None:
    assert all(t.device == META for t in tensors), [t.device for t in tensors]


def test_a_deformation_training_step_stays_on_the_model_device(on_meta):
    sp, model, train, source = on_meta
    cfg = sp.cfg.train.model_copy(update={"frames_per_step": 3, "lip_start": 0})
    optimizer = train_deform.make_optimizer(model, cfg)
    train_deform.set_learning_rates(optimizer, cfg, cfg.guide_iterations + cfg.unfreeze_step)
    loss, mse = train_deform.PhotometricLoss(model, train, source, cfg).loss(step=0)
    guide = train_deform.LandmarkGuide(model, train, source, cfg).loss(step=0)
    (loss + cfg.guide_weight * guide).backward()
    optimizer.step()
    _all_on_meta(loss, mse, guide, *(p for p in model.parameters()))
    assert model.face_field.mlp.head.weight.grad is not None and model.head.means.grad is not None


def test_a_rendering_step_masks_the_frames_that_hear_a_shifted_voice_only(on_meta, monkeypatch):
    """Frequency masks in the rendering steps fall on the pitch-shifted frames (masking the
    original audio there cost held-out mouth accuracy); the landmark steps mask every frame."""
    sp, model, train, source = on_meta
    source = dataclasses.replace(source, augmented=source.features[None] + 1)
    voices, masked = [], []
    draw_voices, draw_bands = source.draw_voices, source.draw_hidden_bands
    monkeypatch.setattr(source, "draw_voices", lambda rng, n: voices.append(draw_voices(rng, n)) or voices[-1])
    monkeypatch.setattr(source, "draw_hidden_bands",
                        lambda rng, frames, *args: masked.append(frames) or draw_bands(rng, frames, *args))
    cfg = sp.cfg.train.model_copy(update={"frames_per_step": 8, "lip_start": 10 ** 6})
    for step in range(3):
        train_deform.PhotometricLoss(model, train, source, cfg).loss(step=step)
    assert len(masked) == 3 and all(np.array_equal(m, v > 0) for m, v in zip(masked, voices))
    assert any(v.any() and not v.all() for v in voices)  # both kinds of frame were drawn
    train_deform.LandmarkGuide(model, train, source, cfg).loss(step=0)
    assert masked[-1].all() and not voices[-1].all()


def test_a_static_fit_step_stays_on_the_device(on_meta):
    sp, model, train, source = on_meta
    layers, target, loss = static_fit.step_loss(model.head, model.torso, source, train.sample(3), sp.cfg.static)
    loss.backward()
    _all_on_meta(loss, layers.rgb, *target.values(), model.head.means.grad, model.torso.sh0.grad)
    assert model.head.grad_accum.device == META  # densification statistics follow .to()


def test_an_evaluation_batch_renders_every_method_on_the_device(on_meta):
    sp, model, _, source = on_meta
    static = (GaussianState.of(model.head), GaussianState.of(model.torso))
    frames, nearest = np.array([60, 61, 62, 63]), np.array([3, 9, 9, 1])
    with torch.no_grad():
        rendered = evaluate.render_methods(model, static, source, frames, nearest)
    assert set(rendered) == set(evaluate.METHODS)
    for render in rendered.values():
        _all_on_meta(render.rgb, render.alpha)
        assert render.rgb.shape == (4, *source.plate.shape) and render.alpha.shape == (4, *source.plate.shape[:2], 1)


@pytest.mark.parametrize("gain", [1.0, 1.7])
@pytest.mark.parametrize("pauses", [False, True])
def test_a_dub_chunk_renders_on_the_device(on_meta, gain, pauses):
    _, model, _, source = on_meta
    code_dim = model.audio_encoder.code_dim
    calibration = LipGain(speaker_gain=1.0, reference_spread=1.0, lip_points=np.zeros((4, 3)).tolist(), max_gain=2.0,
                          frames=1, real_spread=None, rendered_spread={}, rest_code=[0.1] * code_dim)
    lip = utterance_motion(model, torch.zeros(7, code_dim, device=META), calibration, fixed_gain=gain)
    _all_on_meta(lip.reference, lip.rest)
    if gain != 1.0:
        _all_on_meta(lip.mean_shift.d_means, lip.mean_shift.d_quats, lip.mean_shift.d_log_scales)
    if pauses:  # the voice falls silent from the chunk's third frame: the mouth rests there
        speaking = np.ones(len(source.features) // 2, np.float32)
        speaking[2:] = [2 / 3, 1 / 3] + [0.0] * (len(speaking) - 4)
        source = dataclasses.replace(source, speaking=speaking)
        _all_on_meta(source.conditions(model, np.arange(5)).speaking)
    with torch.no_grad():
        rgb = render_chunk(model, source, np.arange(5), np.array([0, 1, 2, 1, 0]), lip=lip)
    _all_on_meta(rgb)
    assert rgb.shape == (5, *source.plate.shape)


def test_pose_track_frames_outside_the_model_are_refused_before_the_device(on_meta):
    _, model, _, source = on_meta
    with pytest.raises(InputError, match="training frames"):
        source.conditions(model, [0, 1], track=[0, model.torso_field.n_train_frames])


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu_machine(tmp_path, monkeypatch):
    # torch records each storage's device; pretend the training ran on cuda:1
    original = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
    checkpoints = Checkpoints(LocalStore(tmp_path), "static", "k")
    weights = torch.randn(4, 3)
    checkpoints.save({"step": 5, "weights": weights})
    monkeypatch.setattr(torch.serialization, "location_tag", original)
    raw = checkpoints.store.get_bytes(checkpoints.key)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does here
        torch.load(io.BytesIO(raw), weights_only=False)
    state = checkpoints.load()
    assert state["step"] == 5 and state["weights"].device.type == "cpu" and torch.equal(state["weights"], weights)


def test_each_gpu_slot_of_a_host_is_its_own_gpu():
    held, release = [], threading.Event()

    def stage():
        with claim_gpu(2, poll_s=0.01) as index:
            held.append(index)
            release.wait(10)

    threads = [threading.Thread(target=stage) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(500):
        if len(held) >= 2:
            break
        time.sleep(0.01)
    time.sleep(0.1)  # room for a wrong third claim to show
    assert sorted(held) == [0, 1]  # two stages, two GPUs; the third waits for one
    release.set()
    for t in threads:
        t.join(10)
    assert len(held) == 3 and held[2] in (0, 1)


def test_the_runtime_setting_selects_the_device_and_stays_out_of_content_keys(tiny_speaker, monkeypatch):
    sp = tiny_speaker
    assert runtime.select_device(RuntimeConfig(device="cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert runtime.select_device(RuntimeConfig()) == torch.device("cpu")  # auto without CUDA
        with pytest.raises(ConfigError, match="no CUDA"):
            runtime.select_device(RuntimeConfig(device="cuda:1"))
        assert runtime.on_gpu(sp.cfg, 1) is sp.cfg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pinned = runtime.on_gpu(sp.cfg, 1)
    assert pinned.runtime.device == "cuda:1"
    assert runtime.on_gpu(sp.cfg.model_copy(update={"runtime": RuntimeConfig(device="cpu")}), 1).runtime.device == "cpu"
    for stage_key, args in ((static_fit.stage_key, (sp.track, sp.ingest)),
                            (train_deform.stage_key, (sp.track, sp.audio, sp.static)),
                            (evaluate.stage_key, (sp.bundle, sp.ingest))):
        assert stage_key(*args, pinned) == stage_key(*args, sp.cfg)
    with pytest.raises(ConfigError, match="runtime.device"):
        load_config("tiny", overrides=["runtime.device=gpu"], environ={})
