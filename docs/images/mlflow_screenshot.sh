#!/usr/bin/env bash
# Makes docs/images/mlflow-run.png: a tiny pretraining logged to a real `mlflow server`, its run
# "Model metrics" page captured by headless Chromium (its charts need the long virtual time
# budget). Run from the repository root (starts a local Ray; needs chromium):
#   bash docs/images/mlflow_screenshot.sh
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=docs/images/mlflow-run.png
WORK=$(mktemp -d /tmp/mplug-shot-XXXX)
PORT=${PORT:-5123}

"$BIN/mplug" synth --output "$WORK/raw" --num 300 --image-size 64
"$BIN/mplug" ingest --input "$WORK/raw/train" --format parquet --output "$WORK/processed" \
    --image-size 64 --min-image-size 32

setsid "$BIN/mlflow" server --backend-store-uri "sqlite:///$WORK/mlflow.db" \
    --default-artifact-root "$WORK/artifacts" --host 127.0.0.1 --port "$PORT" --workers 1 \
    >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill -- -$SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 0.5; done

export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT
"$BIN/mplug" pretrain --config pretrain_tiny --data "$WORK/processed" --storage "$WORK/runs" \
    --name tiny --max-steps 60 --batch-size 8 --num-workers 1 --tracking mlflow \
    --set run.log_every=2 --set optim.warmup_steps=5

IDS=$("$BIN/python" - <<'EOF'
from mlflow.tracking import MlflowClient

client = MlflowClient()
experiment = client.get_experiment_by_name("tiny").experiment_id
(run,) = client.search_runs([experiment])
print(experiment, run.info.run_id)
EOF
)
read -r EXPERIMENT RUN <<<"$IDS"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1440,1000 \
    --virtual-time-budget=90000 --run-all-compositor-stages-before-draw --screenshot="$OUT" \
    "http://127.0.0.1:$PORT/#/experiments/$EXPERIMENT/runs/$RUN/model-metrics"
echo "wrote $OUT (run $RUN; work folder $WORK)"
