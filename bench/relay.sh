#!/bin/sh
# Epoxi against Postfix, side by side on this machine, with the yardstick in ../shared/bench:
#   bench/relay.sh [compare|run|killtest] [N] [REPEAT]
# smtp-source -> MTA on 127.0.0.1:2525 -> smtp-sink on :2526, 5 KB, 20 sessions. Prints both
# rates and ratio_candidate_over_postfix (compare), Epoxi's rate and delivered (run), or
# acked_lost (killtest). The test suite's relay smoke test (tests/e2e/test_relay.py) needs
# none of this: it brings its own injector and sink. Installs Postfix
# (for smtp-source, smtp-sink and Postfix itself) from Debian's packages when it is missing.
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
case "$MODE" in
    compare) exec "$YARDSTICK" compare --name epoxi --cmd "$PWD/bench/epoxi_relay.sh" -n "$N" --repeat "$REPEAT" ;;
    run) exec "$YARDSTICK" run --name epoxi --cmd "$PWD/bench/epoxi_relay.sh" -n "$N" ;;
    killtest) exec "$YARDSTICK" killtest --name epoxi --cmd "$PWD/bench/epoxi_relay.sh" -n "$N" ;;
    *) echo "usage: bench/relay.sh [compare|run|killtest] [N] [REPEAT]" >&2; exit 2 ;;
esac
