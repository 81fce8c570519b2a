#!/usr/bin/env bash
# Screenshots of the Prefect UI for a finished train-speaker run: a throwaway Prefect server on
# a free local port, the tiny profile on a 4 s clip, then headless Chromium on the run page, its
# Artifacts tab and the evaluation artifact.
# Usage: bash scripts/ui_screenshot.sh [OUT_DIR]   (default /tmp/gstalker-ui)
# Needs Debian's chromium (apt-get install -y chromium). Everything else lives in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-/tmp/gstalker-ui}" && cd "${1:-/tmp/gstalker-ui}" && pwd)
PY=${GSTALKER_VENV:-.venv}/bin/python
command -v chromium >/dev/null || { echo "error: chromium not found"; echo "fix: apt-get install -y chromium"; exit 2; }

WORK=$(mktemp -d)
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_HOME=$WORK/prefect PREFECT_API_URL=http://127.0.0.1:$PORT/api PREFECT_UI_URL=http://127.0.0.1:$PORT
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 GSTALKER_HOME=$WORK/home

"${PY%/python}/prefect" server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 120); do
  curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "$PREFECT_API_URL/health" >/dev/null || { tail -20 "$WORK/server.log"; exit 1; }

# A real face if the sample media is here, else the tests' synthetic clip.
SAMPLE=../shared/data/cnn_anchor_71s.mp4
if [ -f "$SAMPLE" ]; then
  ffmpeg -loglevel error -ss 10 -t 4 -i "$SAMPLE" -c:v libx264 -preset ultrafast -c:a aac "$WORK/clip.mp4"
else
  "$PY" -c "import sys; from pathlib import Path; from tests.fixtures.media import make_clip; make_clip(Path(sys.argv[1]), seconds=4.0)" "$WORK/clip.mp4"
fi
# Prints the flow run id, then the evaluation artifact's id.
IDS=$("$PY" - "$WORK/clip.mp4" 2>"$WORK/train.log" <<'EOF'
import sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from flows.train_speaker import train_speaker
state = train_speaker(sys.argv[1], "ui-demo", profile="tiny", return_state=True)
state.result()  # raises if the run failed
with get_client(sync_client=True) as client:
    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation-ui-demo"])))
print(state.state_details.flow_run_id, artifact.id)
EOF
) || { tail -30 "$WORK/train.log"; exit 1; }
read -r RUN ARTIFACT <<<"${IDS##*$'\n'}"

shoot() {
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --virtual-time-budget=15000 --screenshot="$OUT/$1.png" "$PREFECT_UI_URL/$2" >/dev/null 2>&1
}
shoot run "runs/flow-run/$RUN"                                 # the stage graph and the logs
shoot run-artifacts "v2/runs/flow-run/$RUN?tab=Artifacts"      # the v1 UI ignores ?tab=, the v2 UI honours it
shoot evaluation "artifacts/artifact/$ARTIFACT"                # the held-out evaluation table
echo "flow run $RUN: $OUT/run.png, $OUT/run-artifacts.png, $OUT/evaluation.png"
