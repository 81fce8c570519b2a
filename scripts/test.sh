#!/usr/bin/env bash
# The test command (README, .ci/run): install if needed, then the whole suite on the CPU.
# GSTALKER_BACKENDS=1 installs the optional backends too, so that their tests run (they skip without).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_LOGGING_LEVEL=WARNING
exec "${GSTALKER_VENV:-.venv}/bin/python" -m pytest -q "$@"
