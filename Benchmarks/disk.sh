#!/usr/bin/env bash
# disk.sh: Nimbus's disk tools against QEMU's, side by side in one run, on the same 1 GiB images.
#   convert: `nimbus disk convert` vs `qemu-img convert`, raw -> qcow2 and qcow2 -> raw
#   NBD:     `nimbus disk serve` vs `qemu-nbd`, both on a Unix socket, under fio's nbd engine:
#            4 KiB random read and write at QD32 and QD1, 1 MiB sequential read and write
# Prints each figure, the medians and the ratio nimbus/qemu (for times: qemu/nimbus, so that
# > 1.0 always means Nimbus is faster).
#   Benchmarks/disk.sh [--nimbus PATH] [--runs N] [--seconds S] [--size-mib M] [--dir DIR]
set -euo pipefail
nimbus=.build/release/nimbus runs=5 seconds=6 size_mib=1024 dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --nimbus) nimbus=$2; shift ;;
        --runs) runs=$2; shift ;;
        --seconds) seconds=$2; shift ;;
        --size-mib) size_mib=$2; shift ;;
        --dir) dir=$2; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "disk.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
cd "$(dirname "$0")/.."
[ -x "$nimbus" ] || { echo "disk.sh: build $nimbus first (swift build -c release --product nimbus)" >&2; exit 1; }
for t in qemu-img qemu-nbd fio; do command -v $t >/dev/null || { echo "disk.sh: $t is missing" >&2; exit 1; }; done
work=${dir:-$(mktemp -d /var/tmp/nimbus-diskbench.XXXXXX)}
mkdir -p "$work"
# On a VM whose balloon driver reports free pages to the hypervisor (free page reporting), a file
# deleted between two commands hands its page cache back to the host, and whichever tool writes
# next pays the host's page faults: 2.4 s instead of 0.26 s for the same 512 MiB convert here.
# Reporting is paused for the run (orders above the largest buddy order are never reported) and
# restored on exit.
reporting=/sys/module/page_reporting/parameters/page_reporting_order
saved_order=""
if [ -w "$reporting" ]; then
    saved_order=$(cat "$reporting")
    if echo 11 >"$reporting" 2>/dev/null; then
        echo "== free page reporting paused for the run (page_reporting_order $saved_order -> 11)"
    else
        saved_order=""
    fi
fi
cleanup() {
    pkill -f "nimbus-diskbench" 2>/dev/null || true
    [ -n "$dir" ] || rm -rf "$work"
    [ -z "$saved_order" ] || echo "$saved_order" >"$reporting"
}
trap cleanup EXIT

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "== disk benchmark: $size_mib MiB images in $work, $runs runs, fio $seconds s per row"
# Source: half random data, half zeros, interleaved in 64 MiB blocks (as a used disk looks).
src=$work/src.raw
if [ ! -f "$src" ]; then
    truncate -s "${size_mib}M" "$src"
    for ((i = 0; i < size_mib / 64; i += 2)); do
        dd if=/dev/urandom of="$src" bs=1M count=64 seek=$((i * 64)) conv=notrunc status=none
    done
fi
sync

declare -A R
row() { R["$1|$2"]+="$3 "; }

# Dirty pages of the previous command are written back first, so neither tool pays for the other.
time_cmd() { local t0 t1; sync; t0=$(now); "$@" >/dev/null; t1=$(now); echo "$t1 - $t0" | bc -l; }

convert_qemu() {
    rm -f "$work"/q.qcow2 "$work"/q.raw; sync
    row convert-raw-to-qcow2 qemu "$(time_cmd qemu-img convert -f raw -O qcow2 "$src" "$work/q.qcow2")"
    row convert-qcow2-to-raw qemu "$(time_cmd qemu-img convert -f qcow2 -O raw "$work/q.qcow2" "$work/q.raw")"
}
convert_nimbus() {
    rm -f "$work"/n.qcow2 "$work"/n.raw; sync
    row convert-raw-to-qcow2 nimbus "$(time_cmd "$nimbus" disk convert -f raw -O qcow2 "$src" "$work/n.qcow2")"
    row convert-qcow2-to-raw nimbus "$(time_cmd "$nimbus" disk convert -f qcow2 -O raw "$work/n.qcow2" "$work/n.raw")"
}
for ((r = 1; r <= runs; r++)); do   # alternate which tool goes first
    if ((r % 2)); then convert_qemu; convert_nimbus; else convert_nimbus; convert_qemu; fi
done
qemu-img compare -q "$src" "$work/n.qcow2" && qemu-img compare -q "$src" "$work/n.raw" || { echo "disk.sh: nimbus convert output differs" >&2; exit 1; }

# NBD: fresh fully allocated qcow2 copies for each server.
fio_row() { # name rw bs iodepth uri
    fio --name="$1" --ioengine=nbd --uri="$5" --rw="$2" --bs="$3" --iodepth="$4" --size="${size_mib}M" \
        --runtime="$seconds" --time_based --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' -v rw="$2" 'NF > 50 {  # IOPS and median completion latency (µs) of reads or writes
            o = (rw ~ /read/) ? 0 : 41; split($(24 + o), p, "="); print $(8 + o), p[2] }'
}
declare -a FIO_ROWS=("randread-4k-qd32 randread 4k 32" "randread-4k-qd1 randread 4k 1" "randwrite-4k-qd32 randwrite 4k 32"
    "randwrite-4k-qd1 randwrite 4k 1" "seqread-1m read 1m 8" "seqwrite-1m write 1m 8")
# Both servers run side by side, each on its own copy; every row is measured on one and then at
# once on the other (who goes first alternates), so that the two figures of a pair are seconds
# apart rather than a whole server session apart.
start_server() { # qemu|nimbus -> pid in $pid
    local server=$1 sock=$work/nbd-$1.sock
    cp --sparse=always "$work/q.qcow2" "$work/nbd-$server.qcow2"
    rm -f "$sock"
    if [ $server = qemu ]; then
        qemu-nbd -f qcow2 --cache=writeback --aio=threads -k "$sock" -e 8 -t "$work/nbd-$server.qcow2" & pid=$!
    else
        "$nimbus" disk serve -f qcow2 --socket "$sock" "$work/nbd-$server.qcow2" 2>/dev/null & pid=$!
    fi
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
}
for ((r = 1; r <= runs; r++)); do
    start_server qemu; qpid=$pid
    start_server nimbus; npid=$pid
    sync
    for spec in "${FIO_ROWS[@]}"; do
        set -- $spec
        order="qemu nimbus"
        ((r % 2)) || order="nimbus qemu"
        for server in $order; do
            sync  # the previous row's dirty pages are written back before this row starts
            read -r iops p50 <<<"$(fio_row "$1" "$2" "$3" "$4" "nbd+unix:///?socket=$work/nbd-$server.sock")"
            row "$1" "$server" "$iops"
            [ "$4" != 1 ] || row "$1-p50" "$server" "$p50"  # at QD1 the median latency is the steadier figure
        done
    done
    kill $qpid $npid; wait $qpid $npid 2>/dev/null || true
done

ROWS=(convert-raw-to-qcow2 convert-qcow2-to-raw randread-4k-qd32 randread-4k-qd1 randread-4k-qd1-p50 randwrite-4k-qd32
    randwrite-4k-qd1 randwrite-4k-qd1-p50 seqread-1m seqwrite-1m)
echo
echo "every run (qemu | nimbus):"
for name in "${ROWS[@]}"; do
    printf '  %-22s %s| %s\n' "$name" "${R["$name|qemu"]}" "${R["$name|nimbus"]}"
done
# ratio: of the two medians. paired: the median of the per-run ratios (run r of qemu against run r
# of nimbus, measured back to back), which cancels the drift of a noisy machine between runs.
printf '\n%-22s %14s %14s %8s %8s  %s\n' row qemu nimbus ratio paired unit
for name in "${ROWS[@]}"; do
    q=$(echo ${R["$name|qemu"]} | tr ' ' '\n' | median)
    n=$(echo ${R["$name|nimbus"]} | tr ' ' '\n' | median)
    read -ra qs <<<"${R["$name|qemu"]}"
    read -ra ns <<<"${R["$name|nimbus"]}"
    case $name in
        convert* | *-p50) unit="s (lower is better; ratio = qemu/nimbus)"; ratio=$(echo "$q / $n" | bc -l)
            paired=$(for i in "${!qs[@]}"; do echo "${qs[$i]} / ${ns[$i]}" | bc -l; done | median) ;;
        *) unit="IOPS (ratio = nimbus/qemu)"; ratio=$(echo "$n / $q" | bc -l)
            paired=$(for i in "${!qs[@]}"; do echo "${ns[$i]} / ${qs[$i]}" | bc -l; done | median) ;;
    esac
    [ "${name#seq}" = "$name" ] || unit="IOPS of 1 MiB (ratio = nimbus/qemu)"
    [ "${name%-p50}" = "$name" ] || unit="µs, median completion latency (lower is better; ratio = qemu/nimbus)"
    printf '%-22s %14.3f %14.3f %8.2f %8.2f  %s\n' "$name" "$q" "$n" "$ratio" "$paired" "$unit"
done
