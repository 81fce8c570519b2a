"""The trained model on a tiny speaker: what audio drives, bundles, resume after a crash, evaluation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gstalker_core import audio, evaluate, tracking
from gstalker_core.train import static_fit
from gstalker_core.model.bundle import fetch_bundle, load_bundle, save_bundle
from gstalker_core.data.conditions import FrameSource
from gstalker_core.errors import InputError
from gstalker_core.render.gaussians import GaussianModel
from gstalker_core.storage import LocalStore, fetch_part
from gstalker_core.storage.checkpoints import Checkpoints
from gstalker_core.model.talking_head import NO_FRAME, FrameConditions, TalkingHead
from gstalker_core.train.train_deform import make_optimizer, set_learning_rates, train_deformation


def _conditions(model, features, frames, viewmat):
    n = len(frames)
    return FrameConditions(audio=model.audio_encoder.windows(features, frames), eye=torch.ones(n),
                           viewmats=torch.as_tensor(viewmat).expand(n, 4, 4), track_frames=torch.zeros(n, dtype=torch.long))


def test_audio_drives_the_face_only_and_silence_keeps_it_still(tiny_speaker):
    bundle = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    model, view = bundle.model, bundle.viewmats[0]
    spec = bundle.manifest.audio_spec
    rng = np.random.default_rng(0)
    speech = audio.compute_features(rng.normal(0, 0.1, 16000).astype(np.float32) * np.sin(np.linspace(0, 40, 16000)),
                                    spec, n_frames=25)
    silence = audio.compute_features(np.zeros(16000, np.float32), spec, n_frames=25)
    with torch.no_grad():
        heads, torsos = model.frames(_conditions(model, speech, [3, 12, 20], view))
        quiet_heads, quiet_torsos = model.frames(_conditions(model, silence, [3, 12, 20], view))
    # speech moves the face Gaussians from frame to frame; silence gives one still face
    moved = (heads.means[0] - heads.means[1]).abs().max()
    still = (quiet_heads.means[0] - quiet_heads.means[1:]).abs().max()
    # still: float rounding of one identical condition; moved: a real (if small, after 30 tiny
    # steps) motion, orders of magnitude above it
    assert still < 1e-7 and moved > 100 * max(float(still), 1e-9), (moved, still)
    # the torso does not listen: same pose, any audio -> same torso
    assert torch.allclose(torsos.means[0], quiet_torsos.means[2], atol=1e-7)


def test_bundle_saved_and_loaded_renders_identical_frames(tiny_speaker, tmp_path):
    from gstalker_core.model.avatar import render_avatar

    bundle = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    copy = load_bundle(save_bundle(bundle, tmp_path / "bundle"))
    features = audio.load_features(tiny_speaker.store, tiny_speaker.audio, tiny_speaker.cfg.cache_dir)

    def frames(b):
        cond = _conditions(b.model, features, [5, 6], b.viewmats[5])
        with torch.no_grad():
            heads, torsos = b.model.frames(cond)
            return render_avatar(heads, torsos, cond.viewmats, torch.from_numpy(b.K),
                                 torch.from_numpy(b.plate / 255.0).float()).rgb

    assert torch.equal(frames(bundle), frames(copy))


def test_incompatible_bundle_is_refused_with_a_clear_message(tiny_speaker, tmp_path):
    folder = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    target = save_bundle(folder, tmp_path / "old")
    manifest = json.loads((target / "bundle.json").read_text())
    manifest["format_version"] = 0
    (target / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format version 0"):
        load_bundle(target)
    shutil.rmtree(target)
    with pytest.raises(InputError, match="not a model bundle"):
        load_bundle(target)


def _feature_spec(sp) -> audio.AudioFeatureSpec:
    return audio.AudioFeaturesMeta.model_validate(sp.audio.meta).spec


def _fresh_model(sp):
    store, cfg = sp.store, sp.cfg
    torch.manual_seed(0)
    head = GaussianModel.load(fetch_part(store, sp.static, static_fit.HEAD, cfg.cache_dir))
    torso = GaussianModel.load(fetch_part(store, sp.static, static_fit.TORSO, cfg.cache_dir))
    train = tracking.open_dataset(store, sp.track, sp.ingest, cfg.cache_dir, split="train")
    model = TalkingHead(cfg.deform, head, torso, _feature_spec(sp).width, cfg.audio.step_window,
                        torch.from_numpy(train.arrays.viewmats[train.indices]))
    return model, train


def _source(train, plate, features):
    a = train.arrays
    return FrameSource.build(a.viewmats, a.blink, a.K, plate, torch.device("cpu"), features)


class _Crash(Exception):
    pass


def _crash_at(step: int):
    """A progress callback that kills the run once ``step`` steps are done."""
    def progress(done, total, info):
        if done == step:
            raise _Crash

    return progress


@pytest.fixture
def one_thread():
    # Bitwise equality needs a fixed reduction order: with several intra-op threads some CPU
    # kernels sum in a varying order, and two uninterrupted runs already differ in the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_speaker, tmp_path, one_thread):
    sp = tiny_speaker
    features = audio.load_features(sp.store, sp.audio, sp.cfg.cache_dir)
    plate = static_fit.read_plate(sp.store, sp.track, sp.cfg.cache_dir)
    # crash in the rendering phase, resume from a checkpoint of the landmark phase
    cfg = sp.cfg.train.model_copy(update={"guide_iterations": 4, "iterations": 8, "checkpoint_every": 3,
                                          "unfreeze_step": 2, "lip_start": 1})
    model, train = _fresh_model(sp)
    train_deformation(model, train, _source(train, plate, features), cfg,
                      Checkpoints(LocalStore(tmp_path / "a"), "deform", "k"))
    uninterrupted = model.state_dict()
    static_head, static_torso = _fresh_model(sp)[0].head.state_dict(), _fresh_model(sp)[0].torso.state_dict()
    # the head Gaussians trained from unfreeze_step on; the torso's stayed the static fit's
    assert not torch.equal(model.head.state_dict()["means"], static_head["means"])
    assert all(torch.equal(model.torso.state_dict()[k], static_torso[k]) for k in static_torso)

    checkpoints = Checkpoints(LocalStore(tmp_path / "b"), "deform", "k")
    model, train = _fresh_model(sp)
    with pytest.raises(_Crash):
        train_deformation(model, train, _source(train, plate, features), cfg, checkpoints, progress=_crash_at(7))
    torch.manual_seed(123)  # a new process: nothing of the crashed run's state survives but the checkpoint
    model, train = _fresh_model(sp)
    report = train_deformation(model, train, _source(train, plate, features), cfg, checkpoints)
    assert report.resumed_from == 6
    resumed = model.state_dict()
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_pose_no_training_frame_stands_for_shows_the_static_torso(tiny_speaker):
    model, train = _fresh_model(tiny_speaker)
    with torch.no_grad():  # a torso field that moves the torso
        model.torso_field.mlp.head.bias.fill_(0.1)
    view = torch.from_numpy(train.arrays.viewmats[[0, 5, 9]])
    cond = FrameConditions(audio=model.audio_encoder.windows(np.zeros((40, _feature_spec(tiny_speaker).width),
                                                                      np.float32), [0, 5, 9]),
                           eye=torch.ones(3), viewmats=view, track_frames=torch.tensor([5, NO_FRAME, 9]))
    with torch.no_grad():
        _, torsos = model.frames(cond)
    assert torch.equal(torsos.means[1], model.torso.means) and torch.equal(torsos.quats[1], model.torso.quats)
    for i in (0, 2):
        assert not torch.equal(torsos.means[i], model.torso.means)


def test_learning_rates_follow_the_schedule(tiny_speaker):
    cfg = tiny_speaker.cfg.train.model_copy(update={"guide_iterations": 10, "iterations": 100, "unfreeze_step": 40,
                                                     "lr_final_scale": 0.01})
    optimizer = make_optimizer(_fresh_model(tiny_speaker)[0], cfg)

    def rates(step):
        set_learning_rates(optimizer, cfg, step)
        return {g["name"]: g["lr"] for g in optimizer.param_groups}

    head_groups = [g["name"] for g in optimizer.param_groups if g["name"].startswith("head.")]
    assert head_groups and not any(g["name"].startswith("torso.") for g in optimizer.param_groups)
    assert rates(0)["networks"] == rates(10)["networks"] == cfg.lr_networks  # landmark steps: full rate
    assert rates(0)["encoder"] == rates(9)["encoder"] == cfg.lr_networks  # the encoder: landmark steps only
    assert rates(10)["encoder"] == rates(10 + 50)["encoder"] == 0.0
    assert all(rates(10 + 39)[g] == 0.0 for g in head_groups)  # head Gaussians frozen before unfreeze_step
    assert all(rates(10 + 40)[g] > 0.0 for g in head_groups)
    assert rates(10 + 50)["networks"] == pytest.approx(cfg.lr_networks * 0.1)  # half way: sqrt(0.01)
    assert rates(10 + 100)["networks"] == pytest.approx(cfg.lr_networks * 0.01)


def test_static_fit_resumed_after_a_crash_equals_an_uninterrupted_run(tiny_speaker, tmp_path, one_thread):
    """Checkpoints at 5 and 10, crash at 13: the densification at step 15 needs the view-space
    gradient statistics of steps 8-14 (its threshold sits near their median, so every one
    counts), its splits draw from the torch RNG, and an opacity reset falls at step 12."""
    sp = tiny_speaker
    plate = static_fit.read_plate(sp.store, sp.track, sp.cfg.cache_dir)
    gaussians = sp.cfg.static.gaussians.model_copy(update={"densify_from": 0, "densify_every": 8,
                                                           "opacity_reset_every": 12})
    cfg = sp.cfg.static.model_copy(update={"iterations": 20, "checkpoint_every": 5, "eval_frames": 1,
                                           "backend": "torch", "gaussians": gaussians})

    def fit(store_dir, progress=None):
        train = tracking.open_dataset(sp.store, sp.track, sp.ingest, sp.cfg.cache_dir, split="train", seed=cfg.seed)
        test = tracking.open_dataset(sp.store, sp.track, sp.ingest, sp.cfg.cache_dir, split="test", shuffle=False)
        checkpoints = Checkpoints(LocalStore(store_dir), "static", "k")
        return static_fit.fit_static(train, test, plate, train.arrays.template, cfg, checkpoints, progress)

    head, torso, _, _ = fit(tmp_path / "a")
    with pytest.raises(_Crash):
        fit(tmp_path / "b", _crash_at(13))
    torch.manual_seed(123)  # a new process: nothing of the crashed run's state survives but the checkpoint
    resumed_head, resumed_torso, _, _ = fit(tmp_path / "b")
    assert len(resumed_head) == len(head) > sp.cfg.static.n_head  # densification did add Gaussians
    for want, got in ((head, resumed_head), (torso, resumed_torso)):
        assert all(torch.equal(got.state()["params"][p], want.state()["params"][p]) for p in want.state()["params"])


def _evaluation(sp):
    from gstalker_core.storage import find_stage

    runs = [k for k in sp.store.list("stages/evaluate/") if k.endswith("MANIFEST.json")]
    return find_stage(sp.store, "evaluate", runs[0].split("/")[2])


def test_evaluation_report_has_every_baseline_and_the_per_frame_curves(tiny_speaker):
    manifest = _evaluation(tiny_speaker)
    report = evaluate.EvalReport.model_validate(manifest.meta)
    assert list(report.methods) == list(evaluate.METHODS) == ["gstalker", "no_lip_gain", "no_deformation", "static",
                                                              "nearest"]
    bundle = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    assert report.lip_gain is not None and 1.0 <= report.lip_gain <= bundle.manifest.lip_gain.max_gain
    assert report.frames == len(range(report.first_frame, report.first_frame + report.frames)) > 0
    assert set(manifest.parts) >= {evaluate.REPORT_JSON, evaluate.REPORT_MD, evaluate.VIDEO, evaluate.CURVES_JSON,
                                   evaluate.PLOT}
    markdown = report.markdown()
    assert "| gstalker |" in markdown and "| trained Gaussians, no deformation |" in markdown
    assert "| static fit (mouth frozen) |" in markdown and f"mouth LMD (px@{report.resolution})" in markdown
    assert "| gstalker, lip gain 1 |" in markdown and "mouth-open std" in markdown
    for scores in report.methods.values():
        # the full frame's error is the pixel-weighted mean of the regions' errors
        regions = [scores.region_psnr[r] for r in evaluate.REGIONS if scores.region_psnr[r] > 0]
        assert set(scores.region_psnr) == set(evaluate.REGIONS) and len(regions) >= 2
        assert min(regions) - 1e-6 <= scores.psnr <= max(regions) + 1e-6
        assert 0.0 <= scores.person_coverage_worst_frame <= scores.person_coverage <= 1.0
        assert 0.0 <= scores.person_coverage_interior <= 1.0
        assert 0.0 < scores.face_ssim <= 1.0
    curves = evaluate.FrameCurves.model_validate_json(
        fetch_part(tiny_speaker.store, manifest, evaluate.CURVES_JSON, tiny_speaker.cfg.cache_dir).read_text())
    assert curves.frames == list(range(report.first_frame, report.first_frame + report.frames))
    for name, scores in report.methods.items():
        assert len(curves.psnr[name]) == report.frames
        assert np.mean(curves.person_coverage[name]) == pytest.approx(scores.person_coverage)
    assert sum(v is not None for v in curves.mouth_opening["truth"]) == report.mouth_frames
    plot = fetch_part(tiny_speaker.store, manifest, evaluate.PLOT, tiny_speaker.cfg.cache_dir)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_an_evaluation_report_of_code_version_2_still_loads():
    """Reports stored before coverage and the ablation gave the mouth distance in 512 px pixels."""
    old = {"frames": 10, "first_frame": 100, "resolution": 128, "mouth_frames": 9,
           "truth_audio_energy_correlation": 0.2,
           "methods": {name: {"psnr": 22.9, "ssim": 0.85, "face_psnr": 21.5, "face_ssim": 0.87,
                              "region_psnr": {"head": 27.8, "torso": 17.1, "background": 28.1},
                              "mouth_landmark_distance_px512": 1.68, "mouth_opening_correlation": 0.6,
                              "audio_energy_correlation": 0.19, "jitter_px": 0.4, "frames_without_face": 0}
                       for name in ("gstalker", "static", "nearest")}}
    stored = json.dumps(old)
    report = evaluate.EvalReport.model_validate(json.loads(stored))
    assert report.methods["gstalker"].mouth_landmark_distance_px == pytest.approx(1.68 * 128 / 512)
    assert report.methods["static"].person_coverage is None
    assert "not measured" in report.markdown() and "| nearest-neighbour audio |" in report.markdown()
    evaluate.EvalReport.model_validate(old)
    assert old == json.loads(stored)  # the caller's dict (a manifest's meta) is left as it was


def test_torso_stands_behind_the_chin_when_the_head_rises(tiny_speaker):
    """Raised above its tracked pose, the head uncovers the neck pixels behind its chin
    (``parsing.behind_head``). The torso layer, trained to continue the neck there, must stand
    there: most of them are covered by the torso. (Before, the torso layer learnt
    to be transparent under the head, and a 16 px raise at 64 px dropped the composite's
    coverage from 0.60 to 0.43.) ``person_coverage`` is checked against a plain count."""
    from gstalker_core.metrics import COVERED_ALPHA, person_coverage
    from gstalker_core.model.avatar import GaussianState, render_avatar
    from gstalker_core.tracking.parsing import BACKGROUND, BEHIND_HEAD_BAND, behind_head

    sp = tiny_speaker
    bundle = fetch_bundle(sp.store, sp.bundle, sp.cfg.cache_dir)
    train = tracking.open_dataset(sp.store, sp.track, sp.ingest, sp.cfg.cache_dir, split="train", shuffle=False)
    t = int(train.indices[3])
    person = train.sample(t).labels.numpy() != BACKGROUND
    view, K = torch.from_numpy(train.arrays.viewmats[t]).float(), torch.from_numpy(bundle.K).float()
    size = bundle.plate.shape[0]
    rise_px = 0.5 * BEHIND_HEAD_BAND * size  # within the band the torso continues the neck over
    raised = view.clone()
    raised[1, 3] -= rise_px * view[2, 3] / K[1, 1]  # up in the image at the head's depth (y points down)
    with torch.no_grad():
        layers = render_avatar(GaussianState.of(bundle.model.head), GaussianState.of(bundle.model.torso),
                               torch.stack([view, raised]), K, torch.from_numpy(bundle.plate / 255.0).float())
    for a in layers.alpha:
        share = person_coverage(a, torch.from_numpy(person))
        assert share == np.count_nonzero((a[..., 0] >= COVERED_ALPHA) & person) / np.count_nonzero(person)
    head = layers.head_alpha[..., 0].numpy()
    sample = train.sample(t)
    band = behind_head(sample.labels[None], sample.rgb[None].float() / 255.0)[0][0].numpy()
    left = band & (head[0] >= 0.5) & (head[1] < 0.5)  # neck pixels behind the chin that the raise uncovers
    assert left.sum() >= 0.5 * rise_px * 4  # the raise really uncovered the chin's pixels
    torso = layers.torso_alpha[1, ..., 0].numpy()
    assert np.mean(torso[left] >= 0.5) >= 0.8, (int(left.sum()), float(np.mean(torso[left] >= 0.5)))

