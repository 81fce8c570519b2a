"""bench/gpu_bench.py's smoke run: every section a CPU can run, end to end, in an environment
made like the GPU box's: no mediapipe, Prefect or boto3 (nor anything else the box's image
lacks and bench/gpu_payload does not carry) and no ffprobe, only an ``ffmpeg`` on PATH."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import prepare_gpu_payload  # noqa: E402

CPU_SECTIONS = {"b. step times": "done", "c. render FPS": "done", "d. profile": "done", "e. training": "done"}
FIGURES = ("static-fit step", "landmark step", "deformation rendering step", "render FPS batch 1",
           "static: device busy", "render: device busy", "dub frame: device busy", "static fit", "deformation training", "held-out PSNR gstalker", "held-out PSNR static",
           "render FPS trained batch 1")


def box_like_environment(tmp_path: Path) -> dict[str, str]:
    """This venv as the box: a stub that refuses to import each module the box will not have,
    and a PATH that holds ffmpeg alone."""
    stubs, tools = tmp_path / "absent-on-box", tmp_path / "bin"
    stubs.mkdir()
    tools.mkdir()
    for module in prepare_gpu_payload.modules_absent_on_box():
        (stubs / f"{module}.py").write_text(f"raise ImportError('{module} is not on the GPU box')\n")
    (tools / "ffmpeg").symlink_to(shutil.which("ffmpeg"))
    return {**os.environ, "PYTHONPATH": str(stubs), "PATH": str(tools)}


@pytest.mark.slow
def test_smoke_run_does_every_cpu_section_as_the_box_would(tmp_path, shared_data):
    payload = tmp_path / "payload"
    # made here: tracking needs mediapipe, which the box has not
    prepare_gpu_payload.prepare_store(shared_data / "cnn_anchor_71s.mp4", 3.0, "tiny", payload)
    results, profile = tmp_path / "results.json", tmp_path / "profile"
    profile.mkdir()
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--device", "cpu", "--smoke",
                          "--payload", str(payload), "--results-json", str(results), "--profile-dir", str(profile)],
                         env=box_like_environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    table = run.stdout[run.stdout.index("## gstalker GPU bench"):]
    sections = {s["name"]: s for s in json.loads(results.read_text())["sections"]}
    assert {name: sections[name]["status"] for name in CPU_SECTIONS} == CPU_SECTIONS
    assert sections["a. gsplat parity"]["status"].startswith("skipped: needs CUDA")
    figures = {f["name"] for s in sections.values() for f in s["figures"]}
    assert set(FIGURES) <= figures
    for name in FIGURES:
        assert f"| {name} |" in table
    assert "| a. gsplat parity | status | skipped: needs CUDA" in table
    # the profile's tables name the operators of each profiled step; the traces are gzipped chrome traces
    tables = (profile / "profile.txt").read_text()
    assert all(f"==== {kind}: by host time" in tables for kind in ("static", "render", "dub frame"))
    assert "aten::" in tables
    for trace in ("trace_render.json.gz", "trace_dub_frame.json.gz"):
        assert json.loads(gzip.decompress((profile / trace).read_bytes()))["traceEvents"]


def test_sections_outside_a_to_e_are_refused_with_the_letters_it_takes(capsys):
    import gpu_bench

    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--sections", "bx"])
    assert "--sections takes letters of a-e, not 'bx'" in capsys.readouterr().err
    assert gpu_bench.parse_args(["--sections", "bd"]).sections == "bd"
