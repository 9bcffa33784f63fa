#!/bin/sh
# Epoxi against Postfix, side by side on this machine, with the yardstick in ../shared/bench:
#   bench/relay.sh [compare|run|killtest|ceiling|dkim-compare] [N] [REPEAT] [dkim-compare options]
# smtp-source -> MTA on 127.0.0.1:2525 -> smtp-sink on :2526, 5 KB, 20 sessions. compare runs
# the yardstick twice, Epoxi with --workers 1 and with EPOXI_BENCH_WORKERS (default auto: one
# per core), each alternating with Postfix: both rates, ratio_candidate_over_postfix and each
# MTA's CPU per message. run and killtest use EPOXI_WORKERS (default auto); killtest prints
# acked_lost. ceiling is smtp-source straight into smtp-sink, with the disk probe. dkim-compare
# (bench/dkim_compare.py) has both sides sign every message: Postfix with OpenDKIM as its milter
# (bench/postfix_opendkim.sh) against Epoxi (EPOXI_BENCH_WORKERS, default auto), RSA-2048 and
# Ed25519, REPEAT rounds of the four runs interleaved, after checking that each side's output
# carries a signature that verifies. The test suite's relay smoke test (tests/e2e/test_relay.py)
# needs none of this: it brings its own injector and sink. Installs Postfix (for smtp-source,
# smtp-sink and Postfix itself) and OpenDKIM from Debian's packages when they are missing.
set -eu
cd "$(dirname "$0")/.."
MODE=${1:-compare}
N=${2:-20000}
REPEAT=${3:-3}
./scripts/bootstrap test
YARDSTICK=${EPOXI_YARDSTICK:-../shared/bench/relay_bench.py}
if [ ! -x "$YARDSTICK" ]; then
    echo "no yardstick at $YARDSTICK; set EPOXI_YARDSTICK to relay_bench.py" >&2
    exit 1
fi
CMD="$PWD/bench/epoxi_relay.sh"
WORKERS=${EPOXI_BENCH_WORKERS:-auto}
case "$MODE" in
    compare)
        EPOXI_WORKERS=1 "$YARDSTICK" compare --name epoxi-workers-1 --cmd "$CMD" -n "$N" --repeat "$REPEAT"
        EPOXI_WORKERS=$WORKERS exec "$YARDSTICK" compare --name "epoxi-workers-$WORKERS" --cmd "$CMD" -n "$N" --repeat "$REPEAT" ;;
    run) EPOXI_WORKERS=${EPOXI_WORKERS:-auto} exec "$YARDSTICK" run --name epoxi --cmd "$CMD" -n "$N" ;;
    killtest) EPOXI_WORKERS=${EPOXI_WORKERS:-auto} exec "$YARDSTICK" killtest --name epoxi --cmd "$CMD" -n "$N" ;;
    ceiling) exec "$YARDSTICK" ceiling -n "$N" ;;
    dkim-compare)
        # Options after REPEAT go to bench/dkim_compare.py, e.g. --mta-port 2545 --sink-port 2546
        if [ $# -ge 3 ]; then shift 3; else set --; fi
        exec .venv/bin/python bench/dkim_compare.py --yardstick "$YARDSTICK" \
            --workers "$WORKERS" -n "$N" --rounds "$REPEAT" "$@" ;;
    *) echo "usage: bench/relay.sh [compare|run|killtest|ceiling|dkim-compare] [N] [REPEAT]" >&2; exit 2 ;;
esac
