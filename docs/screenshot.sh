#!/bin/sh
# The README's MLflow pictures: a tracking server on 127.0.0.1, one configs/tiny.yaml run into it,
# headless Chromium on its run page and its experiment's run table (Model training view).
# Needs chromium (Debian: apt-get install -y chromium). Usage: docs/screenshot.sh [PORT]
set -eu
cd "$(dirname "$0")/.."
PORT=${1:-5077}
WORK=$(mktemp -d /tmp/mlflow-screenshot.XXXXXX)
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/mlflow server --backend-store-uri "sqlite:///$WORK/mlflow.db" --artifacts-destination "$WORK/artifacts" \
  --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
URL=http://127.0.0.1:$PORT
for _ in $(seq 120); do curl -sf "$URL/health" > /dev/null && break; sleep 1; done
# Ray Train allows one Ray per host: take the tests' lock when it is there.
LOCK=$( [ -x /tmp/raylock ] && echo /tmp/raylock || true )
$LOCK .venv/bin/python -m pipeline train --config configs/tiny.yaml "tracking.uri=$URL" tracking.experiment=tiny \
  "model.cache_dir=$WORK/models" "data.cache_dir=$WORK/data" "train.output_dir=$WORK/outputs" > "$WORK/train.log" 2>&1
RUN=$(curl -sf -X POST "$URL/api/2.0/mlflow/runs/search" -H 'Content-Type: application/json' \
  -d '{"experiment_ids": ["1"], "max_results": 1}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["info"]["run_id"])')
shot() {  # PNG, window size, page: a fresh browser profile each, so no saved view choice applies
  rm -rf "$WORK/profile"
  chromium --headless --no-sandbox --disable-gpu --user-data-dir="$WORK/profile" --hide-scrollbars \
    --window-size="$2" --virtual-time-budget=15000 --screenshot="$1" "$URL/#/experiments/1/$3" > /dev/null 2>&1
}
shot docs/mlflow-run.png 1400,2300 "runs/$RUN?workflowType=machine_learning"
shot docs/mlflow-runs-table.png 1900,420 "runs?workflowType=machine_learning"
echo "run $RUN; pictures in docs/, server log and run outputs in $WORK"
