"""`gstalker export`: a trained speaker's Gaussians as 3DGS .ply files, read back with an
independent reader (plyfile), and every bad input refused before a file is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from gstalker_core import dub, export, speakers
from gstalker_core.dub_motion import pose_track_indices
from gstalker_core.errors import InputError
from gstalker_core.model.bundle import fetch_bundle
from gstalker_core.storage import LocalStore


def _gstalker(sp, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GSTALKER_HOME": str(sp.cfg.home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([str(Path(sys.executable).parent / "gstalker"), "export", *args, "--profile", "tiny"],
                          env=env, capture_output=True, text=True, timeout=300)


def _xyz(vertices) -> np.ndarray:
    return np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1)


def test_export_writes_the_gaussians_and_the_head_at_a_time_of_the_audio(tiny_speaker, clip, tmp_path):
    sp = tiny_speaker
    voice = clip("voice.wav", seconds=2.0, video=False)
    out = _gstalker(sp, "--speaker", sp.name, "--out", str(tmp_path / "ply"), "--at", "1.3", "--audio", str(voice))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dub frame 32" in out.stdout  # 1.3 s at 25 fps
    model = (bundle := fetch_bundle(sp.store, sp.bundle, sp.cfg.cache_dir)).model
    head, torso, deformed = (PlyData.read(str(tmp_path / "ply" / name))["vertex"]
                             for name in (export.HEAD, export.TORSO, export.deformed_head_name(1.3)))
    for vertices, gaussians in ((head, model.head), (torso, model.torso)):
        assert vertices.count == len(gaussians)
        assert np.allclose(_xyz(vertices), gaussians.means.detach().numpy())
        assert np.allclose(vertices["opacity"], gaussians.opacity_logits.detach().numpy())
        assert np.allclose(vertices["scale_0"], gaussians.log_scales.detach()[:, 0].numpy())

    # the head of dub frame 32, as dubbing that audio deforms it
    heard = dub.dub_audio(bundle, voice, sp.cfg.dub, tmp_path)
    source = dub.dub_source(bundle, heard)
    with torch.no_grad():
        states, _ = dub.dub_frames(model, source, np.array([32]),
                                   pose_track_indices(heard.n_frames, len(bundle.viewmats))[[32]],
                                   lip=dub.lip_motion(bundle, source, sp.cfg.dub))
    assert deformed.count == len(model.head)
    assert np.allclose(_xyz(deformed), states.means[0].numpy(), atol=1e-6)
    assert np.allclose(np.stack([deformed[f"rot_{i}"] for i in range(4)], 1), states.quats[0].numpy(), atol=1e-6)
    assert not np.allclose(_xyz(deformed), _xyz(head))  # the face moved
    for colour_or_opacity in ("opacity", "f_dc_0", "f_dc_2"):  # deformation moves, never recolours
        assert np.array_equal(deformed[colour_or_opacity], head[colour_or_opacity])


def test_bad_input_is_refused_before_any_file_is_written(tiny_speaker, clip, tmp_path):
    sp = tiny_speaker
    voice = str(clip("voice.wav", seconds=2.0, video=False))
    refused = {"no trained model for speaker 'nobody'": dict(speaker="nobody"),
               r"--at 2.5 s is past the end of voice.wav \(2.00 s\)": dict(at_s=2.5, audio=voice),
               "--at and --audio go together": dict(at_s=1.0),
               "before the audio's start": dict(at_s=-0.5, audio=voice)}
    for message, kwargs in refused.items():
        with pytest.raises(InputError, match=message):
            export.export_speaker(sp.store, kwargs.pop("speaker", sp.name), tmp_path / "out", sp.cfg, **kwargs)
    # a speaker published to a store that lacks its model (never finished, or deleted)
    elsewhere = LocalStore(tmp_path / "store")
    speakers.publish(elsewhere, sp.name, sp.bundle, None, "video.mp4", "tiny")
    with pytest.raises(InputError, match="is missing from the store"):
        export.export_speaker(elsewhere, sp.name, tmp_path / "out", sp.cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, problem", [
    (["--speaker", "nobody"], "no trained model for speaker 'nobody'"),
    (["--speaker", "tiny-speaker", "--at", "9", "--audio", "VOICE"], "--at 9 s is past the end of voice.wav"),
])
def test_the_command_says_what_is_wrong_and_how_to_fix_it(tiny_speaker, clip, tmp_path, args, problem):
    voice = str(clip("voice.wav", seconds=2.0, video=False))
    out = _gstalker(tiny_speaker, *(voice if a == "VOICE" else a for a in args), "--out", str(tmp_path / "ply"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"error: {problem}" in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "ply").exists()
