#!/usr/bin/env bash
# Install everything gstalker needs on a fresh Debian/Ubuntu CPU machine:
# ffmpeg/ffprobe from the OS, then a virtualenv (.venv, or $GSTALKER_VENV) with the pinned
# CPU dependencies and gstalker itself (editable). Safe to re-run: it skips the pip step
# when neither pyproject.toml nor requirements/cpu.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "installing ffmpeg (ffmpeg + ffprobe) ..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

VENV="${GSTALKER_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
STAMP="$VENV/.gstalker-install"
WANT="$(cat pyproject.toml requirements/cpu.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "installing Python dependencies into $VENV ..."
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -r requirements/cpu.txt -e '.[dev]' 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch, mediapipe, prefect, gstalker_core" \
    || { echo "install failed: see the pip output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
echo "gstalker installed in $VENV ($("$VENV/bin/gstalker" --version 2>/dev/null || echo 'cli pending'))"
