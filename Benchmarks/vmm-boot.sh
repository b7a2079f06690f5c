#!/usr/bin/env bash
# vmm-boot.sh: boot-time and memory benchmark of nimbus-vmm against QEMU
# microvm, both with KVM, inside one nested test host
# (scripts/nested-host/nested-host: QEMU TCG with emulated AMD-V, because this
# machine's own /dev/kvm cannot boot Linux).
#
# Both monitors boot the same Debian kernel and the same busybox guest initrd
# with the same memory and vCPUs, alternating, N runs each. For every run it
# measures
#   boot_ms   wall time from the monitor's start to the guest's
#             "NIMBUS-GUEST-INIT" console line
#   exit_ms   wall time from start until the monitor exited (guest powered off)
#   hwm_kb    the monitor's peak RSS (VmHWM in /proc/PID/status), sampled on
#             every console line until the last one before exit
#   guest_kb  guest memory touched: Rss of the monitor's anonymous mapping(s)
#             of the guest RAM size (from /proc/PID/smaps at the marker)
#   ovh_kb    hwm_kb - guest_kb: the monitor's own memory
# and prints per-run rows, the medians, and the ratios nimbus/qemu.
#
# How time is taken (busybox has no sub-second `date`): the monitor is started
# as `sh -c 'echo NIMBUS-BENCH-START $$; exec timeout -s KILL T MONITOR ...'`
# (busybox timeout execs MONITOR in the same process), and its output is read
# by one awk process, which stamps the START line and the marker line when it
# reads them, with the "now at N nsecs" line of /proc/timer_list (the kernel's
# monotonic clock in ns; no fork). Both stamps carry the same pipe-read latency,
# so boot_ms runs from just before exec to the moment the marker line reached
# the reader. /proc/uptime (10 ms) is the fallback. The outer host runs in TCG,
# so absolute numbers are far slower than bare metal: compare the ratio.
set -euo pipefail
# The body is one { } block: bash parses it whole before running it, so editing
# this file while it runs is safe.
{

SCRIPT_DIR=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
NESTED=$REPO_ROOT/scripts/nested-host/nested-host
PROG=$(basename "$0")

usage() {
    cat <<EOF
Usage: $PROG --vmm PATH [options]

Boots the same kernel and guest initrd with QEMU microvm (-accel kvm) and with
the monitor at PATH (nimbus-vmm: run as 'PATH --no-api --config-file vm.json',
Firecracker's flags and config format; it must print the guest console on
stdout and exit 0 when the guest powers off), alternating, inside one nested
test host, and prints per-run rows, medians and nimbus/qemu ratios.

  --vmm PATH           the monitor under test (required)
  --runs N             measured runs of each monitor (default 5)
  --warmup N           discarded runs of each first (default 1)
  --mem MIB            guest memory for both (default 128)
  --vcpus N            guest vCPUs for both (default 1); the outer host gets
                       the same number of vCPUs unless --outer-smp is given
  --kernel K           vmlinux (default; PVH ELF) or vmlinuz (bzImage)
  --append ARGS        guest kernel command line
                       (default "console=ttyS0 reboot=k panic=-1 pci=off quiet")
  --guest-exit E       poweroff (default) or reboot: how the guest's init ends
  --qemu-machine M     QEMU's -M value (default microvm)
  --run-timeout S      kill a monitor after S seconds (default 180)
  --outer-smp N        outer host vCPUs
  --outer-mem MB       outer host memory (default 1024)
  --log FILE           keep the whole console log (default: a temp file, removed)
  --retries N          boot the nested host again (whole benchmark) up to N
                       times if it hangs or crashes (default 1; it sometimes
                       does with 2 vCPUs, see scripts/nested-host/README.md)

Test without nimbus-vmm, QEMU on both sides:
  $PROG --vmm Benchmarks/qemu-vmm-standin.sh --runs 2
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }

vmm="" runs=5 warmup=1 mem=128 vcpus=1 kernel=vmlinux append="console=ttyS0 reboot=k panic=-1 pci=off quiet"
guest_exit=poweroff machine=microvm run_timeout=180 outer_smp="" outer_mem=1024 log="" retries=1
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --vmm) vmm=${2:?--vmm needs a path}; shift ;;
        --runs) runs=${2:?--runs needs a number}; shift ;;
        --warmup) warmup=${2:?--warmup needs a number}; shift ;;
        --mem) mem=${2:?--mem needs MiB}; shift ;;
        --vcpus) vcpus=${2:?--vcpus needs a number}; shift ;;
        --kernel) kernel=${2:?--kernel needs vmlinux or vmlinuz}; shift ;;
        --append) append=${2?--append needs a value}; shift ;;
        --guest-exit) guest_exit=${2:?--guest-exit needs poweroff or reboot}; shift ;;
        --qemu-machine) machine=${2:?--qemu-machine needs a value}; shift ;;
        --run-timeout) run_timeout=${2:?--run-timeout needs seconds}; shift ;;
        --outer-smp) outer_smp=${2:?--outer-smp needs a number}; shift ;;
        --outer-mem) outer_mem=${2:?--outer-mem needs MB}; shift ;;
        --log) log=${2:?--log needs a file}; shift ;;
        --retries) retries=${2:?--retries needs a number}; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[[ -n $vmm ]] || die "missing --vmm PATH (see --help)"
[[ -f $vmm && -x $vmm ]] || die "--vmm: not an executable file: $vmm"
for n in "$runs" "$warmup" "$mem" "$vcpus" "$run_timeout" "$outer_mem" "$retries" ${outer_smp:+"$outer_smp"}; do
    [[ $n =~ ^[0-9]+$ ]] || die "not a whole number: $n"
done
((runs >= 1)) || die "--runs must be at least 1"
[[ $kernel == vmlinux || $kernel == vmlinuz ]] || die "--kernel must be vmlinux or vmlinuz"
[[ $append != *[\"\'\\]* ]] || die "--append must not contain quotes or backslashes (it goes into vm.json and a shell script)"
[[ -x $NESTED ]] || die "missing $NESTED"
outer_smp=${outer_smp:-$vcpus}

"$NESTED" prepare >/dev/null

cache=${NIMBUS_CACHE:-$REPO_ROOT/.cache}/nested
mkdir -p "$cache/tmp"
work=$(mktemp -d "$cache/tmp/vmm-boot.XXXXXX")
trap 'rm -rf "$work"' EXIT
[[ -n $log ]] || log=$work/console.log

"$NESTED" guest-initrd "$work/guest.cpio.gz" --exit "$guest_exit"

vmm_name=$(basename "$vmm")
[[ $vmm_name != qemu-system-x86_64 ]] || die "--vmm must not be named qemu-system-x86_64 (the baseline's name)"
cat >"$work/vm.json" <<EOF
{
  "boot-source": {
    "kernel_image_path": "/payload/$kernel",
    "boot_args": "$append",
    "initrd_path": "/payload/guest.cpio.gz"
  },
  "machine-config": {
    "vcpu_count": $vcpus,
    "mem_size_mib": $mem
  }
}
EOF

# Collector: reads one monitor's console, stamps START and the marker, samples
# memory, and prints one BENCH-ROW line at the end.
cat >"$work/collect.awk" <<'EOF'
function now(   l, a, t) {
    t = ""
    while ((getline l < "/proc/timer_list") > 0)
        if (l ~ /^now at /) { split(l, a, " "); t = a[3]; break }
    close("/proc/timer_list")
    if (t == "") {
        getline l < "/proc/uptime"; close("/proc/uptime")
        split(l, a, " "); t = a[1] * 1e9
    }
    return t + 0
}
function sample_status(   f, l, a) {
    f = "/proc/" pid "/status"
    while ((getline l < f) > 0)
        if (l ~ /^VmHWM:/) { split(l, a, " "); if (a[2] + 0 > hwm) hwm = a[2] + 0 }
    close(f)
}
# Guest RAM: anonymous mappings whose size is the guest memory size (up to 4 MiB more).
function sample_guest(   f, l, a, sz, anon, total, found) {
    f = "/proc/" pid "/smaps"; total = 0; found = 0
    while ((getline l < f) > 0) {
        if (l ~ /^[0-9a-f]+-[0-9a-f]+ /) { split(l, a, " "); anon = (a[6] == "" || a[6] ~ /^\[anon/ || a[6] ~ /^\/memfd:/); sz = 0; continue }
        if (l ~ /^Size:/) { split(l, a, " "); sz = a[2] + 0; continue }
        if (l ~ /^Rss:/ && anon && sz >= mem_kb && sz <= mem_kb + 4096) { split(l, a, " "); total += a[2]; found = 1 }
    }
    close(f)
    if (found) guest = total
}
BEGIN { hwm = 0; guest = -1; t0 = 0; tmark = 0; texit = 0; rc = "?"; pid = "" }
{
    line = $0; sub(/\r$/, "", line)
    if (line ~ /^NIMBUS-BENCH-START /) { t0 = now(); pid = $2; next }
    if (line ~ /^NIMBUS-BENCH-EXIT /) { texit = now(); rc = $2; next }
    print line > logf
    if (!tmark && index(line, "NIMBUS-GUEST-INIT")) {
        tmark = now()
        cpus = line; sub(/.*cpus=/, "", cpus); sub(/[^0-9].*/, "", cpus)
        if (pid != "") sample_guest()
    }
    if (pid != "") sample_status()
}
END {
    boot = tmark ? sprintf("%.1f", (tmark - t0) / 1e6) : "-"
    ex = texit ? sprintf("%.1f", (texit - t0) / 1e6) : "-"
    ovh = (hwm && guest >= 0) ? hwm - guest : "-"
    printf "BENCH-ROW %s %s %s boot_ms=%s exit_ms=%s rc=%s cpus=%s hwm_kb=%s guest_kb=%s ovh_kb=%s\n", \
        kind, label, run, boot, ex, rc, (cpus == "" ? "-" : cpus), hwm, (guest >= 0 ? guest : "-"), ovh
}
EOF

# The script that runs inside the nested host.
cat >"$work/bench.sh" <<EOF
#!/bin/sh
# Generated by Benchmarks/vmm-boot.sh; runs inside the nested test host.
RUNS=$runs WARMUP=$warmup T=$run_timeout
export QEMU_FIRMWARE_DIR=/payload/qemu-share STANDIN_QEMU_MACHINE='$machine'
VMM=/payload/bin/$vmm_name
set -- -L /payload/qemu-share -M '$machine' -accel kvm -cpu host -m $mem -smp $vcpus \\
    -nographic -no-reboot -kernel /payload/$kernel -initrd /payload/guest.cpio.gz \\
    -append '$append'
EOF
cat >>"$work/bench.sh" <<'EOF'
mkdir -p /tmp/bench
# Keep outer kernel messages (e.g. kvm's "Unhandled WRMSR" notes) off the
# console, where they could split a result line.
dmesg -n 1
[ -r /proc/timer_list ] && echo "bench: clock /proc/timer_list (ns)" || echo "bench: clock /proc/uptime (10 ms)"
# measure KIND LABEL RUN COMMAND...
measure() {
    kind=$1 label=$2 run=$3; shift 3
    log=/tmp/bench/$label-$kind-$run.log
    {
        sh -c 'echo "NIMBUS-BENCH-START $$"; exec timeout -s KILL "$0" "$@"' "$T" "$@" </dev/null 2>&1
        echo "NIMBUS-BENCH-EXIT $?"
    } | awk -v kind="$kind" -v label="$label" -v run="$run" -v mem_kb=$((MEMMIB * 1024)) \
        -v logf="$log" -f /payload/collect.awk
    grep -q NIMBUS-GUEST-INIT "$log" || { echo "bench: $label $kind $run saw no marker; its console:"; tail -n 30 "$log"; }
}
i=1
while [ $i -le $((WARMUP + RUNS)) ]; do
    if [ $i -le $WARMUP ]; then kind=warmup; n=$i; else kind=run; n=$((i - WARMUP)); fi
    # alternate which monitor goes first
    if [ $((i % 2)) -eq 1 ]; then
        measure $kind qemu $n qemu-system-x86_64 "$@"
        measure $kind nimbus $n "$VMM" --no-api --config-file /payload/vm.json
    else
        measure $kind nimbus $n "$VMM" --no-api --config-file /payload/vm.json
        measure $kind qemu $n qemu-system-x86_64 "$@"
    fi
    i=$((i + 1))
done
EOF
sed -i "s/^RUNS=/MEMMIB=$mem RUNS=/" "$work/bench.sh"

qemu_share=/usr/share/qemu
for f in bios-microvm.bin pvh.bin linuxboot_dma.bin; do
    [[ -e $qemu_share/$f ]] || die "missing QEMU firmware $qemu_share/$f (apt-get install qemu-system-data)"
done

outer_timeout=$((120 + 2 * (runs + warmup) * (run_timeout + 10)))
echo "$PROG: $runs runs (+$warmup warm-up) each of qemu ($machine) and $vmm_name; kernel $kernel," \
    "mem $mem MiB, vcpus $vcpus, outer smp $outer_smp; append '$append'"
set +e
"$NESTED" run --smp "$outer_smp" --mem "$outer_mem" --timeout "$outer_timeout" --log "$log" --retries "$retries" \
    --bin qemu-system-x86_64 --bin "$vmm" \
    --file "$cache/$kernel" --file "$work/guest.cpio.gz" --file "$work/vm.json" \
    --file "$work/collect.awk" --file "$work/bench.sh" \
    --file "$qemu_share/bios-microvm.bin:qemu-share/" --file "$qemu_share/pvh.bin:qemu-share/" \
    --file "$qemu_share/linuxboot_dma.bin:qemu-share/" \
    -- 'sh /payload/bench.sh'
rc=$?
set -e

# Summary: rows, medians, ratios.
echo
echo "== vmm-boot results ($vmm_name vs QEMU $machine; kernel $kernel, $mem MiB, $vcpus vCPU; nested TCG host)"
awk '
function median(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    if (n == 0) return ""
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function val(s,   k) { k = s; sub(/^[a-z_]+=/, "", k); return k }
/^nested-host: --- retry/ { delete B; delete H; delete G; delete O; delete ok; delete bad; print "(nested host booted again: rows above are discarded)"; next }
/^BENCH-ROW / {
    kind = $2; label = $3; run = $4
    boot = val($5); ex = val($6); rc = val($7); cpus = val($8); hwm = val($9); guest = val($10); ovh = val($11)
    printf "%-7s %-6s #%-2s boot %9s ms  exit %9s ms  rc %-3s cpus %-2s peak RSS %8s kB  guest %8s kB  monitor %8s kB\n", \
        kind, label, run, boot, ex, rc, cpus, hwm, guest, ovh
    if (kind != "run") next
    if (rc != "0" || boot == "-") { bad[label]++; next }
    B[label] = B[label] " " boot; H[label] = H[label] " " hwm
    if (guest != "-") G[label] = G[label] " " guest
    if (ovh != "-") O[label] = O[label] " " ovh
    ok[label]++
}
END {
    print ""
    printf "%-7s %5s %14s %16s %16s %16s\n", "median", "runs", "boot ms", "peak RSS kB", "guest kB", "monitor kB"
    for (l = 1; l <= 2; l++) {
        label = (l == 1) ? "qemu" : "nimbus"
        mb[label] = median(B[label]); mh[label] = median(H[label]); mg[label] = median(G[label]); mo[label] = median(O[label])
        printf "%-7s %5d %14s %16s %16s %16s%s\n", label, ok[label], mb[label], mh[label], mg[label], mo[label], \
            (bad[label] ? "  (" bad[label] " failed runs left out)" : "")
    }
    if (mb["qemu"] != "" && mb["nimbus"] != "") {
        printf "ratio nimbus/qemu: boot %.3f", mb["nimbus"] / mb["qemu"]
        if (mh["qemu"] + 0 > 0) printf "  peak RSS %.3f", mh["nimbus"] / mh["qemu"]
        if (mo["qemu"] + 0 > 0 && mo["nimbus"] != "") printf "  monitor memory %.3f", mo["nimbus"] / mo["qemu"]
        printf "\n"
    } else {
        print "ratio nimbus/qemu: n/a (a side has no successful run)"
    }
    if (bad["qemu"] || bad["nimbus"]) exit 1
}' "$log" || { [[ $rc != 0 ]] || rc=1; }
exit "$rc"
exit
}
