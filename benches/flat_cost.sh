#!/usr/bin/env bash
# flat_cost.sh: does a request cost the same with 1,000 servers or 10,000 routes as with
# 1 server and 10 routes? Runs the same HTTP/1.1 keep-alive load (wrk -t1 -c64) against
# swarmgate (one worker, pinned to CPU 0) with each of the three configs, interleaved for
# --rounds rounds, and prints requests/s, p99 and the proxy's CPU microseconds per
# request. An nginx backend listening on every loopback address (port 19090) and wrk share
# CPU 1. Needs nginx, wrk, curl, python3 (Debian packages) and a release build.
#
# With --peers nginx and HAProxy run the base and the 1,000-server loads beside swarmgate
# (same backend, same load, one worker each on CPU 0, one random draw per request over the
# servers, idle upstream connections kept): how much of the 1,000-server cost is the workload's
# (1,000 upstream sockets instead of a few) rather than swarmgate's.
#
# With --instr it counts instead the user-space instructions per request under valgrind's
# callgrind (wrk -t1 -c16: 4 s to warm up, 8 s counted; one run per config): repeatable
# within about 1% on a shared machine, where requests/s of the same config can swing 30%
# between rounds. Kernel work (syscalls, TCP) is not in that count.
#
# usage: benches/flat_cost.sh [--gateway PATH] [--rounds N] [--duration S] [--instr | --peers]
set -euo pipefail
GW=./target/release/swarmgate ROUNDS=3 DURATION=5 INSTR=0 PEERS=0
while [ $# -gt 0 ]; do
    case $1 in
        --gateway) GW=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --instr) INSTR=1; shift ;;
        --peers) PEERS=1; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ -x "$GW" ] || { echo "no swarmgate binary at $GW: run cargo build --release" >&2; exit 1; }
[ "$INSTR$PEERS" != 11 ] || { echo "--instr and --peers do not go together" >&2; exit 2; }
# 1,000 servers take over 1,100 descriptors (nginx without a master process keeps the limit it got)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
for t in nginx wrk curl python3 taskset $([ "$INSTR" = 1 ] && echo valgrind callgrind_control) \
         $([ "$PEERS" = 1 ] && echo haproxy); do
    command -v "$t" >/dev/null ||
        { echo "missing $t: apt-get install -y nginx haproxy wrk curl python3 util-linux valgrind" >&2; exit 1; }
done
TMP=$(mktemp -d /tmp/flat-cost.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

cat > "$TMP/backend.conf" <<NGX
worker_processes 1;
daemon off;
pid $TMP/backend.pid;
error_log $TMP/backend.err warn;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    client_body_temp_path $TMP; proxy_temp_path $TMP; fastcgi_temp_path $TMP;
    uwsgi_temp_path $TMP; scgi_temp_path $TMP;
    server { listen 19090 backlog=4096; location / { return 200 "hello, world\n"; } }
}
NGX

python3 - "$TMP" <<'PY'
import sys
tmp = sys.argv[1]
head = """[listen]
http = "127.0.0.1:19421"
https = ""
admin = "127.0.0.1:19423"
[runtime]
workers = 1
[proxy]
redirect_https = false
shutdown_delay = "0s"
drain_timeout = "1s"
"""
def routes(n, hosts):
    out = []
    for i in range(n - 1):
        out += ['[[route]]', f'host = "svc{i % hosts}.sandbox.example.org"', f'path = "/api/v{i % 3}/r{i // hosts}"', 'upstream = "b"']
    out += ['[[route]]', 'host = "localhost"', 'path = "/"', 'upstream = "b"']
    return "\n".join(out) + "\n"
def servers(n):
    addrs = [f'"127.0.{(i + 1) // 250}.{(i + 1) % 250 + 1}:19090"' for i in range(n)]
    return "[upstream.b]\nservers = [" + ", ".join(addrs) + "]\n"
open(f"{tmp}/base.toml", "w").write(head + routes(10, 1) + servers(1))
open(f"{tmp}/servers1000.toml", "w").write(head + routes(10, 1) + servers(1000))
open(f"{tmp}/routes10k.toml", "w").write(head + routes(10000, 1000) + servers(1))

# the peers: the same servers, picked at random, idle connections kept
ngx = """worker_processes 1;
master_process off;
daemon off;
worker_rlimit_nofile 65536;
pid {tmp}/nginx-{name}.pid;
error_log {tmp}/nginx-{name}.err warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    upstream b {{
        random;
{servers}
        keepalive 1024;
        keepalive_requests 1000000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:19431 backlog=4096;
        location / {{
            proxy_pass http://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
"""
hap = """global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
frontend fe
    bind 127.0.0.1:19441
    http-request set-header X-Forwarded-For %[src]
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend be
backend be
    balance random(1)
    http-reuse always
{servers}
"""
def addrs(n):
    return [f"127.0.{(i + 1) // 250}.{(i + 1) % 250 + 1}:19090" for i in range(n)]
for name, n in (("base", 1), ("servers1000", 1000)):
    open(f"{tmp}/nginx-{name}.conf", "w").write(ngx.format(
        tmp=tmp, name=name, servers="\n".join(f"        server {a};" for a in addrs(n))))
    open(f"{tmp}/haproxy-{name}.cfg", "w").write(hap.format(
        servers="\n".join(f"    server s{i} {a}" for i, a in enumerate(addrs(n)))))
PY

taskset -c 1 nginx -c "$TMP/backend.conf" & PIDS+=($!)
sleep 0.5
kill -0 "${PIDS[0]}" 2>/dev/null || { echo "the backend nginx did not start (port 19090 in use?)" >&2; exit 1; }
if [ "$INSTR" = 1 ]; then
    printf '%-12s %9s %14s %10s\n' config requests instructions instr/req
    for cfg in base servers1000 routes10k; do
        SWARMGATE_LOG=warn taskset -c 0 valgrind --tool=callgrind --instr-atstart=no \
            --callgrind-out-file="$TMP/cg.$cfg.%p" "$GW" --config "$TMP/$cfg.toml" 2>"$TMP/cg.$cfg.log" & pid=$!
        for _ in $(seq 300); do curl -s -o /dev/null http://127.0.0.1:19423/readyz && break; sleep 0.1; done
        taskset -c 1 wrk -t1 -c16 -d4s http://localhost:19421/ >/dev/null
        callgrind_control -i on "$pid" >/dev/null 2>&1
        n=$(taskset -c 1 wrk -t1 -c16 -d8s http://localhost:19421/ | awk '/requests in/ {print $1}')
        callgrind_control -i off "$pid" >/dev/null 2>&1
        callgrind_control -d "$pid" >/dev/null 2>&1
        kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
        total=$(cat "$TMP"/cg."$cfg".* 2>/dev/null | awk '/^totals:/ {s += $2} END {print s + 0}')
        printf '%-12s %9s %14s %10s\n' "$cfg" "$n" "$total" "$((total / n))"
    done
    exit 0
fi
# measure NAME CONFIG PORT: requests/s, p99 and CPU per request of the proxy started as $pid
measure() {
    local name=$1 cfg=$2 port=$3 t0 t1 out rps p99 tck us
    for _ in $(seq 50); do curl -s -o /dev/null "http://localhost:$port/" && break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null || { echo "$name did not start" >&2; exit 1; }
    taskset -c 1 wrk -t1 -c64 -d2s "http://localhost:$port/" >/dev/null
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    out=$(taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" --latency "http://localhost:$port/")
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '/ 99%/ {print $2}')
    tck=$(getconf CLK_TCK)
    us=$(awk -v a="$t0" -v b="$t1" -v r="$rps" -v d="$DURATION" -v t="$tck" 'BEGIN {printf "%.1f", (b - a) / t * 1e6 / (r * d)}')
    printf '%-6s %-10s %-12s %10s %9s %8s\n' "$round" "$name" "$cfg" "$rps" "$p99" "$us"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}
printf '%-6s %-10s %-12s %10s %9s %8s\n' round proxy config rps p99 us/req
for round in $(seq "$ROUNDS"); do
    for cfg in base servers1000 routes10k; do
        "$GW" check --config "$TMP/$cfg.toml" >/dev/null
        SWARMGATE_LOG=warn taskset -c 0 "$GW" --config "$TMP/$cfg.toml" & pid=$!
        measure swarmgate "$cfg" 19421
        [ "$PEERS" = 1 ] && [ "$cfg" != routes10k ] || continue
        taskset -c 0 nginx -c "$TMP/nginx-$cfg.conf" & pid=$! && PIDS+=("$pid")
        measure nginx "$cfg" 19431
        taskset -c 0 haproxy -db -f "$TMP/haproxy-$cfg.cfg" >"$TMP/haproxy-$cfg.log" 2>&1 & pid=$! && PIDS+=("$pid")
        measure haproxy "$cfg" 19441
    done
done
