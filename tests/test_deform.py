"""Deformation networks: hash grid against a naive bilinear reference, tri-plane, audio window causality,
zero-initialised fields, torso latent prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gstalker_core.audio import frame_windows
from gstalker_core.deform import (POSE_DIM, AudioEncoder, DeformConfig, DeformDeltas, FaceDeformField, HashGrid2D,
                                  TorsoDeformField, TriPlaneEncoder, audio_windows, level_resolutions,
                                  pose_condition, receptive_steps, reference_pose, spatial_hash)
from gstalker_core.deform.hashgrid import dense_lookup, table_lookup
from gstalker_core.errors import InputError
from gstalker_core.dub_motion import pose_track_indices

TINY = DeformConfig(hash_levels=3, hash_features=2, hash_log2_table=8, hash_base_resolution=4, hash_max_resolution=24,
                    audio_channels=16, audio_code_dim=8, frame_window=4, face_mlp_width=16, face_mlp_depth=2,
                    torso_mlp_width=16, torso_mlp_depth=1, torso_frequencies=2, torso_latent_dim=4)
N_FEAT, STEP_WINDOW = 12, 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise(module: torch.nn.Module) -> None:
    """Replace the tiny/zero initial values so that every weight matters in a comparison."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _hash_py(ix: int, iy: int, table_size: int) -> int:
    """instant-ngp's hash in uint32 arithmetic, as its CUDA code computes it."""
    return ((ix * 1) ^ ((iy * 2654435761) & 0xFFFFFFFF)) % table_size


def _naive_encoding(grid: HashGrid2D, plane: int, x: float, y: float) -> list[float]:
    """Per-point bilinear interpolation over each level's vertices, read from the dense grid or the hash table."""
    out = []
    n_dense = len(grid.dense_grids)
    for level, res in enumerate(grid.resolutions):
        if level < n_dense:
            values = grid.dense_grids[level][plane]  # (F, res+1, res+1) indexed [f, iy, ix]

            def vertex(ix, iy):
                return values[:, iy, ix]
        else:
            table = grid.hash_tables[plane, level - n_dense]  # (T, F)

            def vertex(ix, iy):
                return table[_hash_py(ix, iy, grid.table_size)]
        px, py = x * res, y * res
        ix, iy = min(int(math.floor(px)), res - 1), min(int(math.floor(py)), res - 1)
        fx, fy = px - ix, py - iy
        blend = (vertex(ix, iy) * (1 - fx) * (1 - fy) + vertex(ix + 1, iy) * fx * (1 - fy)
                 + vertex(ix, iy + 1) * (1 - fx) * fy + vertex(ix + 1, iy + 1) * fx * fy)
        out.extend(blend.tolist())
    return out


def _points(n: int) -> torch.Tensor:
    pts = torch.rand(2, n, 2, dtype=torch.float64)
    pts[:, 0] = 0.0  # corners and edges hit the last cell's far vertex
    pts[:, 1] = 1.0
    pts[:, 2] = torch.tensor([1.0, 0.3], dtype=torch.float64)
    return pts


def test_level_resolutions_are_geometric_from_base_to_max():
    res = level_resolutions(5, 16, 256)
    assert res == [16, 32, 64, 128, 256]
    assert level_resolutions(1, 8, 64) == [8]
    growth = math.exp((math.log(512) - math.log(64)) / 15)
    assert level_resolutions(16, 64, 512) == [int(math.floor(64 * growth**k + 1e-6)) for k in range(16)]


def test_spatial_hash_is_instant_ngp_hash():
    rng = np.random.default_rng(1)
    ix, iy = rng.integers(0, 5000, 200), rng.integers(0, 5000, 200)
    got = spatial_hash(torch.from_numpy(ix), torch.from_numpy(iy), 2**14).tolist()
    assert got == [_hash_py(int(a), int(b), 2**14) for a, b in zip(ix, iy)]


def test_dense_levels_match_naive_bilinear():
    grid = HashGrid2D(n_levels=3, features_per_level=2, log2_table_size=8, base_resolution=3, max_resolution=12,
                      n_planes=2).double()
    assert len(grid.dense_grids) == 3 and grid.hash_tables is None  # 13^2 = 169 <= 256: nothing hashes
    _randomise(grid)
    pts = _points(40)
    got = grid(pts)
    assert got.shape == (2, 40, 6)
    for plane in range(2):
        ref = torch.tensor([_naive_encoding(grid, plane, *map(float, p)) for p in pts[plane]], dtype=torch.float64)
        torch.testing.assert_close(got[plane].detach(), ref, rtol=0, atol=1e-12)


def test_hashed_levels_equal_the_grid_read_through_the_hash():
    grid = HashGrid2D(n_levels=3, features_per_level=2, log2_table_size=6, base_resolution=8, max_resolution=40,
                      n_planes=2).double()
    assert not len(grid.dense_grids) and grid.hash_tables.shape == (2, 3, 64, 2)  # 9^2 > 64: all hashed
    _randomise(grid)
    pts = _points(40)
    got = grid(pts).detach()
    for plane in range(2):
        ref = torch.tensor([_naive_encoding(grid, plane, *map(float, p)) for p in pts[plane]], dtype=torch.float64)
        torch.testing.assert_close(got[plane], ref, rtol=0, atol=1e-12)


def test_table_path_equals_grid_sample_when_the_table_holds_the_grid():
    res, table_size = 10, 128  # 11^2 = 121 rows fit: the table path indexes densely
    grid = torch.randn(2, 3, res + 1, res + 1, dtype=torch.float64, requires_grad=True)
    table = torch.zeros(2, 1, table_size, 3, dtype=torch.float64)
    table[:, 0, :(res + 1) ** 2] = grid.detach().permute(0, 2, 3, 1).reshape(2, -1, 3)
    table.requires_grad_(True)
    xy = _points(200).requires_grad_(True)
    by_grid = dense_lookup(grid, xy)
    by_table = table_lookup(table, xy, torch.tensor([res]))[:, 0]
    torch.testing.assert_close(by_table, by_grid, rtol=0, atol=1e-12)
    weights = torch.randn_like(by_grid)
    g_grid_xy, g_grid = torch.autograd.grad((by_grid * weights).sum(), [xy, grid])
    g_table_xy, g_table = torch.autograd.grad((by_table * weights).sum(), [xy, table])
    torch.testing.assert_close(g_table[:, 0, :(res + 1) ** 2], g_grid.permute(0, 2, 3, 1).reshape(2, -1, 3))
    inner = ((xy > 0) & (xy < 1)).all(-1)  # away from the clamped border both paths have the same input gradient
    torch.testing.assert_close(g_table_xy[inner], g_grid_xy[inner])
    assert g_grid_xy[inner].abs().sum() > 0


def test_gradients_reach_grids_tables_and_inputs():
    grid = HashGrid2D(n_levels=4, features_per_level=2, log2_table_size=8, base_resolution=4, max_resolution=64)
    assert len(grid.dense_grids) and grid.hash_tables is not None
    xy = torch.rand(300, 2, requires_grad=True)
    (grid(xy) * torch.randn(300, 8)).sum().backward()
    for p in grid.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert xy.grad.abs().sum() > 0 and torch.isfinite(xy.grad).all()


def test_triplane_shapes_projection_and_normalisation():
    lo, hi = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 4.0, 3.0])
    enc = TriPlaneEncoder(TINY, lo, hi)
    _randomise(enc)
    unit = torch.rand(50, 3)
    pts = lo + unit * (hi - lo)
    out = enc(pts)
    width = TINY.hash_levels * TINY.hash_features
    assert out.shape == (50, 3 * width) and enc.output_dim == 3 * width
    # the same relative positions in another box give the same features (the box is normalised away)
    other = TriPlaneEncoder(TINY, lo * 3 + 1, hi * 3 + 1)
    other.load_state_dict({**enc.state_dict(), "normalise.bbox_min": lo * 3 + 1, "normalise.bbox_max": hi * 3 + 1})
    torch.testing.assert_close(other(pts * 3 + 1), out)
    # points outside the box are clamped onto it
    outside = pts.clone()
    outside[:, 1] = 10.0
    on_face = pts.clone()
    on_face[:, 1] = hi[1]
    torch.testing.assert_close(enc(outside), enc(on_face))
    # XY block ignores z, YZ ignores x, XZ ignores y
    for axis, untouched in ((2, 0), (0, 1), (1, 2)):
        moved = pts.clone()
        moved[:, axis] = lo[axis] + torch.rand(50) * (hi - lo)[axis]
        new = enc(moved)
        blocks = [slice(k * width, (k + 1) * width) for k in range(3)]
        torch.testing.assert_close(new[:, blocks[untouched]], out[:, blocks[untouched]])
        assert all((new[:, b] - out[:, b]).abs().max() > 1e-4 for k, b in enumerate(blocks) if k != untouched)


def test_triplane_refuses_an_empty_box():
    with pytest.raises(InputError, match="bbox_max > bbox_min"):
        TriPlaneEncoder(TINY, [0, 0, 0], [1, 0, 1])


def _audio_encoder() -> AudioEncoder:
    enc = AudioEncoder(TINY, N_FEAT, STEP_WINDOW)
    _randomise(enc)  # also makes the smoother's weights depend on the codes (they start uniform)
    return enc.eval()


def test_audio_windows_are_edge_clamped_neighbour_windows():
    feats = np.random.default_rng(0).normal(size=(40, N_FEAT)).astype(np.float32)  # 20 frames
    win = audio_windows(feats, [0, 7, 19], TINY.frame_window, STEP_WINDOW)
    assert win.shape == (3, TINY.frame_window, STEP_WINDOW, N_FEAT)
    # frame_window 4: neighbours t-2 .. t+1, clamped to [0, 19]
    for row, neighbours in zip(win, ([0, 0, 0, 1], [5, 6, 7, 8], [17, 18, 19, 19])):
        np.testing.assert_array_equal(row, frame_windows(feats, neighbours, STEP_WINDOW))
    as_tensor = audio_windows(torch.from_numpy(feats), [7], TINY.frame_window, STEP_WINDOW)
    np.testing.assert_array_equal(as_tensor.numpy(), win[1:2])


def test_condition_depends_exactly_on_the_audio_window():
    enc = _audio_encoder()
    feats = np.random.default_rng(0).normal(size=(80, N_FEAT)).astype(np.float32)  # 40 frames
    t = 20
    first, last = receptive_steps(t, TINY.frame_window, STEP_WINDOW)
    assert (first, last) == (2 * (t - 2) - 3, 2 * (t + 1) + 1 + 3)
    with torch.no_grad():
        base = enc.conditions(feats, t, t + 1)
        for step in (first - 1, last + 1, 0, len(feats) - 1):  # outside: bit-identical condition
            changed = feats.copy()
            changed[step] += 5.0
            assert torch.equal(enc.conditions(changed, t, t + 1), base)
        for step in (first, first + 1, 2 * t, last - 1, last):  # inside: the condition moves
            changed = feats.copy()
            changed[step] += 5.0
            assert (enc.conditions(changed, t, t + 1) - base).abs().max() > 1e-5


def test_chunked_conditions_equal_per_frame_windows():
    enc = _audio_encoder()
    feats = np.random.default_rng(1).normal(size=(60, N_FEAT)).astype(np.float32)  # 30 frames
    with torch.no_grad():
        whole = enc(enc.windows(feats, np.arange(30)))
        assert whole.shape == (30, TINY.audio_code_dim)
        torch.testing.assert_close(enc.conditions(feats, 0, 30), whole, rtol=0, atol=1e-5)
        chunks = torch.cat([enc.conditions(feats, a, min(a + 7, 30)) for a in range(0, 30, 7)])
        torch.testing.assert_close(chunks, whole, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="outside"):
        enc.conditions(feats, 25, 31)
    with pytest.raises(InputError, match="model expects"):
        enc.conditions(feats[:, :5], 0, 3)


def test_silence_gives_one_deterministic_condition_and_deformation():
    enc = _audio_encoder()
    silence = np.full((50, N_FEAT), -100.0, dtype=np.float32)  # log-mel of digital silence
    face = FaceDeformField(TINY, [-1, -1, -1], [1, 1, 1])
    _randomise(face)
    means = torch.rand(30, 3) * 2 - 1
    with torch.no_grad():
        cond = enc.conditions(silence, 0, 25)
        torch.testing.assert_close(cond, cond[:1].expand_as(cond), rtol=0, atol=1e-6)
        assert torch.equal(enc.conditions(silence, 0, 25), cond)
        deltas = face(face.encode(means), cond, torch.full((25,), 0.3))
        torch.testing.assert_close(deltas.d_means, deltas.d_means[:1].expand_as(deltas.d_means), rtol=0, atol=1e-6)
        loud = enc.conditions(np.random.default_rng(2).normal(size=(50, N_FEAT)).astype(np.float32), 0, 25)
        assert (loud - cond).abs().max() > 1e-3


def test_face_field_starts_at_the_static_fit_and_learns():
    face = FaceDeformField(TINY, [-1, -1, -1], [1, 1, 1])
    means = torch.rand(40, 3) * 2 - 1
    quats = torch.nn.functional.normalize(torch.randn(40, 4), dim=-1)
    log_scales = torch.randn(40, 3)
    audio, eye = torch.randn(3, TINY.audio_code_dim), torch.rand(3)
    deltas = face(face.encode(means), audio, eye)
    assert deltas.d_means.shape == (3, 40, 3) and deltas.d_quats.shape == (3, 40, 4)
    assert deltas.d_log_scales.shape == (3, 40, 3)
    for d in (deltas.d_means, deltas.d_quats, deltas.d_log_scales):
        assert torch.equal(d, torch.zeros_like(d))
    m, q, s = deltas.apply(means, quats, log_scales)
    assert torch.equal(m, means.expand(3, -1, -1)) and torch.equal(q, quats.expand(3, -1, -1))
    assert torch.equal(s, log_scales.expand(3, -1, -1))
    target = torch.randn(3, 40, 3)
    ((m - means - target) ** 2).mean().backward()
    assert face.mlp.head.weight.grad.abs().sum() > 0
    with torch.no_grad():  # one gradient step moves the deltas off zero, now every layer gets gradients
        for p in face.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    face.zero_grad()
    moved = face(face.encode(means), audio, eye)
    assert moved.d_means.abs().max() > 0
    ((moved.d_means - target) ** 2).mean().backward()
    assert face.mlp.point_in.weight.grad.abs().sum() > 0 and face.mlp.cond_in.weight.grad.abs().sum() > 0
    assert all(g.grad.abs().sum() > 0 for g in face.encoder.planes.dense_grids)


def test_batched_frames_equal_the_mlp_over_concatenated_inputs():
    face = FaceDeformField(TINY, [-1, -1, -1], [1, 1, 1])
    _randomise(face)
    means = torch.rand(25, 3) * 2 - 1
    audio, eye = torch.randn(4, TINY.audio_code_dim), torch.rand(4)
    encoded = face.encode(means)
    batch = face(encoded, audio, eye)
    mlp = face.mlp
    first = torch.cat([mlp.point_in.weight, mlp.cond_in.weight], dim=1)
    for b in range(4):
        x = torch.cat([encoded, audio[b].expand(25, -1), eye[b].expand(25, 1)], dim=1)
        raw = mlp.head(mlp.hidden(torch.relu(x @ first.T + mlp.point_in.bias)))
        torch.testing.assert_close(batch.d_means[b], raw[:, :3] * 2.0)  # box extent 2: offsets in box units
        torch.testing.assert_close(batch.d_quats[b], raw[:, 3:7])
        single = face(encoded, audio[b:b + 1], eye[b:b + 1])
        torch.testing.assert_close(single.d_log_scales[0], batch.d_log_scales[b])


def test_delta_rotation_is_a_world_rotation_of_each_gaussian():
    d_quats = torch.zeros(1, 5, 4)
    d_quats[..., 3] = 1.0  # (1,0,0,0) + (0,0,0,1) -> 90 degrees about z
    deltas = DeformDeltas(torch.zeros(1, 5, 3), d_quats, torch.zeros(1, 5, 3))
    quats = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).float()
    _, rotated, _ = deltas.apply(torch.zeros(5, 3), quats, torch.zeros(5, 3))

    def matrix(q):  # wxyz -> rotation matrices via scipy (scalar-last)
        return Rotation.from_quat(q[..., [1, 2, 3, 0]].numpy()).as_matrix()

    expected = Rotation.from_euler("z", 90, degrees=True).as_matrix() @ matrix(quats)
    np.testing.assert_allclose(matrix(rotated[0]), expected, atol=1e-5)
    np.testing.assert_allclose(rotated[0].norm(dim=-1).numpy(), 1.0, atol=1e-6)


def test_torso_field_latents_pose_and_zero_init():
    torso = TorsoDeformField(TINY, n_train_frames=30, bbox_min=[-1, 0, -1], bbox_max=[1, 2, 1])
    assert torso.latent_smoothness().item() == 0.0
    means = torch.rand(20, 3)
    track = pose_track_indices(70, 30)  # ping-pong over the training frames
    pose = torch.randn(70, POSE_DIM)
    deltas = torso(torso.encode(means), pose, torso.latent_for_track(torch.from_numpy(track)))
    assert deltas.d_means.shape == (70, 20, 3) and torch.equal(deltas.d_means, torch.zeros_like(deltas.d_means))
    with torch.no_grad():
        torso.latents.weight.copy_(torch.randn(30, TINY.torso_latent_dim))
    lat = torso.latents.weight.detach().clone()
    assert torso.latent_smoothness().item() == pytest.approx(float(((lat[1:] - lat[:-1]) ** 2).sum()), rel=1e-6)
    torch.testing.assert_close(torso.latent_for_track(torch.from_numpy(track)), lat[torch.from_numpy(track)])
    torso.latent_smoothness().backward()  # the prior pulls consecutive latents together
    with torch.no_grad():
        torso.latents.weight -= 0.1 * torso.latents.weight.grad
    assert torso.latent_smoothness().item() < float(((lat[1:] - lat[:-1]) ** 2).sum())


def test_pose_condition_is_zero_at_the_reference_and_scale_free():
    rots = torch.from_numpy(Rotation.from_euler("xyz", np.random.default_rng(0).normal(0, 0.1, (12, 3))).as_matrix())
    trans = torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64) + torch.randn(12, 3, dtype=torch.float64) * 0.01
    ref_r, ref_t = reference_pose(rots, trans)
    torch.testing.assert_close(ref_r @ ref_r.T, torch.eye(3, dtype=torch.float64))
    at_reference = pose_condition(ref_r[None], ref_t[None], ref_r, ref_t)
    torch.testing.assert_close(at_reference, torch.zeros(1, POSE_DIM, dtype=torch.float64))
    cond = pose_condition(rots, trans, ref_r, ref_t)
    assert cond.shape == (12, POSE_DIM) and cond.abs().max() > 1e-3
    torch.testing.assert_close(pose_condition(rots, trans * 5, ref_r, ref_t * 5), cond)
    same = reference_pose(rots[:1].expand(4, 3, 3), trans[:1].expand(4, 3))
    torch.testing.assert_close(same[0], rots[0])


def test_config_refuses_inverted_resolutions_and_typos():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="hash_max_resolution"):
        DeformConfig(hash_base_resolution=64, hash_max_resolution=32)
    with pytest.raises(ValidationError):
        DeformConfig(hash_level=4)


def test_tcnn_backend_without_tinycudann_or_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have tinycudann")
    from gstalker_core.errors import ConfigError

    with pytest.raises(ConfigError, match="grid_backend"):
        TriPlaneEncoder(TINY.model_copy(update={"grid_backend": "tcnn"}), [0, 0, 0], [1, 1, 1])


def test_inference_blocks_equal_the_training_evaluation(monkeypatch):
    """Without autograd the conditioned MLP runs in blocks of points (cache-sized activations):
    the same outputs as the whole-batch evaluation that training uses."""
    from gstalker_core.deform import fields

    torch.manual_seed(0)
    mlp = fields.ConditionedMLP(point_dim=12, cond_dim=5, width=16, depth=3, out_dim=10)
    torch.nn.init.normal_(mlp.head.weight)  # the zero-initialised last layer would make every output 0
    points, conditions = torch.randn(1000, 12), torch.randn(4, 5)
    whole = mlp(points, conditions)
    monkeypatch.setattr(fields, "INFERENCE_ACTIVATIONS", 4 * 16 * 300)  # blocks of 300 points: 4 blocks
    with torch.no_grad():
        blocked = mlp(points, conditions)
    assert blocked.shape == whole.shape == (4, 1000, 10) and whole.abs().max() > 0.1
    assert torch.allclose(blocked, whole, atol=1e-5)
