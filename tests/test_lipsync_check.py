"""bench/lipsync_check.py refuses bad input with the problem and its fix, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GSTALKER_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, str(REPO / "bench" / "lipsync_check.py"), *args,
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=300)


def test_bad_inputs_get_the_problem_and_the_fix(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not looked at before the speaker is")
    cases = {
        ("--speaker", "nobody", "--real", str(tmp_path / "missing.mp4")): "no such file",
        ("--speaker", "nobody", "--real", str(clip), "--set", "dub.no_such_key=1"): "no_such_key",
        ("--speaker", "nobody", "--real", str(clip)): "no trained model for speaker 'nobody'",
    }
    for args, problem in cases.items():
        run = _run(tmp_path, *args)
        assert run.returncode != 0 and problem in run.stderr and "fix:" in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr
