"""Gaussian sets: initialisation, densification with optimiser state, persistence, .ply export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gstalker_core import runtime
from gstalker_core.config import GaussianConfig
from gstalker_core.render.gaussians import GaussianModel
from gstalker_core.render.rasterize import rasterization


def _model(n=300, **cfg):
    return GaussianModel.init_random(GaussianConfig(**cfg), n, np.array([-0.1, -0.1, 0.5]), np.array([0.1, 0.1, 0.7]))


def _render(model, size=32):
    K = torch.tensor([[[60.0, 0, size / 2], [0, 60.0, size / 2], [0, 0, 1]]])
    return rasterization(model.means, model.quats, torch.exp(model.log_scales), torch.sigmoid(model.opacity_logits),
                         model.sh_coefficients(), torch.eye(4)[None], K, size, size, sh_degree=model.sh_degree)


def test_random_init_is_inside_the_volume_and_renders():
    model = _model()
    m = model.means.detach()
    assert len(model) == 300 and (m >= torch.tensor([-0.1, -0.1, 0.5])).all() and (m <= torch.tensor([0.1, 0.1, 0.7])).all()
    image, alpha, _ = _render(model)
    assert alpha.max() > 0.3


@pytest.fixture(params=["default", "fused"])
def adam_kind(request, monkeypatch):
    """Adam as the CPU runs it, and fused as on CUDA (``runtime.FUSED_ADAM_DEVICES``): torch fuses
    on the CPU too, so the state surgery of densification is checked on both here."""
    if request.param == "fused":
        monkeypatch.setattr(runtime, "FUSED_ADAM_DEVICES", ("cuda", "cpu"))
    return request.param


def test_adam_is_fused_on_the_devices_listed_only(adam_kind):
    opt = _model().make_optimizer()
    assert bool(opt.defaults["fused"]) == (adam_kind == "fused")
    assert not torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults["fused"]  # torch's own CPU default


def test_densify_and_prune_keep_optimizer_state_aligned(adam_kind):
    model = _model(densify_from=0, densify_every=1, densify_grad_threshold=1e-9, max_gaussians=10_000)
    opt = model.make_optimizer()
    target = torch.rand(1, 32, 32, 3)
    image, alpha, meta = _render(model)
    ((image - target) ** 2).mean().backward()
    opt.step()
    before = len(model)
    with torch.no_grad():
        model.opacity_logits[:10] = -20.0  # these must be pruned
    model.densify_step(0, meta, opt)
    assert len(model) > before  # tiny threshold: everything visible was cloned or split
    for group in opt.param_groups:
        p = group["params"][0]
        assert p is getattr(model, group["name"]) and len(p) == len(model)
        assert opt.state[p]["exp_avg"].shape == p.shape
    # training continues with the new parameters
    image, _, _ = _render(model)
    ((image - target) ** 2).mean().backward()
    opt.step()
    assert torch.sigmoid(model.opacity_logits.detach()).min() > 0.005


def test_a_checkpoint_of_either_adam_resumes_in_the_other(monkeypatch):
    """A run checkpointed on the CPU resumes fused on a GPU, and back (the step counts move)."""
    target = torch.rand(1, 32, 32, 3)
    for saver, loader in [(("cpu",), ("cuda", "cpu")), (("cuda", "cpu"), ("cpu",))]:
        monkeypatch.setattr(runtime, "FUSED_ADAM_DEVICES", saver)
        model = _model()
        opt = model.make_optimizer()
        ((_render(model)[0] - target) ** 2).mean().backward()
        opt.step()
        monkeypatch.setattr(runtime, "FUSED_ADAM_DEVICES", loader)
        resumed = model.make_optimizer()
        resumed.load_state_dict(opt.state_dict())
        model.means.grad = None
        ((_render(model)[0] - target) ** 2).mean().backward()
        before = model.means.detach().clone()
        resumed.step()
        assert float(resumed.state[model.means]["step"]) == 2.0
        assert not torch.equal(model.means.detach(), before)


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model(sh_degree=2)
    with torch.no_grad():
        model.shN.normal_()
    loaded = GaussianModel.load(model.save(tmp_path / "g.safetensors"))
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh0", "shN"):
        assert torch.equal(getattr(model, name), getattr(loaded, name))
    assert loaded.cfg == model.cfg
    assert torch.equal(_render(model)[0], _render(loaded)[0])


def test_state_carries_the_densification_statistics(tmp_path):
    """A checkpoint between two densifications must not lose the gradients gathered since the last one."""
    model = _model(densify_from=0, densify_every=1000)
    image, _, meta = _render(model)
    image.mean().backward()
    model.densify_step(0, meta, model.make_optimizer())
    assert model.grad_count.sum() > 0
    restored = GaussianModel.from_state(model.state())
    assert torch.equal(restored.grad_accum, model.grad_accum) and torch.equal(restored.grad_count, model.grad_count)
    assert GaussianModel.load(model.save(tmp_path / "g.safetensors")).grad_count.sum() == 0  # a saved set starts afresh


def test_ply_export_has_the_3dgs_layout(tmp_path):
    model = _model(n=50, sh_degree=1)
    path = model.export_ply(tmp_path / "head.ply")
    raw = path.read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    lines = header.decode().splitlines()
    names = [line.split()[-1] for line in lines if line.startswith("property")]
    assert lines[1] == "format binary_little_endian 1.0" and "element vertex 50" in lines
    assert names[:6] == ["x", "y", "z", "nx", "ny", "nz"] and names[-4:] == ["rot_0", "rot_1", "rot_2", "rot_3"]
    assert len([n for n in names if n.startswith("f_rest_")]) == 9
    data = np.frombuffer(body, "<f4").reshape(50, len(names))
    assert np.allclose(data[:, 0], model.means.detach()[:, 0].numpy())
    assert np.allclose(data[:, names.index("opacity")], model.opacity_logits.detach().numpy())
