#!/bin/sh
# Start command for ../shared/bench/relay_bench.py (its --postfix-cmd): the yardstick's own
# Postfix instance (postfix_instance.sh, unchanged) with OpenDKIM as its milter, signing every
# message for example.com (the yardstick's From: domain), selector "bench", relaxed/relaxed.
#
#   bench/postfix_opendkim.sh [rsa|ed25519]          # set up and run in the foreground
#   bench/postfix_opendkim.sh [rsa|ed25519] --stop   # stop both (when not run by the yardstick)
#
# Everything lives in $BENCH_WORKDIR: postfix/ (postfix_instance.sh's) and opendkim/ (config,
# key, socket, pid). Only main.cf gains smtpd_milters and milter_default_action = tempfail (a
# milter that fails makes Postfix answer 4xx: no message goes out unsigned). OpenDKIM runs in the
# foreground as a child of this script, so the yardstick finds it among the MTA's processes:
# its CPU counts on Postfix's side. The system opendkim (Debian's service) is never used.
# RequireSafeKeys is off because the key sits under /tmp, which other users can write.
set -eu
ALG=${1:-rsa}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
INSTANCE=${EPOXI_POSTFIX_INSTANCE:-$ROOT/../shared/bench/postfix_instance.sh}
WORK=${BENCH_WORKDIR:-/tmp/postfix-opendkim}
PF=$WORK/postfix
OD=$WORK/opendkim
case "$ALG" in
    rsa) SIGN=rsa-sha256 ;;
    ed25519) SIGN=ed25519-sha256 ;;
    *) echo "usage: $0 [rsa|ed25519] [--stop]" >&2; exit 2 ;;
esac
if [ "${2:-}" = --stop ]; then
    postfix -c "$PF/etc" stop >/dev/null 2>&1 || true
    [ -f "$OD/opendkim.pid" ] && kill "$(cat "$OD/opendkim.pid")" 2>/dev/null || true
    exit 0
fi
mkdir -p "$OD"
if [ ! -f "$OD/key.pem" ]; then
    if [ "$ALG" = rsa ]; then
        set -- -algorithm RSA -pkeyopt rsa_keygen_bits:2048
    else
        set -- -algorithm ed25519
    fi
    (umask 077 && openssl genpkey "$@" -out "$OD/key.pem" 2>/dev/null)
fi
cat >"$OD/opendkim.conf" <<EOF
Mode s
Domain example.com
Selector bench
KeyFile $OD/key.pem
RequireSafeKeys false
SignatureAlgorithm $SIGN
Canonicalization relaxed/relaxed
InternalHosts 127.0.0.1
Socket local:$OD/milter.sock
UMask 000
PidFile $OD/opendkim.pid
TemporaryDirectory $OD
Syslog no
EOF
"$INSTANCE" --setup-only --dir "$PF"
postconf -c "$PF/etc" -e "smtpd_milters = unix:$OD/milter.sock" "milter_default_action = tempfail"
rm -f "$OD/milter.sock"
opendkim -f -x "$OD/opendkim.conf" &
tries=0
until [ -S "$OD/milter.sock" ]; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 $! 2>/dev/null; then
        echo "opendkim did not start (config $OD/opendkim.conf)" >&2
        exit 1
    fi
    sleep 0.1
done
exec "$INSTANCE" --dir "$PF"
