#!/bin/sh
# qemu-vmm-standin.sh: a stand-in for nimbus-vmm, to test Benchmarks/vmm-boot.sh
# before nimbus-vmm exists. It takes nimbus-vmm's (Firecracker's) command line,
#   qemu-vmm-standin.sh --no-api --config-file vm.json
# reads the Firecracker-format vm.json (boot-source: kernel_image_path,
# boot_args, initrd_path; machine-config: vcpu_count, mem_size_mib) and execs
# QEMU microvm with KVM on it, so its console goes to stdout and it exits 0
# when the guest powers off. POSIX sh: it runs inside the nested test host
# (busybox sh).
#
# Environment: QEMU_FIRMWARE_DIR (default /payload/qemu-share, passed as -L),
# STANDIN_QEMU_MACHINE (default microvm).
set -eu

cfg=""
while [ $# -gt 0 ]; do
    case $1 in
        --no-api) ;;
        --config-file) [ $# -ge 2 ] || { echo "qemu-vmm-standin: --config-file needs a file" >&2; exit 2; }; cfg=$2; shift ;;
        *) echo "qemu-vmm-standin: unsupported argument '$1'" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$cfg" ] || { echo "qemu-vmm-standin: missing --config-file" >&2; exit 2; }
[ -f "$cfg" ] || { echo "qemu-vmm-standin: no such config file: $cfg" >&2; exit 2; }

json=$(tr -d '\n' <"$cfg")
# jstr KEY / jnum KEY: the first string / number value of "KEY" (flat enough for vm.json).
jstr() { printf '%s' "$json" | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p"; }
jnum() { printf '%s' "$json" | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p"; }

kernel=$(jstr kernel_image_path)
initrd=$(jstr initrd_path)
args=$(jstr boot_args)
vcpus=$(jnum vcpu_count)
mem=$(jnum mem_size_mib)
[ -n "$kernel" ] || { echo "qemu-vmm-standin: no boot-source.kernel_image_path in $cfg" >&2; exit 2; }

set -- -L "${QEMU_FIRMWARE_DIR:-/payload/qemu-share}" -M "${STANDIN_QEMU_MACHINE:-microvm}" \
    -accel kvm -cpu host -m "${mem:-128}" -smp "${vcpus:-1}" -nographic -no-reboot \
    -kernel "$kernel"
[ -n "$initrd" ] && set -- "$@" -initrd "$initrd"
[ -n "$args" ] && set -- "$@" -append "$args"
exec qemu-system-x86_64 "$@"
