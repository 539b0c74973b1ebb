#!/usr/bin/env bash
# load.sh: swarmgate next to nginx and HAProxy as a reverse proxy, one command, loopback only.
#
#   cargo build --release && benches/load.sh                    # about 6 minutes
#   benches/load.sh --rounds 1 --duration 3                     # a quick look
#   benches/load.sh --only nginx,swarmgate --scenarios h1,tls
#   benches/load.sh --scenarios instr                           # instructions/request, 1.5 minutes
#
# Options (defaults in brackets):
#   --gateway PATH     swarmgate binary [./target/release/swarmgate]; this script builds nothing
#   --scenarios LIST   h1,h1-16k,tls,tls-new,h2,mem [all six]; instr (slow) runs only when listed
#   --only LIST        contenders among nginx,haproxy,swarmgate [all three]
#   --rounds N         rounds of every scenario [3]
#   --duration S       seconds measured per run, after a 1 s warm-up [5]
#   --mem-conns N      idle connections in the mem scenario [5000]
#   --tls-rate N       new TLS connections per second offered in tls-new, a multiple of 500 [1500]
#   --keep-tmp         keep the work dir (configs, logs, raw tool outputs, callgrind files)
#
# Needs a Linux machine with 2+ cores, nginx, haproxy, wrk, h2load (nghttp2-client), openssl,
# curl, python3, and valgrind for instr; run as root on Debian/Ubuntu it installs what is
# missing (no service is started). Nothing listens outside 127.0.0.1; ports 19080 (backend),
# 1918x (nginx), 1928x (haproxy), 1938x (swarmgate). Every process it starts is stopped on
# exit, Ctrl-C included.
#
# Method: each proxy is pinned to the first allowed CPU with one worker (nginx
# worker_processes 1, haproxy nbthread 1, SWARMGATE_RUNTIME_WORKERS=1); an nginx backend
# (1 worker: 13 B at /, 16 KiB at /16k) and the load generator share the second CPU. All
# proxies terminate TLS 1.3 only, with the same self-signed RSA-2048 certificate, set
# X-Forwarded-For/-Proto/-Host and keep their upstream connections alive; each is checked
# through HTTP, HTTPS and HTTP/2 before anything is measured. Contenders run interleaved
# (round 1: A B C, round 2: B C A, ...), so drift on a shared machine hits them alike.
#   h1       HTTP/1.1 keep-alive, 13 B body        wrk -t1 -c64
#   h1-16k   same with a 16 KiB body               wrk -t1 -c64
#   tls      HTTPS keep-alive, TLS 1.3, 13 B       wrk -t1 -c64
#   tls-new  a new connection and a full TLS 1.3 handshake per request (13 B), offered at a
#            fixed rate (--tls-rate) whatever the answers' speed: h2load -t1 --h1 -r, one
#            request per connection (an open loop: a closed loop such as wrk -c32 with
#            "Connection: close" reports the latency of a load generator as busy as the proxy
#            is fast); us/req is then the proxy's CPU per handshake and request
#   h2       HTTP/2 over TLS 1.3, 13 B             h2load -t1 -c16 -m8
#   mem      a freshly started proxy's RSS growth with N idle keep-alive HTTP/1.1
#            connections (one request answered on each, then 2.5 s idle), in KiB per
#            connection
#   instr    user-space CPU instructions per request, counted by valgrind's callgrind, for
#            HTTP/1.1 keep-alive on / (13 B) and on /16k with wrk -t1 -c16, on / again with
#            the eight fields an API client sends beside Host (User-Agent, Accept, Authorization,
#            Cookie...; wrk's own request carries Host alone), and HTTP/2 over TLS as in h2
#            (h2load -c16 -m8); not in the default list, as it takes about 3.5 minutes for
#            three contenders
#
# instr is the number to watch on a shared machine, where requests/s and CPU time move
# with the neighbours: the same build on the same config counts the same within about 1%
# whatever else runs. It runs once per contender and path (not per round), on the h1
# configs: a fresh proxy, pinned, under valgrind --tool=callgrind --instr-atstart=no (nginx
# with master_process off, so one process; haproxy with maxconn 1024, as valgrind keeps it
# from raising its fd limit), 2 s of load to warm up, then callgrind_control -i on, 8 s of
# load, -i off, -d to dump, and a stop. instr/req is the sum of the dumps' totals: lines
# over the requests the load generator completed. It counts the proxy process's own
# user-space instructions, all threads and libraries included, and nothing the kernel does
# for it (syscalls, TCP, copies to and from sockets): for syscalls per request use strace -c
# -f -p PID. Under valgrind a proxy runs 20 to 30 times slower, so 4,000 to 20,000 requests
# are counted and the set-up of its 16 connections is in the count. For h2 it is not: that
# is 16 full TLS handshakes (about 10 M instructions each, RSA 2048 signing), so a second
# counted run, h2load -c16 -n16 (the set-up and 16 requests), is taken off the first, its
# requests too. Another callgrind_control run without a pid on the same machine would
# switch this one's counting too.
#
# Reading the table: rps is the median over rounds (min..max beside it); p50/p99 are the
# medians of the load generator's latency percentiles; /nginx and /hapx divide a contender's
# rps by nginx's / haproxy's in the same round, median over rounds; pxCPU% is the proxy's CPU
# (utime+stime of its processes over the run, 100 = one core) and us/req that CPU per
# request: its efficiency even when the load side, not the proxy, limits rps. cpu1% is how
# busy the load CPU was (near 100: the load side may be the limit), other% the share of the
# proxy's CPU that something else used (other processes, interrupts: a noisy run). upc
# counts upstream connections the backend accepted in the middle 60% of the run (0 =
# keep-alive works), err failed or non-2xx requests. The memory table gives the RSS of a
# fresh proxy (all its processes) before, with the idle connections held, and 1 s after
# closing them; "dropped" counts connections the proxy closed while they idled. The
# instructions table gives instr/req per path, and /nginx and /hapx as its ratio to
# nginx's / haproxy's (lower is better there); with --keep-tmp, read where they go with
# callgrind_annotate --inclusive=yes on a cg.CONTENDER.SCENARIO.PID.1 file.
set -euo pipefail

GATEWAY=./target/release/swarmgate
SCENARIOS=h1,h1-16k,tls,tls-new,h2,mem
ONLY=nginx,haproxy,swarmgate
ROUNDS=3
DURATION=5
WARMUP=1
MEM_CONNS=5000
TLS_RATE=1500
INSTR_WARMUP=2   # instr: seconds of wrk before callgrind counts,
INSTR_DURATION=8 # and seconds counted
# instr's / +8 fields: what an API client of the platform sends beside Host.
CLIENT_FIELDS=(
    -H 'User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36'
    -H 'Accept: application/fhir+json, application/json;q=0.9, */*;q=0.8'
    -H 'Accept-Language: en-US,en;q=0.9'
    -H 'Accept-Encoding: gzip, deflate, br'
    -H 'Authorization: Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJwcmFjdGl0aW9uZXItNDIiLCJzY29wZSI6InVzZXIvKi5yZWFkIG9wZW5pZCBmaGlyVXNlciIsImV4cCI6MTc5NTc0NDAwMH0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbi1pc3N1ZWQtYnktdGhlLWF1dGgtc2VydmVy'
    -H 'Cookie: sandbox_session=4f9c2a7e1b8d4e6f9a0b3c5d7e9f1a2b; _ga=GA1.2.1234567890.1700000000'
    -H 'Sec-Fetch-Mode: cors'
    -H 'Cache-Control: no-cache'
)
KEEP_TMP=0

die() { echo "load.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --gateway) GATEWAY=${2:?}; shift 2 ;;
        --scenarios) SCENARIOS=${2:?}; shift 2 ;;
        --only) ONLY=${2:?}; shift 2 ;;
        --rounds) ROUNDS=${2:?}; shift 2 ;;
        --duration) DURATION=${2:?}; shift 2 ;;
        --mem-conns) MEM_CONNS=${2:?}; shift 2 ;;
        --tls-rate) TLS_RATE=${2:?}; shift 2 ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
for n in ROUNDS DURATION MEM_CONNS TLS_RATE; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "--${n,,} wants a positive integer, got '${!n}'"
done
((TLS_RATE % 500 == 0)) || die "--tls-rate wants a multiple of 500 (connections are opened every 2 ms), got $TLS_RATE"
IFS=, read -r -a SCEN <<<"$SCENARIOS"
IFS=, read -r -a CONT <<<"$ONLY"
for s in "${SCEN[@]}"; do
    [[ $s =~ ^(h1|h1-16k|tls|tls-new|h2|mem|instr)$ ]] || die "unknown scenario '$s' (h1,h1-16k,tls,tls-new,h2,mem,instr)"
done
for c in "${CONT[@]}"; do
    [[ $c =~ ^(nginx|haproxy|swarmgate)$ ]] || die "unknown contender '$c' (nginx,haproxy,swarmgate)"
done
has() { local x=$1; shift; local y; for y in "$@"; do [[ $x == "$y" ]] && return 0; done; return 1; }

# ------------------------------------------------------------------ CPUs, tools, binary
# The first two CPUs this process may run on: proxy on the first, backend + load on the other.
mapfile -t CPUS < <(awk '/^Cpus_allowed_list:/{print $2}' /proc/self/status | tr ',' '\n' |
    awk -F- '{ if (NF == 2) for (i = $1; i <= $2; i++) print i; else print $1 }')
[[ ${#CPUS[@]} -ge 2 ]] || die "needs at least 2 CPUs, this process may use: ${CPUS[*]:-?}"
CPU_PROXY=${CPUS[0]}
CPU_LOAD=${CPUS[1]}

need_tools() { # prints "command package" for every missing tool
    local -a want=("nginx nginx" "curl curl" "openssl openssl" "python3 python3"
        "taskset util-linux" "ps procps")
    has haproxy "${CONT[@]}" && want+=("haproxy haproxy")
    if has h1 "${SCEN[@]}" || has h1-16k "${SCEN[@]}" || has tls "${SCEN[@]}" || has instr "${SCEN[@]}"; then
        want+=("wrk wrk")
    fi
    if has h2 "${SCEN[@]}" || has tls-new "${SCEN[@]}"; then want+=("h2load nghttp2-client"); fi
    has instr "${SCEN[@]}" && want+=("valgrind valgrind" "callgrind_control valgrind")
    local w
    for w in "${want[@]}"; do
        command -v "${w% *}" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "${w% *}" >/dev/null 2>&1 ||
            echo "$w"
    done
}
export PATH=$PATH:/usr/sbin:/sbin # nginx and haproxy live in /usr/sbin
mapfile -t MISSING < <(need_tools)
if [[ ${#MISSING[@]} -gt 0 ]]; then
    mapfile -t PKGS < <(printf '%s\n' "${MISSING[@]}" | awk '{print $2}' | sort -u)
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "missing: ${MISSING[*]%% *}; install with: sudo apt-get install -y --no-install-recommends ${PKGS[*]}"
    fi
    echo "installing from Debian: ${PKGS[*]}" >&2
    created_policy=0 # keep package scripts from starting nginx/haproxy as system services
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && created_policy=1
    fi
    apt() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@"; }
    apt install -y -qq --no-install-recommends "${PKGS[@]}" >&2 ||
        { apt update -qq >&2 && apt install -y -qq --no-install-recommends "${PKGS[@]}" >&2; } ||
        { [[ $created_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d; die "apt-get install ${PKGS[*]} failed"; }
    [[ $created_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    mapfile -t MISSING < <(need_tools)
    [[ ${#MISSING[@]} -eq 0 ]] || die "still missing after install: ${MISSING[*]}"
fi

if has swarmgate "${CONT[@]}"; then
    [[ -x $GATEWAY ]] || die "no swarmgate binary at $GATEWAY: run cargo build --release (or pass --gateway PATH)"
    GATEWAY=$(cd "$(dirname "$GATEWAY")" && pwd)/$(basename "$GATEWAY")
fi
# The benchmark's own configuration must not be changed by the caller's environment.
while read -r v; do unset "$v"; done < <(compgen -e | awk '/^SWARMGATE_/')

# Room for the mem scenario's idle connections (client and proxy each hold one fd per conn).
NOFILE_WANT=$((2 * MEM_CONNS + 4096))
ulimit -n "$NOFILE_WANT" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=1048576
PROXY_MAXCONN=$((MEM_CONNS + 1024))
if has mem "${SCEN[@]}" && ((NOFILE < 2 * PROXY_MAXCONN + 100)); then
    die "open-file limit $NOFILE is too low for --mem-conns $MEM_CONNS: raise 'ulimit -n' or lower --mem-conns"
fi

# ------------------------------------------------------------------ ports, work dir, cleanup
P_BACKEND=19080
declare -A HTTP_PORT=([nginx]=19181 [haproxy]=19281 [swarmgate]=19381)
declare -A HTTPS_PORT=([nginx]=19182 [haproxy]=19282 [swarmgate]=19382)
P_SG_ADMIN=19383
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$P_BACKEND" "${HTTP_PORT[@]}" "${HTTPS_PORT[@]}" "$P_SG_ADMIN"; do
    ! port_busy "$p" || die "127.0.0.1:$p is already in use; is another load.sh running?"
done

TMP=$(mktemp -d /tmp/swarmgate-load.XXXXXX)
chmod 755 "$TMP" # nginx workers may run as nobody
declare -A STARTED=() # pid -> start time (/proc/PID/stat field 22): never signal a recycled pid
declare -A PID=()     # contender (or "backend") -> pid

start_time_of() { local s; read -r s <"/proc/$1/stat" 2>/dev/null || return 1; s=${s##*) }; read -r -a f <<<"$s"; echo "${f[19]}"; }
alive() { [[ -n ${STARTED[$1]:-} && "$(start_time_of "$1" 2>/dev/null)" == "${STARTED[$1]}" ]]; }
children() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }
launch() { # launch NAME LOGFILE CMD...: start in the background, remember the pid
    local name=$1 log=$2; shift 2
    "$@" >"$log" 2>&1 &
    local pid=$!
    STARTED[$pid]=$(start_time_of "$pid") || STARTED[$pid]=gone
    PID[$name]=$pid
}
stop() { # stop NAME [SECONDS]: TERM, then KILL after 3 s or SECONDS (and the children left behind)
    local name=$1 pid=${PID[$1]:-} i kids
    [[ -n $pid ]] || return 0
    if alive "$pid"; then
        kids=$(children "$pid")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < ${2:-3} * 10; i++)); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            # shellcheck disable=SC2086 # kids: a list of pids
            kill -KILL "$pid" $kids 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    unset "STARTED[$pid]" "PID[$name]"
}
cleanup() {
    local rc=$? name
    trap - EXIT INT TERM
    for name in "${!PID[@]}"; do stop "$name"; done
    if [[ $KEEP_TMP == 1 ]]; then echo "work dir kept: $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "load.sh: interrupted" >&2; exit 130' INT TERM

# ------------------------------------------------------------------ certificate, backend
mkdir -p "$TMP/certs" "$TMP/www"
CERT=$TMP/certs/localhost.crt
KEY=$TMP/certs/localhost.key
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 7 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$KEY" -out "$CERT" 2>"$TMP/openssl.log" ||
    die "openssl could not make the certificate: $(cat "$TMP/openssl.log")"
chmod 644 "$KEY" # throwaway key; haproxy and nginx workers may read it as another user
cat "$CERT" "$KEY" >"$TMP/certs/haproxy.pem"
head -c 16384 /dev/zero | tr '\0' x >"$TMP/www/16k"
chmod -R a+rX "$TMP/www" "$TMP/certs"

NGINX_VERSION=$(nginx -v 2>&1 | sed 's|.*nginx/||')
nginx_http2() { # listen-line suffix and directive for HTTP/2 (the syntax changed in 1.25.1)
    if [[ $(printf '%s\n' 1.25.1 "$NGINX_VERSION" | sort -V | head -1) == 1.25.1 ]]; then
        echo "|http2 on;"
    else
        echo " http2|"
    fi
}
nginx_common() { # prefix dir
    cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_processes 1;
worker_rlimit_nofile $((2 * PROXY_MAXCONN + 64));
events { worker_connections $((PROXY_MAXCONN + 512)); }
EOF
}
nginx_temps() { # prefix dir
    local t
    for t in client_body proxy fastcgi uwsgi scgi; do echo "    ${t}_temp_path $1/${t}_temp;"; done
}

mkdir -p "$TMP/backend"
{
    nginx_common "$TMP/backend"
    cat <<EOF
http {
    access_log off;
    default_type text/plain;
$(nginx_temps "$TMP/backend")
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$P_BACKEND backlog=4096;
        root $TMP/www;
        location = / { return 200 "Hello, world\n"; }
        location = /echo {
            return 200 "xff=\$http_x_forwarded_for proto=\$http_x_forwarded_proto host=\$http_x_forwarded_host\n";
        }
        location = /_status { stub_status; }
    }
}
EOF
} >"$TMP/backend/nginx.conf"

# ------------------------------------------------------------------ the contenders
write_nginx() {
    local d=$TMP/nginx h2
    h2=$(nginx_http2)
    mkdir -p "$d"
    {
        nginx_common "$d"
        cat <<EOF
http {
    access_log off;
$(nginx_temps "$d")
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    ssl_protocols TLSv1.3;
    ssl_certificate $CERT;
    ssl_certificate_key $KEY;
    # HTTP/2 requests carry :authority, not Host
    map \$http_host \$public_host { "" \$host:\$server_port; default \$http_host; }
    upstream backend {
        server 127.0.0.1:$P_BACKEND;
        keepalive 512;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:${HTTP_PORT[nginx]} backlog=4096;
        listen 127.0.0.1:${HTTPS_PORT[nginx]} ssl${h2%|*} backlog=4096;
        ${h2#*|}
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$public_host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$public_host;
        }
    }
}
EOF
    } >"$d/nginx.conf"
    nginx -t -q -p "$d/" -e "$d/error.log" -c "$d/nginx.conf" >"$d/test.log" 2>&1 ||
        die "nginx rejects its config: $(cat "$d/test.log")"
}
write_haproxy() { # write_haproxy [MAXCONN FILE]: PROXY_MAXCONN in haproxy.cfg by default
    local d=$TMP/haproxy maxconn=${1:-$PROXY_MAXCONN} cfg=$TMP/haproxy/${2:-haproxy.cfg}
    mkdir -p "$d"
    cat >"$cfg" <<EOF
global
    nbthread 1
    maxconn $maxconn
defaults
    mode http
    maxconn $maxconn
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
frontend proxy
    bind 127.0.0.1:${HTTP_PORT[haproxy]}
    bind 127.0.0.1:${HTTPS_PORT[haproxy]} ssl crt $TMP/certs/haproxy.pem alpn h2,http/1.1 ssl-min-ver TLSv1.3
    http-request set-header X-Forwarded-For %[src]
    http-request set-header X-Forwarded-Proto https if { ssl_fc }
    http-request set-header X-Forwarded-Proto http if !{ ssl_fc }
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend backend
backend backend
    http-reuse always
    server b1 127.0.0.1:$P_BACKEND
EOF
    haproxy -c -q -f "$cfg" >"$d/check.log" 2>&1 || die "haproxy rejects $cfg: $(cat "$d/check.log")"
}
write_swarmgate() {
    local d=$TMP/swarmgate
    mkdir -p "$d"
    cat >"$d/swarmgate.toml" <<EOF
[listen]
http = "127.0.0.1:${HTTP_PORT[swarmgate]}"
https = "127.0.0.1:${HTTPS_PORT[swarmgate]}"
admin = "127.0.0.1:$P_SG_ADMIN"

[proxy]
redirect_https = false
shutdown_delay = "0s"
drain_timeout = "1s"

[tls]
certs_dir = "$TMP/certs"
min_version = "1.3"

[[route]]
host = "localhost"
path = "/"
upstream = "backend"

[[route]]
host = "127.0.0.1"
path = "/"
upstream = "backend"

[upstream.backend]
servers = ["127.0.0.1:$P_BACKEND"]
EOF
    SWARMGATE_RUNTIME_WORKERS=1 "$GATEWAY" check --config "$d/swarmgate.toml" >"$d/check.log" 2>&1 ||
        die "swarmgate check rejects its config: $(cat "$d/check.log")"
}

start() { # start NAME [CALLGRIND_OUT]: launch pinned, wait until it answers
    # With CALLGRIND_OUT, a contender runs under callgrind (instrumentation off until switched
    # on), which writes CALLGRIND_OUT.PID[.PART] and logs to CALLGRIND_OUT.log.
    local name=$1 d=$TMP/$1 i code secs=10 log=$TMP/$1/stderr.log cfg=haproxy.cfg
    local -a vg=() single=()
    if [[ -n ${2:-} ]]; then
        vg=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$2.%p")
        log=$2.log secs=120
        single=(-g 'master_process off;') # nginx: one process, not a master and a worker as another user
        cfg=haproxy-valgrind.cfg          # haproxy: a maxconn that fits the fd limit valgrind leaves it
    fi
    case $name in
        backend) launch backend "$log" taskset -c "$CPU_LOAD" nginx -p "$d/" -e "$d/error.log" -c "$d/nginx.conf" ;;
        nginx) launch nginx "$log" taskset -c "$CPU_PROXY" "${vg[@]}" nginx "${single[@]}" -p "$d/" -e "$d/error.log" -c "$d/nginx.conf" ;;
        haproxy) launch haproxy "$log" taskset -c "$CPU_PROXY" "${vg[@]}" haproxy -db -f "$d/$cfg" ;;
        swarmgate)
            launch swarmgate "$log" env SWARMGATE_RUNTIME_WORKERS=1 SWARMGATE_LOG=warn \
                taskset -c "$CPU_PROXY" "${vg[@]}" "$GATEWAY" run --config "$d/swarmgate.toml"
            ;;
    esac
    local port=${HTTP_PORT[$name]:-$P_BACKEND}
    for ((i = 0; i < secs * 10; i++)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/" || true)
        [[ $code == 200 ]] && return 0
        alive "${PID[$name]}" || die "$name exited at start-up: $(tail -n 20 "$log" "$d/error.log" 2>/dev/null)"
        sleep 0.1
    done
    die "$name does not answer 200 on 127.0.0.1:$port after $secs s (last: $code): $(tail -n 20 "$log" 2>/dev/null)"
}

verify() { # verify NAME: status, body size, forwarding headers, TLS 1.3 only, our cert, h2
    local c=$1 hp=${HTTP_PORT[$1]} sp=${HTTPS_PORT[$1]} got want
    local -a tls=(--cacert "$CERT" --resolve "localhost:$sp:127.0.0.1")
    got=$(curl -sS --max-time 5 "http://127.0.0.1:$hp/echo" 2>&1) || true
    want="xff=127.0.0.1 proto=http host=127.0.0.1:$hp"
    [[ $got == "$want" ]] || die "$c over HTTP: backend saw '$got', want '$want'"
    got=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code} %{size_download}' "http://127.0.0.1:$hp/16k" 2>&1) || true
    [[ $got == "200 16384" ]] || die "$c: GET /16k gave '$got', want '200 16384'"
    got=$(curl -sS --max-time 5 --http1.1 "${tls[@]}" "https://localhost:$sp/echo" 2>&1) || true
    want="xff=127.0.0.1 proto=https host=localhost:$sp"
    [[ $got == "$want" ]] || die "$c over HTTPS (verified against the bench cert): backend saw '$got', want '$want'"
    got=$(curl -sS --max-time 5 --http2 "${tls[@]}" -w ' h%{http_version}' "https://localhost:$sp/echo" 2>&1) || true
    [[ $got == "$want"$'\n'" h2" ]] || die "$c over HTTP/2: got '$got', want '$want' over h2"
    if curl -s --max-time 5 -o /dev/null --tlsv1.2 --tls-max 1.2 "${tls[@]}" "https://localhost:$sp/"; then
        die "$c accepts TLS 1.2; the comparison is TLS 1.3 only"
    fi
}

# ------------------------------------------------------------------ measuring
CLK_TCK=$(getconf CLK_TCK)
tree() { echo "$1"; children "$1"; } # a proxy's processes: itself and its children (nginx workers)
cpu_ticks() { # utime+stime of the given pids, in clock ticks
    local t=0 p s
    for p in "$@"; do
        read -r s <"/proc/$p/stat" 2>/dev/null || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        t=$((t + f[11] + f[12]))
    done
    echo "$t"
}
cpu_stat() { # "busy total" ticks of CPU $1 from /proc/stat (busy: all but idle and iowait)
    awk -v c="cpu$1" '$1 == c { t = $2+$3+$4+$5+$6+$7+$8+$9; print t-$5-$6, t }' /proc/stat
}
backend_accepts() { curl -s --max-time 2 "http://127.0.0.1:$P_BACKEND/_status" | awk 'NR == 3 {print $1}'; }
now_ns() { date +%s%N; }

load_cmd() { # load_cmd SCENARIO CONTENDER SECONDS OUTFILE [CONNS]: sets LOAD_CMD, the load generator on CPU_LOAD
    local s=$1 c=$2 secs=$3 out=$4 conns=${5:-64} url log=/dev/null
    local -a extra=()
    case $s in
        h1) url=http://127.0.0.1:${HTTP_PORT[$c]}/ ;;
        h1-16k) url=http://127.0.0.1:${HTTP_PORT[$c]}/16k ;;
        tls) url=https://localhost:${HTTPS_PORT[$c]}/ ;;
    esac
    if [[ $s == h1-fields ]]; then
        url=http://127.0.0.1:${HTTP_PORT[$c]}/
        extra=("${CLIENT_FIELDS[@]}")
    fi
    [[ $out != /dev/null ]] && log=$out.requests # h2load: one line per request, latencies for p50/p99
    if [[ $s == h2 ]]; then
        LOAD_CMD=(taskset -c "$CPU_LOAD" h2load -t1 -c16 -m8 -D "$secs" --connect-to="127.0.0.1:${HTTPS_PORT[$c]}"
            --log-file="$log" "https://localhost:${HTTPS_PORT[$c]}/")
    elif [[ $s == tls-new ]]; then # -c: clients in all, each opened on time, one request, closed
        local n=$((TLS_RATE * secs))
        LOAD_CMD=(taskset -c "$CPU_LOAD" h2load -t1 --h1 -c"$n" -n"$n" -r$((TLS_RATE / 500)) --rate-period=2ms
            --connect-to="127.0.0.1:${HTTPS_PORT[$c]}" --log-file="$log" "https://localhost:${HTTPS_PORT[$c]}/")
    else
        LOAD_CMD=(taskset -c "$CPU_LOAD" wrk -t1 -c"$conns" -d"${secs}s" --latency "${extra[@]}" "$url")
    fi
}
parse_load() { # parse_load SCENARIO OUTFILE -> "rps requests p50ms p99ms errors"
    local s=$1 out=$2
    if [[ $s == h2 || $s == tls-new ]]; then
        local proto=h2
        [[ $s == tls-new ]] && proto=http/1.1
        grep -q "^Application protocol: $proto\$" "$out" || { echo "0 0 - - 1"; return; }
        local pct
        pct=$(awk -F'\t' '{print $3}' "$out.requests" 2>/dev/null | sort -n |
            awk '{v[NR] = $1} END { if (NR == 0) { print "- -"; exit }
                 i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
                 printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }')
        awk -v pct="$pct" '
            /^finished in/ { rps = $4 }
            /^requests:/ { ok = $8; bad = $10 + $14 }
            /^status codes:/ { bad += $5 + $7 + $9 }
            END { printf "%s %s %s %d\n", rps + 0, ok + 0, pct, bad }' "$out"
    else
        awk '
            function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0
                             if (v ~ /s$/) return v * 1000; if (v ~ /m$/) return v * 60000; return v }
            /^Requests\/sec:/ { rps = $2 }
            / requests in / { n = $1 }
            /^ +50%/ { p50 = ms($2) }
            /^ +99%/ { p99 = ms($2) }
            /^  Socket errors:/ { bad += $4 + $6 + $8 + $10 }
            /^  Non-2xx or 3xx responses:/ { bad += $5 }
            END { if (p50 == "") { p50 = "-"; p99 = "-" }
                  printf "%s %s %s %s %d\n", rps + 0, n + 0, p50, p99, bad }' "$out"
    fi
}

measure() { # measure SCENARIO ROUND CONTENDER: one warm-up, one measured run, one line of runs.tsv
    local s=$1 r=$2 c=$3 out=$TMP/raw/$1.$2.$3.txt
    local -a pids
    alive "${PID[$c]}" || die "$c is gone (crashed?) before $s round $r: $(tail -n 20 "$TMP/$c/stderr.log")"
    load_cmd "$s" "$c" "$WARMUP" /dev/null
    "${LOAD_CMD[@]}" >/dev/null 2>&1 || true
    mapfile -t pids < <(tree "${PID[$c]}")
    local acc0 acc1 t0 t1 p0 p1 s0 s1 rps n p50 p99 bad pxcpu usreq cpu1 other
    load_cmd "$s" "$c" "$DURATION" "$out"
    s0="$(cpu_stat "$CPU_PROXY") $(cpu_stat "$CPU_LOAD")"
    p0=$(cpu_ticks "${pids[@]}")
    t0=$(now_ns)
    launch load "$out" "${LOAD_CMD[@]}"
    # Upstream connections opened in the middle 60% of the run: the ends see clients connect
    # and abort in-flight requests, which closes upstream connections in some proxies.
    sleep "$(awk -v d="$DURATION" 'BEGIN { print d * 0.2 }')"
    acc0=$(backend_accepts)
    sleep "$(awk -v d="$DURATION" 'BEGIN { print d * 0.6 }')"
    acc1=$(backend_accepts)
    wait "${PID[load]}" || true
    t1=$(now_ns)
    p1=$(cpu_ticks "${pids[@]}")
    s1="$(cpu_stat "$CPU_PROXY") $(cpu_stat "$CPU_LOAD")"
    stop load
    alive "${PID[$c]}" || die "$c died during $s round $r: $(tail -n 20 "$TMP/$c/stderr.log")"
    read -r rps n p50 p99 bad <<<"$(parse_load "$s" "$out")"
    # pxCPU% us/req cpu1% other%
    read -r pxcpu usreq cpu1 other <<<"$(awk -v p="$((p1 - p0))" -v hz="$CLK_TCK" -v ns="$((t1 - t0))" -v n="$n" \
        -v a="$s0" -v b="$s1" 'BEGIN {
            split(a, x, " "); split(b, y, " ")
            px = p / hz / (ns / 1e9) * 100
            us = n > 0 ? p / hz * 1e6 / n : 0
            busy0 = y[1] - x[1]; tot0 = y[2] - x[2]; busy1 = y[3] - x[3]; tot1 = y[4] - x[4]
            cpu1 = tot1 > 0 ? busy1 / tot1 * 100 : 0
            other = tot0 > 0 ? (busy0 - p) / tot0 * 100 : 0
            if (other < 0) other = 0
            printf "%.1f %.2f %.1f %.1f\n", px, us, cpu1, other }')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$r" "$c" "$rps" "$p50" "$p99" \
        "$pxcpu" "$usreq" "$cpu1" "$other" "$((${acc1:-0} - ${acc0:-0} - 1))" "$bad" >>"$TMP/runs.tsv"
    printf '  %-7s round %d  %-9s %9.0f req/s  p99 %7s ms  proxy CPU %5s%%  other on its CPU %5s%%\n' \
        "$s" "$r" "$c" "$rps" "$p99" "$pxcpu" "$other" >&2
}

vg_control() { # vg_control CONTENDER ARGS...: callgrind_control ARGS on the contender's process only
    local c=$1 pid=${PID[$1]} out
    shift
    # Without a pid callgrind_control would address every callgrind run on the machine. It exits
    # 0 whatever happens; "OK." means it found the process and vgdb has returned.
    out=$(timeout 120 callgrind_control "$@" "$pid" 2>&1) || true
    echo "callgrind_control $* $pid: $out" >>"$TMP/callgrind/$c.control.log"
    [[ $out == *"OK."* ]] ||
        die "callgrind_control $* $pid failed for $c: $out (vgdb needs to ptrace the process: run as root?)"
}

totals() { # totals CALLGRIND_FILE...: the sum of their instruction totals (0 for none)
    awk '/^totals:/ { t += $2 } END { printf "%.0f\n", t }' /dev/null "$@"
}

measure_instr() { # measure_instr CONTENDER: instructions per request under callgrind: /, /16k, / +8 fields, h2
    local c=$1 s out pid n bad instr setup
    local -a dumps
    mkdir -p "$TMP/callgrind"
    for s in h1 h1-16k h1-fields h2; do
        stop "$c"
        out=$TMP/callgrind/cg.$c.$s
        start "$c" "$out"
        pid=${PID[$c]}
        load_cmd "$s" "$c" "$INSTR_WARMUP" /dev/null 16
        "${LOAD_CMD[@]}" >/dev/null 2>&1 || true
        load_cmd "$s" "$c" "$INSTR_DURATION" "$TMP/raw/instr.$s.$c.txt" 16
        vg_control "$c" -i on
        "${LOAD_CMD[@]}" >"$TMP/raw/instr.$s.$c.txt" 2>&1 || true
        vg_control "$c" -i off
        vg_control "$c" -d
        if [[ $s == h2 ]]; then
            # The connections' set-up alone (16 full TLS handshakes, one request each), counted
            # in a second dump and taken off the first: what is left is per request.
            vg_control "$c" -i on
            taskset -c "$CPU_LOAD" h2load -t1 -c16 -n16 --connect-to="127.0.0.1:${HTTPS_PORT[$c]}" \
                "https://localhost:${HTTPS_PORT[$c]}/" >"$TMP/raw/instr.h2-setup.$c.txt" 2>&1 || true
            vg_control "$c" -i off
            vg_control "$c" -d
            grep -q '^requests: 16 total, 16 started, 16 done, 16 succeeded' "$TMP/raw/instr.h2-setup.$c.txt" ||
                die "h2load -c16 -n16 against $c under callgrind: $(cat "$TMP/raw/instr.h2-setup.$c.txt")"
        fi
        alive "$pid" || die "$c died under callgrind: $(tail -n 20 "$out.log")"
        stop "$c" 30 # exiting, callgrind writes one more (empty: instrumentation is off) dump
        read -r _ n _ _ bad <<<"$(parse_load "$s" "$TMP/raw/instr.$s.$c.txt")"
        ((n > 0)) || die "the load generator got no answer from $c under callgrind: $(cat "$TMP/raw/instr.$s.$c.txt")"
        # One file per process and dump (.1: the counted run, .2: h2's set-up run).
        mapfile -t dumps < <(compgen -G "$out.*.1")
        instr=$(totals "${dumps[@]}")
        ((instr > 0)) || die "no instructions counted for $c: no totals in ${dumps[*]:-$out.*.1}"
        if [[ $s == h2 ]]; then
            mapfile -t dumps < <(compgen -G "$out.*.2")
            setup=$(totals "${dumps[@]}")
            ((setup > 0 && instr > setup && n > 16)) ||
                die "$c: h2 counted $instr instructions for $n requests and $setup for the set-up alone"
            instr=$((instr - setup)) n=$((n - 16))
        fi
        printf '%s\t%s\t%s\t%s\t%s\n' "$s" "$c" "$n" "$instr" "$bad" >>"$TMP/instr.tsv"
        printf '  instr   %-7s %-9s %9d requests  %14d instructions  %8.0f per request\n' \
            "$s" "$c" "$n" "$instr" "$(awk -v i="$instr" -v n="$n" 'BEGIN { print i / n }')" >&2
    done
    start "$c" # as it was, for the scenarios that follow
}

cat >"$TMP/idle_conns.py" <<'PY'
"""Open N keep-alive connections to 127.0.0.1:PORT, one answered GET on each, hold them,
and report the RSS (sum of VmRSS of PIDS) before, while held, and 1 s after closing."""
import resource, select, socket, sys, time

def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total

def get(sock, req):
    sock.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status, length = int(lines[0].split()[1]), 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    if status != 200:
        raise ConnectionError(f"status {status}")

port, n, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < n + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64 if hard == resource.RLIM_INFINITY else min(n + 64, hard), hard))
req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: load.sh\r\n\r\n" % port

warm = socket.create_connection(("127.0.0.1", port), timeout=10)
for _ in range(20):
    get(warm, req)
warm.close()
time.sleep(1)
before = rss_kib(pids)
socks, errors = [], {}
for _ in range(n):
    sock = None
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        get(sock, req)
        socks.append(sock)
    except (OSError, ValueError) as e:
        errors[repr(e)] = errors.get(repr(e), 0) + 1
        if sock is not None:
            sock.close()
        if sum(errors.values()) >= 100:
            break
# Idle long enough for swarmgate to park them (1 s) and its allocator to hand the freed
# pages back (1 s decay): the steady state of idle connections, not the burst of opening.
time.sleep(2.5)
held = rss_kib(pids)
poll = select.poll()
for sock in socks:
    poll.register(sock, select.POLLIN)
dropped = len(poll.poll(0))  # readable = closed by the proxy while idle
for sock in socks:
    sock.close()
time.sleep(1)
after = rss_kib(pids)
per = (held - before) / len(socks) if socks else 0.0
print(f"{len(socks)}\t{dropped}\t{before}\t{held}\t{after}\t{per:.2f}")
for e, k in errors.items():
    print(f"{k} x {e}", file=sys.stderr)
PY

measure_mem() { # measure_mem ROUND CONTENDER: on a fresh process
    local r=$1 c=$2 line
    local -a pids
    stop "$c"
    start "$c"
    mapfile -t pids < <(tree "${PID[$c]}")
    line=$(taskset -c "$CPU_LOAD" python3 "$TMP/idle_conns.py" "${HTTP_PORT[$c]}" "$MEM_CONNS" "${pids[@]}" \
        2>"$TMP/raw/mem.$r.$c.err") || die "mem helper failed against $c: $(cat "$TMP/raw/mem.$r.$c.err")"
    alive "${PID[$c]}" || die "$c died holding $MEM_CONNS connections: $(tail -n 20 "$TMP/$c/stderr.log")"
    printf '%s\t%s\t%s\n' "$r" "$c" "$line" >>"$TMP/mem.tsv"
    local open dropped per
    read -r open dropped _ _ _ per <<<"$line"
    printf '  mem     round %d  %-9s %d/%d conns open, %d dropped, %s KiB/conn\n' "$r" "$c" "$open" "$MEM_CONNS" "$dropped" "$per" >&2
    [[ -s $TMP/raw/mem.$r.$c.err ]] && sed 's/^/    /' "$TMP/raw/mem.$r.$c.err" >&2
    return 0
}

cat >"$TMP/summary.py" <<'PY'
import statistics, sys

runs_file, mem_file, scenarios, contenders, mem_conns, instr_file = sys.argv[1:7]
scenarios, contenders = scenarios.split(","), contenders.split(",")
med = statistics.median

def num(v):
    try:
        return float(v)
    except ValueError:
        return None

runs = []
try:
    with open(runs_file) as f:
        for line in f:
            s, r, c, rps, p50, p99, px, us, cpu1, other, upc, err = line.rstrip("\n").split("\t")
            runs.append(dict(s=s, r=int(r), c=c, rps=float(rps), p50=num(p50), p99=num(p99), px=float(px),
                             us=float(us), cpu1=float(cpu1), other=float(other), upc=int(upc), err=int(err)))
except FileNotFoundError:
    pass

def m(vals, fmt):
    vals = [v for v in vals if v is not None]
    return format(med(vals), fmt) if vals else "-"

def print_table(cols, rows, left=2, group=True):
    """Columns padded to their widest cell, the first `left` left-aligned; with `group`, a
    blank line where the first column changes."""
    w = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(v).ljust(w[i]) if i < left else str(v).rjust(w[i]) for i, v in enumerate(r))
    print(line(cols))
    for i, r in enumerate(rows):
        if group and i > 0 and r[0] != rows[i - 1][0]:
            print()
        print(line(r))

def ratio(rows, s, c, base):
    if c == base:
        return "-"
    by_round = {x["r"]: x["rps"] for x in rows if x["s"] == s and x["c"] == base}
    rs = [x["rps"] / by_round[x["r"]] for x in rows if x["s"] == s and x["c"] == c and by_round.get(x["r"])]
    return f"{med(rs):.2f}" if rs else "-"

cols = ["scenario", "contender", "rps", "min..max", "p50ms", "p99ms", "/nginx", "/hapx",
        "pxCPU%", "us/req", "cpu1%", "other%", "upc", "err"]
table = []
for s in scenarios:
    for c in contenders:
        rows = [x for x in runs if x["s"] == s and x["c"] == c]
        if not rows:
            continue
        rps = [x["rps"] for x in rows]
        table.append([s, c, f"{med(rps):.0f}", f"{min(rps):.0f}..{max(rps):.0f}",
                      m([x["p50"] for x in rows], ".2f"), m([x["p99"] for x in rows], ".2f"),
                      ratio(runs, s, c, "nginx"), ratio(runs, s, c, "haproxy"),
                      m([x["px"] for x in rows], ".0f"), m([x["us"] for x in rows], ".1f"),
                      m([x["cpu1"] for x in rows], ".0f"), f"{max(x['other'] for x in rows):.0f}",
                      str(max(x["upc"] for x in rows)), str(sum(x["err"] for x in rows))])
if table:
    print_table(cols, table)

mem = []
try:
    with open(mem_file) as f:
        for line in f:
            r, c, open_, dropped, before, held, after, per = line.rstrip("\n").split("\t")
            mem.append(dict(c=c, open=int(open_), dropped=int(dropped), before=int(before), held=int(held),
                            after=int(after), per=float(per)))
except FileNotFoundError:
    pass
if mem:
    if table:
        print()
    cols = ["memory", "open/asked", "dropped", "RSS before", f"with conns", "after close", "KiB/conn", "min..max"]
    out = []
    mib = lambda k: f"{k / 1024:.1f} MiB"
    for c in contenders:
        rows = [x for x in mem if x["c"] == c]
        if not rows:
            continue
        per = [x["per"] for x in rows]
        out.append([c, f"{min(x['open'] for x in rows)}/{mem_conns}", str(max(x["dropped"] for x in rows)),
                    mib(med(x["before"] for x in rows)), mib(med(x["held"] for x in rows)),
                    mib(med(x["after"] for x in rows)), f"{med(per):.2f}", f"{min(per):.2f}..{max(per):.2f}"])
    print_table(cols, out, left=1, group=False)

instr = {}
try:
    with open(instr_file) as f:
        for line in f:
            s, c, n, ir, err = line.rstrip("\n").split("\t")
            instr[s, c] = dict(n=int(n), ir=int(ir), err=int(err), per=int(ir) / int(n))
except FileNotFoundError:
    pass
if instr:
    if table or mem:
        print()
    paths = {"h1": "/", "h1-16k": "/16k", "h1-fields": "/ +8 fields", "h2": "h2 /"}
    cols = ["instructions", "path", "requests", "instr/req", "/nginx", "/hapx", "err"]
    out = []
    for c in contenders:
        for s in paths:
            x = instr.get((s, c))
            if x is None:
                continue
            rel = lambda base: f"{x['per'] / instr[s, base]['per']:.2f}" if base != c and (s, base) in instr else "-"
            out.append([c, paths[s], str(x["n"]), f"{x['per']:.0f}", rel("nginx"), rel("haproxy"), str(x["err"])])
    print_table(cols, out)
PY

# ------------------------------------------------------------------ go
mkdir -p "$TMP/raw"
has nginx "${CONT[@]}" && write_nginx
if has haproxy "${CONT[@]}"; then
    write_haproxy
    # Under valgrind haproxy cannot set its fd limit (valgrind keeps the top few fds and refuses
    # setrlimit): a maxconn whose fds fit in what it is given; instr uses 16 connections.
    has instr "${SCEN[@]}" && write_haproxy 1024 haproxy-valgrind.cfg
fi
has swarmgate "${CONT[@]}" && write_swarmgate
start backend
for c in "${CONT[@]}"; do
    start "$c"
    verify "$c"
done

{
    echo "load.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -sr), $(nproc) CPUs:$(awk -F: '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "  proxy on CPU $CPU_PROXY; backend nginx and load generator on CPU $CPU_LOAD; loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    for c in "${CONT[@]}"; do
        case $c in
            nginx) echo "  nginx      $NGINX_VERSION" ;;
            haproxy) echo "  haproxy    $(haproxy -v | awk 'NR == 1 {print $3}')" ;;
            swarmgate) echo "  swarmgate  $("$GATEWAY" --version | awk '{print $NF}')  ($GATEWAY)" ;;
        esac
    done
    echo "  scenarios $SCENARIOS; $ROUNDS round(s) of ${WARMUP} s warm-up + ${DURATION} s; all contenders checked (HTTP, HTTPS, h2, TLS 1.3 only, X-Forwarded-*)"
    if has instr "${SCEN[@]}"; then
        echo "  instr: once per contender and path under $(valgrind --version) callgrind, ${INSTR_WARMUP} s warm-up + ${INSTR_DURATION} s counted"
    fi
} >&2

for s in "${SCEN[@]}"; do
    if [[ $s == instr ]]; then # deterministic enough that one run per contender will do
        for c in "${CONT[@]}"; do measure_instr "$c"; done
        continue
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((i = 0; i < ${#CONT[@]}; i++)); do
            c=${CONT[$(((i + r - 1) % ${#CONT[@]}))]}
            if [[ $s == mem ]]; then measure_mem "$r" "$c"; else measure "$s" "$r" "$c"; fi
        done
    done
done

echo
python3 "$TMP/summary.py" "$TMP/runs.tsv" "$TMP/mem.tsv" "$SCENARIOS" "$ONLY" "$MEM_CONNS" "$TMP/instr.tsv"
if has instr "${SCEN[@]}"; then
    if [[ $KEEP_TMP == 1 ]]; then
        echo "callgrind files: $TMP/callgrind/cg.CONTENDER.{h1,h1-16k,h1-fields,h2}.PID.1 (the counted run; .2 for h2: its set-up); read one with"
        echo "  callgrind_annotate --inclusive=yes FILE | less"
    else
        echo "(--keep-tmp keeps the callgrind files, to read with callgrind_annotate --inclusive=yes FILE)"
    fi
fi
