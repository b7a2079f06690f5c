#!/usr/bin/env bash
# tunnel.sh: nimbus-tunnel against the simplest possible tunnel (two socat relays in series) and
# against no tunnel at all, in one run on loopback:
#   iperf3 TCP, 1 and 4 streams: direct, socat → socat, nimbus (plain session), nimbus (TLS session)
#   HTTP to nginx with wrk: 50 connections (requests/s) and 1 connection (p50 latency), direct and
#   through nimbus (tcp proxy and http vhost); "added p50" is nimbus's p50 minus direct's
#   memory: VmRSS of the nimbus server and client with 1,000 concurrent connections held open
# Each figure is the median of --runs runs; ratios are nimbus / socat-chain and nimbus / direct.
# The machine is noisy (2 shared cores for everything): compare within one run.
set -euo pipefail
{

SCRIPT_DIR=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
TUNNEL=${NIMBUS_TUNNEL_BIN:-$REPO_ROOT/.build/release/nimbus-tunnel}
RUNS=3
SECONDS_PER_TEST=4

usage() {
    cat <<EOF
Usage: $(basename "$0") [--runs N] [--time S] [--tunnel PATH]

Needs iperf3, socat, nginx, wrk and python3 (Debian packages). Build nimbus-tunnel first:
  swift build -c release --product nimbus-tunnel
EOF
}
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --time) SECONDS_PER_TEST=$2; shift 2 ;;
    --tunnel) TUNNEL=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done
[ -x "$TUNNEL" ] || { echo "no nimbus-tunnel at $TUNNEL (build it with -c release)" >&2; exit 2; }
for tool in iperf3 socat nginx wrk python3; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d /tmp/nimbus-tunnel-bench.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    sleep 0.3
    rm -rf "$work"
}
trap cleanup EXIT
bg() { "$@" >"$work/$(basename "$1").$RANDOM.log" 2>&1 & pids+=($!); }

IPERF=25201 SOCAT1=25301 SOCAT2=25302 NGINX=25080 SOCAT_HTTP=25311
PLAIN_CTL=25700 PLAIN_IPERF=25601 PLAIN_HTTP=25602 PLAIN_VHOST=25081
TLS_CTL=25701 TLS_IPERF=25611

# --- peers ---------------------------------------------------------------------------------------
bg iperf3 -s -B 127.0.0.1 -p $IPERF
bg socat TCP-LISTEN:$SOCAT1,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:$SOCAT2
bg socat TCP-LISTEN:$SOCAT2,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:$IPERF
bg socat TCP-LISTEN:$SOCAT_HTTP,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:$((SOCAT_HTTP + 1))
bg socat TCP-LISTEN:$((SOCAT_HTTP + 1)),bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:$NGINX
mkdir -p "$work/www"
head -c 1024 /dev/urandom | base64 -w 0 >"$work/www/index.html"
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server { listen 127.0.0.1:$NGINX; root $work/www; }
}
EOF
nginx -c "$work/nginx.conf"

# --- nimbus: one plain pair and one TLS pair -------------------------------------------------------
for mode in plain tls; do
    if [ $mode = plain ]; then ctl=$PLAIN_CTL; iperf=$PLAIN_IPERF; else ctl=$TLS_CTL; iperf=$TLS_IPERF; fi
    cat >"$work/frps-$mode.toml" <<EOF
bindAddr = "127.0.0.1"
bindPort = $ctl
vhostHTTPPort = $([ $mode = plain ] && echo $PLAIN_VHOST || echo 0)
auth.token = "bench"
log.level = "warn"
EOF
    cat >"$work/frpc-$mode.toml" <<EOF
serverAddr = "127.0.0.1"
serverPort = $ctl
auth.token = "bench"
log.level = "warn"
transport.tls.enable = $([ $mode = tls ] && echo true || echo false)

[[proxies]]
name = "iperf"
type = "tcp"
localPort = $IPERF
remotePort = $iperf
EOF
    if [ $mode = plain ]; then
        cat >>"$work/frpc-$mode.toml" <<EOF

[[proxies]]
name = "nginx-tcp"
type = "tcp"
localPort = $NGINX
remotePort = $PLAIN_HTTP

[[proxies]]
name = "nginx-vhost"
type = "http"
localPort = $NGINX
customDomains = ["bench.test"]
EOF
    fi
    # Each process runs from its own copy of the binary, as the server and the client would on two
    # hosts: processes of one binary file on one host map each other's cached code pages (the
    # kernel's fault-around maps the cached neighbours of every faulted page), which adds about
    # 7 MiB to each side's VmRSS here (see BENCHMARKS.md).
    cp "$TUNNEL" "$work/nimbus-tunnel-server-$mode"
    cp "$TUNNEL" "$work/nimbus-tunnel-client-$mode"
    "$work/nimbus-tunnel-server-$mode" server -c "$work/frps-$mode.toml" >"$work/server-$mode.log" 2>&1 &
    pids+=($!)
    eval "SERVER_PID_$mode=$!"
    sleep 0.5
    "$work/nimbus-tunnel-client-$mode" client -c "$work/frpc-$mode.toml" >"$work/client-$mode.log" 2>&1 &
    pids+=($!)
    eval "CLIENT_PID_$mode=$!"
done
sleep 4  # past the moment (3 s after start) when each side releases its start-up code pages

iperf_gbps() { # port streams
    iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$SECONDS_PER_TEST" -J 2>/dev/null |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' ||
        echo 0
}
wrk_rps() { # port host connections
    wrk -t2 -c"$3" -d"${SECONDS_PER_TEST}s" -H "Host: $2" "http://127.0.0.1:$1/" 2>/dev/null | awk '/Requests\/sec/ {print $2}'
}
wrk_p50_us() { # port host
    wrk -t1 -c1 -d"${SECONDS_PER_TEST}s" --latency -H "Host: $2" "http://127.0.0.1:$1/" 2>/dev/null |
        awk '$1 == "50%" { v=$2; if (v ~ /us$/) { sub(/us/,"",v); print v } else if (v ~ /ms$/) { sub(/ms/,"",v); print v*1000 } else { sub(/s/,"",v); print v*1000000 } }'
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b else '-')" "$1" "$2"; }

declare -A results
record() { results[$1]="${results[$1]:-} $2"; }
for run in $(seq 1 "$RUNS"); do
    echo "run $run of $RUNS" >&2
    for streams in 1 4; do
        record "direct-$streams" "$(iperf_gbps $IPERF $streams)"
        record "socat-$streams" "$(iperf_gbps $SOCAT1 $streams)"
        record "plain-$streams" "$(iperf_gbps $PLAIN_IPERF $streams)"
        record "tls-$streams" "$(iperf_gbps $TLS_IPERF $streams)"
    done
    record rps-direct "$(wrk_rps $NGINX bench.test 50)"
    record rps-socat "$(wrk_rps $SOCAT_HTTP bench.test 50)"
    record rps-tcp "$(wrk_rps $PLAIN_HTTP bench.test 50)"
    record rps-vhost "$(wrk_rps $PLAIN_VHOST bench.test 50)"
    record p50-direct "$(wrk_p50_us $NGINX bench.test)"
    record p50-socat "$(wrk_p50_us $SOCAT_HTTP bench.test)"
    record p50-tcp "$(wrk_p50_us $PLAIN_HTTP bench.test)"
    record p50-vhost "$(wrk_p50_us $PLAIN_VHOST bench.test)"
done

# Memory with 1,000 connections held open through the tunnel (each has fetched the page once).
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
anon_kib() { awk '/RssAnon/ {print $2}' "/proc/$1/status"; }
idle_server=$(rss_kib "$SERVER_PID_plain")
idle_client=$(rss_kib "$CLIENT_PID_plain")
python3 - "$PLAIN_HTTP" >"$work/hold.out" <<'EOF' &
import socket, sys, time
port = int(sys.argv[1])
held = []
for i in range(1000):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n")
    held.append(s)
for s in held:
    s.settimeout(10)
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
print("holding", len(held), flush=True)
time.sleep(8)
EOF
hold=$!
for _ in $(seq 1 100); do grep -q holding "$work/hold.out" 2>/dev/null && break; sleep 0.2; done
sleep 1
held=$(awk '/holding/ {print $2}' "$work/hold.out")
busy_server=$(rss_kib "$SERVER_PID_plain")
busy_client=$(rss_kib "$CLIENT_PID_plain")
anon_server=$(anon_kib "$SERVER_PID_plain")
anon_client=$(anon_kib "$CLIENT_PID_plain")
wait $hold || true

m() { echo "${results[$1]}" | median; }
echo
echo "nimbus-tunnel benchmark, loopback, $(date -u +%Y-%m-%d), $RUNS runs of ${SECONDS_PER_TEST}s (medians)"
echo
printf '%-34s %10s %10s %10s %10s %12s %12s\n' "iperf3 TCP (Gbit/s)" direct socat×2 nimbus nimbus-tls "nimbus/socat" "tls/socat"
for streams in 1 4; do
    printf '%-34s %10s %10s %10s %10s %12s %12s\n' "$streams stream(s)" "$(m direct-$streams)" "$(m socat-$streams)" \
        "$(m plain-$streams)" "$(m tls-$streams)" "$(ratio "$(m plain-$streams)" "$(m socat-$streams)")" \
        "$(ratio "$(m tls-$streams)" "$(m socat-$streams)")"
done
echo
printf '%-34s %10s %10s %10s %12s %14s\n' "HTTP to nginx (wrk)" direct socat×2 "nimbus tcp" "nimbus vhost" "tcp/socat"
printf '%-34s %10s %10s %10s %12s %14s\n' "requests/s, 50 connections" "$(m rps-direct)" "$(m rps-socat)" "$(m rps-tcp)" \
    "$(m rps-vhost)" "$(ratio "$(m rps-tcp)" "$(m rps-socat)")"
printf '%-34s %10s %10s %10s %12s\n' "p50 latency µs, 1 connection" "$(m p50-direct)" "$(m p50-socat)" "$(m p50-tcp)" "$(m p50-vhost)"
added() { python3 -c "print('%.0f' % ($(m "$1") - $(m p50-direct)))"; }
printf '%-34s %10s %10s %10s %12s\n' "added p50 µs" "-" "$(added p50-socat)" "$(added p50-tcp)" "$(added p50-vhost)"
echo
printf '%-34s %10s %10s\n' "memory (VmRSS MiB)" server client
printf '%-34s %10s %10s\n' "idle, after the runs above" "$((idle_server / 1024))" "$((idle_client / 1024))"
printf '%-34s %10s %10s\n' "${held:-0} connections open" "$((busy_server / 1024))" "$((busy_client / 1024))"
printf '%-34s %10s %10s\n' "  of which anonymous (RssAnon)" "$((anon_server / 1024))" "$((anon_client / 1024))"
echo
echo "every run, in order (the machine drifts: read each run's row against the others of that run)"
for key in direct-1 socat-1 plain-1 tls-1 direct-4 socat-4 plain-4 tls-4 rps-direct rps-socat rps-tcp rps-vhost \
    p50-direct p50-socat p50-tcp p50-vhost; do
    printf '%-34s%s\n' "$key" "${results[$key]}"
done

}
