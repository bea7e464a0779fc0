#!/usr/bin/env bash
# Regenerates docs/results.md, docs/results/*.json and the figures from scratch:
#   bash scripts/report.sh [--limit N] [--max-new-tokens M] [--quick] [--install-peers] ...
# (arguments go to `python -m eval.report`; see `python -m eval.report --help`).
# Runs niced: the machine is usually shared. Set REPORT_SKIP_SETUP=1 to skip scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${REPORT_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
. .venv/bin/activate
exec nice -n "${REPORT_NICE:-10}" python -m eval.report "$@"
