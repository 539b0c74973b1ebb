#!/usr/bin/env bash
# reload.sh: how long does a SIGHUP reload of a 10,000-route config take? Starts each
# given swarmgate build (one worker, pinned to CPU 0) on a generated config (10,000 routes
# over 1,000 hosts and 10 upstreams, like benches/reload.rs), sends --reloads SIGHUPs
# 250 ms apart, and prints the median, p10 and p90 of the `took_ms` each reload logs
# (from the signal's handling to the swapped snapshot, on the control thread), with the
# user and system CPU the process spent. Several builds are run in interleaved rounds, so
# their ratio holds on a shared machine where the absolute figures drift.
#
# With --instr it counts instead the instructions of one reload under valgrind's callgrind
# (from the signal to the swapped snapshot; repeatable within about 1%).
#
# usage: benches/reload.sh [--rounds N] [--reloads N] [--instr] [BINARY...]
#        (default binary: ./target/release/swarmgate)
set -euo pipefail
ROUNDS=3 RELOADS=30 INSTR=0 BINS=()
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=${2:?--rounds N}; shift 2 ;;
        --reloads) RELOADS=${2:?--reloads N}; shift 2 ;;
        --instr) INSTR=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) BINS+=("$1"); shift ;;
    esac
done
[ "$RELOADS" -ge 1 ] || { echo "--reloads must be at least 1" >&2; exit 2; }
[ ${#BINS[@]} -gt 0 ] || BINS=(./target/release/swarmgate)
for b in "${BINS[@]}"; do
    [ -x "$b" ] || { echo "no swarmgate binary at $b: run cargo build --release" >&2; exit 1; }
done
for t in python3 taskset $([ "$INSTR" = 1 ] && echo valgrind callgrind_control callgrind_annotate); do
    command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y python3 util-linux valgrind" >&2; exit 1; }
done
TMP=$(mktemp -d /tmp/swarmgate-reload.XXXXXX)
PID=
cleanup() {
    if [ -n "$PID" ]; then kill -9 "$PID" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 - "$TMP/big.toml" "$PORT" <<'PY'
import sys
routes, hosts = 10000, 1000
out = [f'[listen]\nhttp = "127.0.0.1:{sys.argv[2]}"\nhttps = ""\nadmin = ""\n[runtime]\nworkers = 1\n']
for i in range(routes):
    out.append(f'[[route]]\nhost = "svc{i % hosts}.sandbox.example.org"\npath = "/api/v{i % 3}/r{i // hosts}"\nupstream = "u{i % 10}"\n')
for u in range(10):
    out.append(f'[upstream.u{u}]\nservers = ["10.0.0.{u + 1}:8080", "10.0.1.{u + 1}:8080"]\n')
open(sys.argv[1], "w").write("".join(out))
PY

# The caller's SWARMGATE_* variables would override the config or the log format.
unset $(env | sed -n 's/^\(SWARMGATE_[A-Z0-9_]*\)=.*/\1/p')
die() { echo "$*" >&2; exit 1; }

# Starts BINARY (optionally under a wrapper) and waits until it serves.
start() {
    local log=$1; shift
    SWARMGATE_LOG=info "$@" --config "$TMP/big.toml" 2>"$log" &
    PID=$!
    for _ in $(seq 1 600); do
        grep -q "swarmgate is serving" "$log" && return 0
        kill -0 "$PID" 2>/dev/null || die "swarmgate exited: $(tail -5 "$log")"
        sleep 0.1
    done
    die "swarmgate did not start; log: $log"
}
stop() { kill -9 "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; }

if [ "$INSTR" = 1 ]; then
    for b in "${BINS[@]}"; do
        start "$TMP/cg.log" taskset -c 0 valgrind --tool=callgrind --instr-atstart=no \
            --callgrind-out-file="$TMP/cg.%p" "$b"
        callgrind_control -i on "$PID" >/dev/null 2>&1 || die "callgrind_control -i on failed"
        kill -HUP "$PID"
        for _ in $(seq 1 600); do grep -q "configuration reloaded" "$TMP/cg.log" && break; sleep 0.1; done
        grep -q "configuration reloaded" "$TMP/cg.log" || die "$b: no reload within 60 s: $(tail -3 "$TMP/cg.log")"
        callgrind_control -i off "$PID" >/dev/null 2>&1 || die "callgrind_control -i off failed"
        callgrind_control -d "$PID" >/dev/null 2>&1 || die "callgrind_control -d failed"
        total=$(callgrind_annotate "$TMP"/cg.*.1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
        [ -n "$total" ] || die "$b: no callgrind count"
        printf '%-40s %12s instructions for one reload\n' "$b" "$total"
        stop
        rm -f "$TMP"/cg.*
    done
    exit 0
fi

# ticks of user and system CPU of a process
cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }
printf '%-40s %5s %8s %8s %8s %10s\n' binary round median p10 p90 "cpu ms/rl"
for r in $(seq 1 "$ROUNDS"); do
    for b in "${BINS[@]}"; do
        start "$TMP/run.log" taskset -c 0 "$b"
        read -r u0 s0 < <(cpu "$PID")
        for _ in $(seq 1 "$RELOADS"); do
            kill -HUP "$PID" 2>/dev/null || die "$b exited during the reloads: $(tail -5 "$TMP/run.log")"
            sleep 0.25
        done
        read -r u1 s1 < <(cpu "$PID")
        stop
        done_n=$(grep -c 'took_ms=' "$TMP/run.log" || true)
        [ "$done_n" = "$RELOADS" ] ||
            die "$b: $done_n of $RELOADS reloads logged (a signal coalesced or a reload refused): $(grep -m3 -i 'reload' "$TMP/run.log")"
        hz=$(getconf CLK_TCK)
        # CPU: the whole process over the reloads' window, per reload.
        grep -o 'took_ms=[0-9.]*' "$TMP/run.log" | cut -d= -f2 | sort -n | awk -v b="$b" -v r="$r" \
            -v cpu="$(( (u1 - u0 + s1 - s0) * 1000 / hz / RELOADS ))" \
            '{a[NR] = $1} END {
                printf "%-40s %5d %8.1f %8.1f %8.1f %10d\n", b, r, a[int((NR + 1) / 2)], a[int(NR * 0.1) + 1], a[NR - int(NR * 0.1)], cpu
            }'
    done
done
