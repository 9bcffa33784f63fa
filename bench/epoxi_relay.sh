#!/bin/sh
# Start command for ../shared/bench/relay_bench.py: Epoxi relaying everything from
# 127.0.0.1:$LISTEN_PORT to the sink on 127.0.0.1:$RELAY_PORT, spool in $BENCH_WORKDIR.
cd "$(dirname "$0")/.."
export EPOXI_SMTP_LISTEN="127.0.0.1:${LISTEN_PORT:-2525}"
export EPOXI_SMTP_RELAY=127.0.0.1
export EPOXI_SMTP_PORT="${RELAY_PORT:-2526}"
export EPOXI_DATA_DIR="${BENCH_WORKDIR:-/tmp/epoxi-bench}/epoxi"
export EPOXI_HOSTNAME=epoxi.bench
export EPOXI_LOG_LEVEL="${EPOXI_LOG_LEVEL:-warning}"
export EPOXI_HTTP_LISTEN="${EPOXI_HTTP_LISTEN:-127.0.0.1:2580}"
exec .venv/bin/epoxi serve
