#!/usr/bin/env bash
# switch.sh: nimbus-switchd against the Linux bridge and Open vSwitch's userspace datapath
# (ovs-vswitchd, datapath_type=netdev, other_config:userspace-tso-enable=true), in one run.
# Two network namespaces meet across one bridge, through veth pairs, and (OVS and Nimbus) through
# internal ports (TAP devices the switch creates, moved into the namespaces):
#   iperf3 TCP with 1 and 4 streams (Gbit/s), 64-byte frames per second received (UDP with 18-byte
#   payloads from Benchmarks/udpflood.c, 64 per system call, so the endpoints are not the limit),
#   ping RTT (average of 200 pings 10 ms apart).
# Each figure is the median of --runs runs; ratios are nimbus / OVS. The machine is noisy (two
# shared cores run the switch, both iperf3 ends and the kernel): compare within one run.
set -uo pipefail
{
SCRIPT_DIR=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
SWITCHD=$REPO_ROOT/.build/release/nimbus-switchd
RUNS=3
SECONDS_PER_TEST=4
usage() {
    cat <<EOF
Usage: $(basename "$0") [--runs N] [--time S] [--switchd PATH]
Needs root, iperf3, ping, python3 and openvswitch-switch. Build first:
  swift build -c release --product nimbus-switchd
EOF
}
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --time) SECONDS_PER_TEST=$2; shift 2 ;;
    --switchd) SWITCHD=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 2; }
[ -x "$SWITCHD" ] || { echo "no nimbus-switchd at $SWITCHD" >&2; exit 2; }
for tool in iperf3 ping python3 ovs-vswitchd ovsdb-server ovs-vsctl; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done

work=$(mktemp -d /tmp/switch-bench.XXXXXX)
cc -O2 -o "$work/udpflood" "$SCRIPT_DIR/udpflood.c" || { echo "cannot build udpflood (needs a C compiler)" >&2; exit 2; }
cc -O2 -o "$work/tapfwd" "$SCRIPT_DIR/tapfwd.c" || { echo "cannot build tapfwd (needs a C compiler)" >&2; exit 2; }
stop_all() {
    pkill -f "nimbus-switchd --db $work" 2>/dev/null
    pkill -f "$work/tapfwd" 2>/dev/null
    [ -f "$work/ovs/vswitchd.pid" ] && kill "$(cat "$work/ovs/vswitchd.pid")" 2>/dev/null
    [ -f "$work/ovs/ovsdb.pid" ] && kill "$(cat "$work/ovs/ovsdb.pid")" 2>/dev/null
    ip link del sbbr 2>/dev/null
    ip link del sbovs 2>/dev/null
    ip link del ovs-netdev 2>/dev/null
    for n in sb1 sb2; do ip netns del $n 2>/dev/null; done
    ip link del sbv1 2>/dev/null
    ip link del sbv2 2>/dev/null
    sleep 0.5
}
trap 'stop_all; rm -rf "$work"' EXIT
stop_all

declare -A results
record() { results[$1]="${results[$1]:-} $2"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { python3 -c "a,b='$1','$2'; print('-' if '-' in (a,b) or float(b)==0 else '%.2f' % (float(a)/float(b)))"; }

namespaces() {
    for i in 1 2; do ip netns add sb$i; ip -n sb$i link set lo up; done
}
veth_ends() {  # makes sbv1/sbv2 in the root namespace, e1/e2 inside
    for i in 1 2; do
        ip link add sbv$i type veth peer name e$i netns sb$i
        ip link set sbv$i up
        ip -n sb$i addr add 10.66.0.$i/24 dev e$i
        ip -n sb$i link set e$i up
    done
}
tap_ends() {  # moves the internal ports sbt1/sbt2 into the namespaces
    for i in 1 2; do
        for _ in $(seq 1 50); do ip link show sbt$i >/dev/null 2>&1 && break; sleep 0.1; done
        ip link set sbt$i netns sb$i
        ip -n sb$i addr add 10.66.0.$i/24 dev sbt$i
        ip -n sb$i link set sbt$i up
    done
}

measure() {  # NAME
    local name=$1
    ip netns exec sb1 ping -c 3 -i 0.2 -W 1 10.66.0.2 >/dev/null || { echo "  $name: no connectivity" >&2; return; }
    for streams in 1 4; do
        ip netns exec sb2 iperf3 -s -1 -D -p 5401
        sleep 0.3
        record "$name-tcp$streams" "$(ip netns exec sb1 iperf3 -c 10.66.0.2 -p 5401 -t "$SECONDS_PER_TEST" -P $streams -J 2>/dev/null |
            python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' 2>/dev/null || echo 0)"
    done
    ip netns exec sb2 "$work/udpflood" recv 5402 "$SECONDS_PER_TEST" >"$work/pps" &
    local sink=$!
    sleep 0.3
    ip netns exec sb1 "$work/udpflood" send 10.66.0.2 5402 "$SECONDS_PER_TEST" >/dev/null
    wait $sink
    record "$name-pps" "$(cat "$work/pps")"
    local rtts
    rtts=$(ip netns exec sb1 ping -c 200 -i 0.01 10.66.0.2 | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p')
    record "$name-rtt" "$(echo "$rtts" | awk '{s += $1} END {if (NR) printf "%.0f\n", s / NR * 1000}')"
    record "$name-rttmed" "$(echo "$rtts" | awk '{print $1 * 1000}' | median | awk '$1 == "-" {print; next} {printf "%.0f\n", $1}')"
}

run_bridge() {
    namespaces
    veth_ends
    ip link add sbbr type bridge && ip link set sbbr up
    ip link set sbv1 master sbbr && ip link set sbv2 master sbbr
    sleep 0.5
    measure linux-veth
    stop_all
}

run_ovs() {  # veth|tap
    mkdir -p "$work/ovs" && rm -f "$work/ovs/conf.db"
    ovsdb-tool create "$work/ovs/conf.db" /usr/share/openvswitch/vswitch.ovsschema
    ovsdb-server "$work/ovs/conf.db" --remote=punix:"$work/ovs/db.sock" --pidfile="$work/ovs/ovsdb.pid" \
        --unixctl="$work/ovs/ovsdb.ctl" --detach --log-file="$work/ovs/ovsdb.log" 2>>"$work/ovs/stderr"
    local V="ovs-vsctl --db=unix:$work/ovs/db.sock"
    $V --no-wait init
    $V --no-wait set Open_vSwitch . other_config:userspace-tso-enable=true
    OVS_RUNDIR=$work/ovs ovs-vswitchd unix:"$work/ovs/db.sock" --pidfile="$work/ovs/vswitchd.pid" \
        --unixctl="$work/ovs/vswitchd.ctl" --detach --log-file="$work/ovs/vswitchd.log" 2>>"$work/ovs/stderr"
    namespaces
    $V add-br sbovs -- set Bridge sbovs datapath_type=netdev
    if [ "$1" = veth ]; then
        veth_ends
        $V add-port sbovs sbv1 -- add-port sbovs sbv2
    else
        $V add-port sbovs sbt1 -- set Interface sbt1 type=internal -- add-port sbovs sbt2 -- set Interface sbt2 type=internal
        tap_ends
    fi
    sleep 1
    measure "ovs-$1"
    stop_all
}

run_nimbus() {  # veth|tap
    rm -rf "$work/nimbus" && mkdir -p "$work/nimbus"
    "$SWITCHD" --db "$work/nimbus/conf.db" --rundir "$work/nimbus" >"$work/nimbus/log" 2>&1 &
    for _ in $(seq 1 100); do [ -S "$work/nimbus/db.sock" ] && break; sleep 0.05; done
    local V="ovs-vsctl --db=unix:$work/nimbus/db.sock"
    namespaces
    $V add-br sbnim
    if [ "$1" = veth ]; then
        veth_ends
        $V add-port sbnim sbv1 -- add-port sbnim sbv2
    else
        $V add-port sbnim sbt1 -- set Interface sbt1 type=internal -- add-port sbnim sbt2 -- set Interface sbt2 type=internal
        tap_ends
    fi
    sleep 0.5
    measure "nimbus-$1"
    stop_all
}

run_bare() {  # the bare TAP forwarder
    namespaces
    "$work/tapfwd" sbt1 sbt2 &
    tap_ends
    sleep 0.5
    measure bare-tap
    stop_all
}

for run in $(seq 1 "$RUNS"); do
    echo "run $run of $RUNS" >&2
    run_bridge
    for ports in veth tap; do
        run_ovs $ports
        run_nimbus $ports
    done
    run_bare
done

m() { echo "${results[$1]:-}" | median; }
echo
echo "nimbus-switchd benchmark, $(date -u +%Y-%m-%d), $RUNS runs of ${SECONDS_PER_TEST}s (medians)"
echo
row() {  # label bridge-key ovs-key nimbus-key
    printf '%-26s %12s %12s %12s %12s\n' "$1" "$(m "$2")" "$(m "$3")" "$(m "$4")" "$(ratio "$(m "$4")" "$(m "$3")")"
}
printf '%-26s %12s %12s %12s %12s\n' "veth ports" "Linux bridge" "OVS netdev" "nimbus" "nimbus/OVS"
row "TCP 1 stream (Gbit/s)" linux-veth-tcp1 ovs-veth-tcp1 nimbus-veth-tcp1
row "TCP 4 streams (Gbit/s)" linux-veth-tcp4 ovs-veth-tcp4 nimbus-veth-tcp4
row "64-byte frames/s" linux-veth-pps ovs-veth-pps nimbus-veth-pps
row "ping RTT mean (µs)" linux-veth-rtt ovs-veth-rtt nimbus-veth-rtt
row "ping RTT median (µs)" linux-veth-rttmed ovs-veth-rttmed nimbus-veth-rttmed
echo
tap_row() {  # label kind
    printf '%-26s %12s %12s %12s %12s %12s\n' "$1" "$(m "ovs-tap-$2")" "$(m "nimbus-tap-$2")" "$(m "bare-tap-$2")" \
        "$(ratio "$(m "nimbus-tap-$2")" "$(m "ovs-tap-$2")")" "$(ratio "$(m "bare-tap-$2")" "$(m "ovs-tap-$2")")"
}
printf '%-26s %12s %12s %12s %12s %12s\n' "TAP (internal) ports" "OVS netdev" "nimbus" "bare fwd" "nimbus/OVS" "bare/OVS"
tap_row "TCP 1 stream (Gbit/s)" tcp1
tap_row "TCP 4 streams (Gbit/s)" tcp4
tap_row "64-byte frames/s" pps
tap_row "ping RTT mean (µs)" rtt
tap_row "ping RTT median (µs)" rttmed
echo
echo "every run, in order (the machine drifts: read each run's figures against the others of that run)"
for key in $(printf '%s\n' "${!results[@]}" | sort); do printf '%-26s%s\n' "$key" "${results[$key]}"; done
}
