#!/usr/bin/env bash
# Serving throughput, side by side: the same server with fixed trees and with `--tree auto`, each
# driven by cluster.loadtest (STREAMS concurrent streaming clients) once per strategy, `none` first.
# Every response is checked against the server's own `none` output (lossless_mismatches).
#
#   bash benchmarks/serving.sh [OUT.jsonl]        # env: STREAMS (8), REQUESTS (16), TOKENS (48),
#                                                 #      STRATEGIES ("none merged confidence single:lookup")
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${1:-runs/serving.jsonl}
STREAMS=${STREAMS:-8} REQUESTS=${REQUESTS:-16} TOKENS=${TOKENS:-48}
STRATEGIES=${STRATEGIES:-"none merged confidence single:lookup"}
PORT=${PORT:-8011}
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
for mode in fixed auto; do
  log=runs/serving_$mode.log
  taps serve --port "$PORT" --tree "$mode" --drafters "math=drafters/math,chat=drafters/chat,lookup" --threads 1 \
    > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do  # up to 10 min for Ray, the verifier and the drafter actors
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
    kill -0 $pid 2>/dev/null || { echo "server died, see $log" >&2; exit 1; }
    sleep 1
  done
  sleep 5
  for s in $STRATEGIES; do
    python -m cluster.loadtest --url "http://127.0.0.1:$PORT" --streams "$STREAMS" --requests "$REQUESTS" \
      --max-tokens "$TOKENS" --strategy "$s" | python -c "import json,sys; r=json.load(sys.stdin); r['tree']='$mode'; print(json.dumps(r))" \
      | tee -a "$OUT" || true
  done
  kill -INT $pid; wait $pid || true
done
python - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
none = {r["tree"]: r["tokens_per_s"] for r in rows if r["strategy"] == "none"}
print("| tree | strategy | tokens/s | x none (same server) | acceptance length | p50 s | mismatches |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    base = none.get(r["tree"])
    print(f"| {r['tree']} | {r['strategy']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} | "
          f"{r['acceptance_length']} | {r['p50_s']} | {r['lossless_mismatches']} |")
EOF
