#!/usr/bin/env bash
# Install everything gstalker needs on a fresh Debian/Ubuntu CPU machine:
# ffmpeg/ffprobe from the OS, then a virtualenv (.venv, or $GSTALKER_VENV) with the pinned
# CPU dependencies and gstalker itself (editable). Safe to re-run: it skips the pip step
# when neither pyproject.toml nor requirements/cpu.txt changed since the last install.
# --backends (or GSTALKER_BACKENDS=1) also installs the optional backends (face-alignment,
# insightface, transformers; requirements/backends*.txt), which the default path never needs.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKENDS="${GSTALKER_BACKENDS:-0}"
[ "${1:-}" = "--backends" ] && BACKENDS=1

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
if [ "$BACKENDS" = 1 ]; then
  BACKENDS_STAMP="$VENV/.gstalker-backends"
  BACKENDS_WANT="$(cat requirements/cpu.txt requirements/backends.txt requirements/backends-nodeps.txt | sha256sum | cut -c1-16)"
  if [ "$(cat "$BACKENDS_STAMP" 2>/dev/null)" != "$BACKENDS_WANT" ]; then
    echo "installing the optional backends into $VENV ..."
    # cpu.txt again: its pins (torch, mediapipe's protobuf) hold while the backends resolve
    "$VENV/bin/python" -m pip install -q -r requirements/cpu.txt -r requirements/backends.txt 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements/backends-nodeps.txt 2>&1 | grep -v "is ignored" || true
    # cv2.ximgproc: opencv-contrib-python's cv2 is still the one installed
    "$VENV/bin/python" -c "import face_alignment, insightface.model_zoo, onnxruntime, transformers, mediapipe, cv2.ximgproc" \
      || { echo "optional backends' install failed: see the pip output above" >&2; exit 1; }
    echo "$BACKENDS_WANT" > "$BACKENDS_STAMP"
  fi
fi
echo "gstalker installed in $VENV ($("$VENV/bin/gstalker" --version 2>/dev/null || echo 'cli pending'))"
