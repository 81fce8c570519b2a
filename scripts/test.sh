#!/usr/bin/env bash
# The test command (README, .ci/run): install if needed, then the whole suite on the CPU.
# It installs the optional backends too (GSTALKER_BACKENDS=0 skips them, and their tests skip),
# so that every backend the config offers is tested.
set -euo pipefail
cd "$(dirname "$0")/.."
GSTALKER_BACKENDS="${GSTALKER_BACKENDS:-1}" bash scripts/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_LOGGING_LEVEL=WARNING
exec "${GSTALKER_VENV:-.venv}/bin/python" -m pytest -q "$@"
