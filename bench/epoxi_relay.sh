#!/bin/sh
# Start command for ../shared/bench/relay_bench.py: Epoxi relaying everything from
# 127.0.0.1:$LISTEN_PORT to the sink on 127.0.0.1:$RELAY_PORT, spool in $BENCH_WORKDIR.
# EPOXI_BENCH_DKIM=rsa or ed25519 signs every message (the yardstick's From: is @example.com),
# in EPOXI_BENCH_DKIM_THREADS signing threads a worker (default 2, as dkim.threads).
# EPOXI_BENCH_SHAPING=1 loads bench/shaping-bench.toml (a shaped route: see that file).
# EPOXI_BENCH_WEBHOOK=1 sends every event to a webhook receiver on 127.0.0.1:2581 (started
# here), registered through the API once Epoxi is up.
# EPOXI_BENCH_SINK=rabbitmq|nats|redis turns one broker sink on (below).
cd "$(dirname "$0")/.."
WORKDIR="${BENCH_WORKDIR:-/tmp/epoxi-bench}"
export EPOXI_SMTP_LISTEN="127.0.0.1:${LISTEN_PORT:-2525}"
export EPOXI_SMTP_RELAY=127.0.0.1
export EPOXI_SMTP_PORT="${RELAY_PORT:-2526}"
export EPOXI_DATA_DIR="$WORKDIR/epoxi"
export EPOXI_HOSTNAME=epoxi.bench
export EPOXI_LOG_LEVEL="${EPOXI_LOG_LEVEL:-warning}"
export EPOXI_HTTP_LISTEN="${EPOXI_HTTP_LISTEN:-127.0.0.1:2580}"
if [ -n "${EPOXI_BENCH_SHAPING:-}" ]; then
    export EPOXI_SHAPING_FILES="$PWD/bench/shaping-bench.toml"
fi
CONFIG="$WORKDIR/epoxi-bench.toml"
mkdir -p "$WORKDIR"
: >"$CONFIG"
if [ -n "${EPOXI_BENCH_DKIM:-}" ]; then
    KEY="$WORKDIR/dkim-$EPOXI_BENCH_DKIM.pem"
    [ -f "$KEY" ] || .venv/bin/epoxi dkim keygen --domain example.com --selector bench \
        --type "$EPOXI_BENCH_DKIM" --out "$KEY" >/dev/null
    printf '[dkim]\nthreads = %s\n[[dkim.keys]]\ndomain = "example.com"\nselector = "bench"\nkey_file = "%s"\n' \
        "${EPOXI_BENCH_DKIM_THREADS:-2}" "$KEY" >>"$CONFIG"
fi
# EPOXI_BENCH_SINK=rabbitmq|nats|redis: one broker sink with every event on (docs/events.md),
# to the machine's broker (./scripts/services starts them)
case "${EPOXI_BENCH_SINK:-}" in
    "") ;;
    rabbitmq) SINK_URL="amqp://guest:guest@127.0.0.1:5672/" ;;
    nats) SINK_URL="nats://127.0.0.1:4222" ;;
    redis) SINK_URL="redis://127.0.0.1:6379/0" ;;
    *) echo "EPOXI_BENCH_SINK is rabbitmq, nats or redis" >&2; exit 2 ;;
esac
if [ -n "${EPOXI_BENCH_SINK:-}" ]; then
    printf '[[events.sinks]]\nname = "bench"\nkind = "%s"\nurl = "%s"\n' \
        "$EPOXI_BENCH_SINK" "$SINK_URL" >>"$CONFIG"
fi
if [ -n "${EPOXI_BENCH_WEBHOOK:-}" ]; then
    .venv/bin/python -m epoxi.testing.receiver 2581 &
    .venv/bin/epoxi serve -c "$CONFIG" &
    SERVE=$!
    trap 'kill $SERVE 2>/dev/null; wait $SERVE' TERM INT
    until .venv/bin/epoxi webhooks add http://127.0.0.1:2581/hooks \
        --url "http://$EPOXI_HTTP_LISTEN" >/dev/null 2>&1; do sleep 0.1; done
    wait $SERVE
    exit $?
fi
exec .venv/bin/epoxi serve -c "$CONFIG"
