#!/bin/sh
# nested-vm.sh: the host side of the virtio device tests. Runs INSIDE the
# nested test host (scripts/nested-host, busybox sh), boots the guest from
# scripts/virtio-guest/build once with one monitor, and checks from the host
# what the guest cannot see itself.
#
#   sh /payload/nested-vm.sh VMM CASES [LABEL]
#     VMM    qemu (QEMU microvm with ACPI) or the path of a monitor with
#            Firecracker's flags (nimbus-vmm: --no-api --config-file vm.json)
#     CASES  nimbus.test value: blk,rng,net,vsock,bench or all
#     LABEL  name in the markers (default: qemu, or nimbus)
#
# Expects in /payload: guest.cpio.gz, disk.ext4, expected.env, the kernel
# ($KERNEL, default /payload/vmlinux), qemu-share/ (bios-microvm.bin, pvh.bin),
# and in /payload/bin: ip, socat, iperf3, debugfs, e2fsck (and the monitor).
# Environment: MEM (MiB, 256), VCPUS (1), RUN_TIMEOUT (s, 900), BENCH_MB (256),
# IPERF_SECS (10), RW_FORMAT (raw; qcow2: the rw drive is a qcow2 overlay on a
# raw copy of disk.ext4, made with qemu-img, whose base must stay unchanged), APPEND_EXTRA (more guest kernel arguments), QEMU_NET_OPTS
# (appended to QEMU's virtio-net-device options, e.g. ",tx=timer"),
# QEMU_VHOST_NET=on (QEMU's net data path in the kernel: needs the outer modules
# vhost_iotlb vhost tap vhost_net; the default, off, matches nimbus-vmm's
# user-space data path), NET_BACKEND (nimbus-vmm only, default tap):
#   switch  the interface has an `uplink` instead of a TAP, so its frames cross a
#           switch bridge inside nimbus-vmm to the veth end vmup, whose peer
#           vmhost holds 172.30.0.1/24 (outer module veth)
#   vxlan   the uplink is a VXLAN port (VNI 42) to a Linux vxlan device vx0 that
#           holds 172.30.0.1/24 in the network namespace vxpeer, over the veth
#           underlay vxu 192.168.77.2 / vxp 192.168.77.1 (outer modules veth
#           udp_tunnel ip6_udp_tunnel vxlan); the listeners run in vxpeer
#   dgram   the uplink is a Unix datagram port (no virtio-net header) to QEMU's
#           -netdev dgram, on a QEMU hub with tap0 (QEMU runs no guest)
# Only the current backend's interface holds 172.30.0.1 in this namespace.
#
# Host side of each case:
#   blk    copies disk.ext4 to rw.ext4 and ro.ext4 (drives 1 and 2; drive 3 is
#          the raw scratch file for bench); afterwards reads written.txt out of
#          rw.ext4 with debugfs, runs e2fsck -fn on it, and checks that ro.ext4
#          is byte-identical to disk.ext4
#   net    TAP tap0 172.30.0.1/24 (guest 172.30.0.2, MAC 06:00:ac:1e:00:02);
#          socat receives the guest's 4 MiB file on 172.30.0.1:5001 and its
#          sha256 is compared with expected.env
#   vsock  guest CID 3; an echo server for guest->host port 6000; when the
#          guest prints VSOCK-LISTENING, connects to its port 5000 and expects
#          "pong ping-h2g". QEMU: vhost-vsock (AF_VSOCK on this host; needs the
#          vhost_vsock module); Firecracker-style monitors: the Unix socket
#          uds_path, "CONNECT 5000\n" -> "OK <port>\n", and uds_path_6000 for
#          guest->host
#   bench  iperf3 server on 172.30.0.1:5201
# Markers: HOST-<CHECK>-OK / HOST-<CHECK>-FAIL <why>, then
#   VIRTIO-RUN-END label=<label> rc=<monitor status> host_fail=<n>
set -u
VMM=$1 CASES=$2
case $VMM in qemu) LABEL=${3:-qemu} ;; *) LABEL=${3:-nimbus} ;; esac
MEM=${MEM:-256} VCPUS=${VCPUS:-1} RUN_TIMEOUT=${RUN_TIMEOUT:-900}
BENCH_MB=${BENCH_MB:-256} IPERF_SECS=${IPERF_SECS:-10}
KERNEL=${KERNEL:-/payload/vmlinux}
P=/payload
W=/tmp/vt-$LABEL
BIN=$P/bin
HOST_IP=172.30.0.1 MAC=06:00:ac:1e:00:02 CID=3
. $P/expected.env
WRITTEN_LINE=${WRITTEN_LINE:-nimbus virtio-blk write test: 0123456789abcdef}

[ "$CASES" = all ] && CASES=blk,rng,net,vsock
has() { case ",$CASES," in *",$1,"*) return 0 ;; esac; return 1; }
# Devices the cases need (only those are configured, so a monitor that lacks
# one device type can still run the other cases).
need_blk=0 need_net=0 need_rng=0
has blk || has bench && need_blk=1
has net || has bench && need_net=1
has rng && need_rng=1
HOST_FAIL=0
hfail() { echo "$*"; HOST_FAIL=$((HOST_FAIL + 1)); }

dmesg -n 1
rm -rf "$W"
mkdir -p "$W"

NET_BACKEND=${NET_BACKEND:-tap}
PEER="" # runs a host-side listener where the host address is (vxlan: in vxpeer)
case $NET_BACKEND in
    tap | switch | vxlan | dgram) ;;
    *) echo "nested-vm: NET_BACKEND must be tap, switch, vxlan or dgram"; exit 2 ;;
esac
# One interface with the host address in this namespace: drop the other backends' ones.
[ "$NET_BACKEND" != switch ] && [ -e /sys/class/net/vmup ] && $BIN/ip link del vmup
case $NET_BACKEND in switch | vxlan) [ -e /sys/class/net/tap0 ] && $BIN/ip link del tap0 ;; esac
case $NET_BACKEND in
    switch)
        # The in-process switch's uplink: a veth pair, the host's address on the far end.
        if [ ! -e /sys/class/net/vmup ]; then
            $BIN/ip link add vmup type veth peer name vmhost &&
                $BIN/ip addr add $HOST_IP/24 dev vmhost &&
                $BIN/ip link set vmhost up || echo "nested-vm: cannot set up the veth pair vmup/vmhost"
        fi
        ;;
    vxlan)
        # The underlay MTU leaves room for VXLAN's 50 bytes around a 1500-byte frame.
        if [ ! -e /run/netns/vxpeer ]; then
            $BIN/ip netns add vxpeer &&
                $BIN/ip link add vxu mtu 9000 type veth peer name vxp mtu 9000 netns vxpeer &&
                $BIN/ip addr add 192.168.77.2/24 dev vxu && $BIN/ip link set vxu up &&
                $BIN/ip -n vxpeer link set lo up &&
                $BIN/ip -n vxpeer addr add 192.168.77.1/24 dev vxp && $BIN/ip -n vxpeer link set vxp up &&
                $BIN/ip -n vxpeer link add vx0 mtu 1500 type vxlan id 42 remote 192.168.77.2 local 192.168.77.1 dstport 4789 &&
                $BIN/ip -n vxpeer addr add $HOST_IP/24 dev vx0 && $BIN/ip -n vxpeer link set vx0 up ||
                echo "nested-vm: cannot set up the vxlan peer (namespace vxpeer)"
        fi
        PEER="$BIN/ip netns exec vxpeer"
        ;;
    *)
        # TAP (once per nested host); busybox ip has no tuntap: the copied iproute2.
        if [ ! -e /sys/class/net/tap0 ]; then
            $BIN/ip tuntap add dev tap0 mode tap &&
                $BIN/ip addr add $HOST_IP/24 dev tap0 &&
                $BIN/ip link set tap0 up || echo "nested-vm: cannot set up tap0"
        fi
        ;;
esac

RW_FORMAT=${RW_FORMAT:-raw}
cp $P/disk.ext4 "$W/ro.ext4"
if [ "$RW_FORMAT" = qcow2 ]; then
    cp $P/disk.ext4 "$W/base.ext4"
    $BIN/qemu-img create -q -f qcow2 -b "$W/base.ext4" -F raw "$W/rw.qcow2" || echo "nested-vm: qemu-img create failed"
    RW_IMAGE=$W/rw.qcow2
else
    cp $P/disk.ext4 "$W/rw.ext4"
    RW_IMAGE=$W/rw.ext4
fi
# Scratch drive: sparse on tmpfs; the bench's writes fill it.
has bench && truncate -s "${BENCH_MB}M" "$W/scratch.raw"

vsock_mode=none
if has vsock; then
    if [ "$VMM" = qemu ]; then
        [ -c /dev/vhost-vsock ] && vsock_mode=vhost || echo "nested-vm: no /dev/vhost-vsock (outer module vhost_vsock): QEMU gets no vsock device"
    else
        vsock_mode=uds
    fi
fi

# --- listeners
PIDS=""
if has net; then
    $PEER $BIN/socat -u TCP-LISTEN:5001,bind=$HOST_IP,reuseaddr "OPEN:$W/net-recv.bin,creat,trunc" 2>"$W/net-listen.err" &
    PIDS="$PIDS $!"
fi
case $vsock_mode in
    vhost) $BIN/socat VSOCK-LISTEN:6000,reuseaddr,fork EXEC:cat 2>"$W/vsock-listen.err" & PIDS="$PIDS $!" ;;
    uds) $BIN/socat "UNIX-LISTEN:$W/v.sock_6000,fork" EXEC:cat 2>"$W/vsock-listen.err" & PIDS="$PIDS $!" ;;
esac
if has bench; then
    $PEER $BIN/iperf3 -s -B $HOST_IP -p 5201 >"$W/iperf3-server.log" 2>&1 &
    PIDS="$PIDS $!"
    [ -n "${IPERF_SERVER_NICE:-}" ] && renice -n "$IPERF_SERVER_NICE" -p $! >/dev/null
fi

if [ "$NET_BACKEND" = dgram ] && [ $need_net = 1 ]; then
    # QEMU as the far end of the datagram uplink: its dgram netdev and tap0 on one hub.
    qemu-system-x86_64 -machine none -accel kvm -nodefaults -display none -monitor none -serial none \
        -netdev tap,id=t0,ifname=tap0,script=no,downscript=no \
        -netdev "dgram,id=d0,local.type=unix,local.path=$W/qemu.sock,remote.type=unix,remote.path=$W/vm.sock" \
        -netdev hubport,id=h0,hubid=0,netdev=t0 -netdev hubport,id=h1,hubid=0,netdev=d0 >"$W/qemu-hub.log" 2>&1 &
    hub_pid=$!
    PIDS="$PIDS $hub_pid"
    n=0
    while [ ! -S "$W/qemu.sock" ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done
    [ -S "$W/qemu.sock" ] || echo "nested-vm: QEMU's dgram socket never appeared: $(cat "$W/qemu-hub.log")"
fi

vsock_wait=90
[ $vsock_mode = none ] && vsock_wait=0
APPEND="console=ttyS0 reboot=k panic=-1 pci=off quiet nimbus.test=$CASES nimbus.bench_mb=$BENCH_MB"
APPEND="$APPEND nimbus.iperf_secs=$IPERF_SECS nimbus.vsock_wait=$vsock_wait ${APPEND_EXTRA:-}"

# --- the monitor's command line
if [ "$VMM" = qemu ]; then
    # Drives appear as vda, vdb, vdc in -device order.
    set -- qemu-system-x86_64 -L $P/qemu-share -M microvm,acpi=on,rtc=off,auto-kernel-cmdline=off \
        -accel kvm -cpu host -m "$MEM" -smp "$VCPUS" -nodefaults -no-user-config -display none \
        -serial stdio -no-reboot -kernel "$KERNEL" -initrd $P/guest.cpio.gz -append "$APPEND"
    [ $need_blk = 1 ] && set -- "$@" \
        -drive "id=d0,file=$RW_IMAGE,format=$RW_FORMAT,if=none" -device virtio-blk-device,drive=d0 \
        -drive "id=d1,file=$W/ro.ext4,format=raw,if=none,readonly=on" -device virtio-blk-device,drive=d1
    has bench && set -- "$@" -drive "id=d2,file=$W/scratch.raw,format=raw,if=none" -device virtio-blk-device,drive=d2
    [ $need_net = 1 ] && set -- "$@" -netdev "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=${QEMU_VHOST_NET:-off}" \
        -device "virtio-net-device,netdev=n0,mac=$MAC${QEMU_NET_OPTS:-}"
    [ $need_rng = 1 ] && set -- "$@" -object rng-random,filename=/dev/urandom,id=rng0 -device virtio-rng-device,rng=rng0
    [ $vsock_mode = vhost ] && set -- "$@" -device vhost-vsock-device,guest-cid=$CID
else
    # Firecracker's config format. Drives: no root device (the guest runs
    # from its initrd), so they become vda, vdb, vdc in this order.
    drive() { # ID PATH READ_ONLY
        printf '    {"drive_id": "%s", "path_on_host": "%s", "is_root_device": false, "is_read_only": %s}' "$1" "$2" "$3"
    }
    {
        echo '{'
        echo "  \"boot-source\": {\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"$P/guest.cpio.gz\","
        echo "                  \"boot_args\": \"$APPEND\"},"
        echo "  \"machine-config\": {\"vcpu_count\": $VCPUS, \"mem_size_mib\": $MEM}"
        if [ $need_blk = 1 ]; then
            echo '  ,"drives": ['
            drive rw "$RW_IMAGE" false; echo ','
            drive ro "$W/ro.ext4" true
            has bench && { echo ','; drive scratch "$W/scratch.raw" false; }
            echo; echo '  ]'
        fi
        if [ $need_net = 1 ]; then
            case $NET_BACKEND in
                switch) link='"uplink": {"type": "system", "name": "vmup"}' ;;
                vxlan) link='"uplink": {"type": "vxlan", "remote_ip": "192.168.77.1", "key": 42}' ;;
                dgram) link="\"uplink\": {\"type\": \"dgram\", \"local_path\": \"$W/vm.sock\", \"remote_path\": \"$W/qemu.sock\", \"vnet_hdr\": false}" ;;
                *) link='"host_dev_name": "tap0"' ;;
            esac
            echo "  ,\"network-interfaces\": [{\"iface_id\": \"eth0\", $link, \"guest_mac\": \"$MAC\"}]"
        fi
        [ $vsock_mode = uds ] && echo "  ,\"vsock\": {\"guest_cid\": $CID, \"uds_path\": \"$W/v.sock\"}"
        [ $need_rng = 1 ] && echo '  ,"entropy": {}'
        echo '}'
    } >"$W/vm.json"
    echo "nested-vm: $W/vm.json:"
    cat "$W/vm.json"
    set -- "$VMM" --no-api --config-file "$W/vm.json"
fi

# --- run it (console to stdout and $W/console.log)
echo "VIRTIO-RUN-BEGIN label=$LABEL cases=$CASES"
start=$(cut -d' ' -f1 /proc/uptime)
{
    timeout -s KILL "$RUN_TIMEOUT" "$@" </dev/null 2>&1
    echo "VIRTIO-VMM-EXIT rc=$?"
} | tee "$W/console.log" &
tee_pid=$!

# host -> guest vsock, once the guest listens
if [ $vsock_mode != none ]; then
    n=0
    while ! grep -q '^VSOCK-LISTENING' "$W/console.log" 2>/dev/null; do
        grep -q '^VIRTIO-VMM-EXIT' "$W/console.log" 2>/dev/null && break
        n=$((n + 1))
        [ $n -gt $((RUN_TIMEOUT * 2)) ] && break
        usleep 500000
    done
    if grep -q '^VSOCK-LISTENING' "$W/console.log"; then
        if [ $vsock_mode = vhost ]; then
            reply=$(echo ping-h2g | $BIN/socat -t 15 - VSOCK-CONNECT:$CID:5000 2>&1)
        else
            # Firecracker's protocol: a command line, its answer, then data.
            reply=$({ printf 'CONNECT 5000\n'; sleep 3; echo ping-h2g; sleep 5; } |
                $BIN/socat -t 15 - "UNIX-CONNECT:$W/v.sock" 2>&1)
        fi
        case $reply in
            *"pong ping-h2g"*) echo "HOST-VSOCK-H2G-OK reply '$(echo "$reply" | tr '\n' ' ')'" ;;
            *) hfail "HOST-VSOCK-H2G-FAIL reply '$(echo "$reply" | tr '\n' ' ')'" ;;
        esac
    else
        hfail "HOST-VSOCK-H2G-FAIL the guest never printed VSOCK-LISTENING"
    fi
fi
wait $tee_pid
if [ -n "${hub_pid:-}" ]; then
    kill -0 "$hub_pid" 2>/dev/null || hfail "HOST-QEMU-HUB-FAIL QEMU (the dgram peer) exited early: $(cat "$W/qemu-hub.log")"
    [ -s "$W/qemu-hub.log" ] && echo "nested-vm: QEMU hub log: $(cat "$W/qemu-hub.log")"
fi
end=$(cut -d' ' -f1 /proc/uptime)
rc=$(sed -n 's/^VIRTIO-VMM-EXIT rc=//p' "$W/console.log" | tail -n 1)
for p in $PIDS; do kill "$p" 2>/dev/null; done
sleep 1

# TAP counters: drops here mean the monitor did not keep up with host->guest traffic.
[ "$NET_BACKEND" = vxlan ] && echo "HOST-VXLAN-STATS $($BIN/ip -n vxpeer -s link show vx0 | tr -s ' \n' ' ')"
[ "$NET_BACKEND" = switch ] && [ -e /sys/class/net/vmhost ] && echo "HOST-VETH-STATS $(cat /sys/class/net/vmhost/statistics/rx_packets) rx_packets $(cat /sys/class/net/vmhost/statistics/tx_packets) tx_packets"
case $NET_BACKEND in tap | dgram) [ -e /sys/class/net/tap0 ] && echo "HOST-TAP-STATS $(tr '\n' ' ' </sys/class/net/tap0/statistics/tx_dropped 2>/dev/null)tx_dropped $(cat /sys/class/net/tap0/statistics/tx_packets) tx_packets $(cat /sys/class/net/tap0/statistics/rx_packets) rx_packets" ;; esac

# --- host-side checks
if has blk && [ "$RW_FORMAT" = qcow2 ]; then
    # The overlay must be a clean qcow2 image; its contents are checked below as a raw copy.
    if $BIN/qemu-img check -q "$W/rw.qcow2" >"$W/qcheck.out" 2>&1; then
        echo "HOST-QCOW2-CHECK-OK"
    else
        hfail "HOST-QCOW2-CHECK-FAIL $(tail -n 3 "$W/qcheck.out" | tr '\n' ' ')"
    fi
    $BIN/qemu-img convert -O raw "$W/rw.qcow2" "$W/rw.ext4"
    if [ "$(sha256sum <"$W/base.ext4" | cut -d' ' -f1)" = "$DISK_SHA256" ]; then
        echo "HOST-QCOW2-BASE-UNCHANGED-OK"
    else
        hfail "HOST-QCOW2-BASE-UNCHANGED-FAIL the backing file changed"
    fi
fi
if has blk; then
    got=$($BIN/debugfs -R 'cat /written.txt' "$W/rw.ext4" 2>/dev/null)
    if [ "$got" = "$WRITTEN_LINE" ]; then
        echo "HOST-BLK-WRITTEN-OK written.txt is in rw.ext4"
    else
        hfail "HOST-BLK-WRITTEN-FAIL debugfs read '$got'"
    fi
    if $BIN/e2fsck -fn "$W/rw.ext4" >"$W/fsck.out" 2>&1; then
        echo "HOST-BLK-FSCK-OK"
    else
        hfail "HOST-BLK-FSCK-FAIL $(tail -n 3 "$W/fsck.out" | tr '\n' ' ')"
    fi
    if [ "$(sha256sum <"$W/ro.ext4" | cut -d' ' -f1)" = "$DISK_SHA256" ]; then
        echo "HOST-BLK-RO-UNCHANGED-OK"
    else
        hfail "HOST-BLK-RO-UNCHANGED-FAIL ro.ext4 differs from disk.ext4"
    fi
fi
if has net; then
    got=$(sha256sum <"$W/net-recv.bin" 2>/dev/null | cut -d' ' -f1)
    if [ "$got" = "$NET_BLOB_SHA256" ]; then
        echo "HOST-NET-TCP-RECV-OK $(wc -c <"$W/net-recv.bin") bytes, sha256 matches"
    else
        hfail "HOST-NET-TCP-RECV-FAIL received $(wc -c <"$W/net-recv.bin" 2>/dev/null) bytes, sha256 '$got' $(cat "$W/net-listen.err" 2>/dev/null)"
    fi
fi
# The guest's verdict: its last NIMBUS-TESTS-DONE line.
guest_fail=$(sed -n 's/^NIMBUS-TESTS-DONE pass=[0-9]* fail=\([0-9]*\).*/\1/p' "$W/console.log" | tail -n 1)
echo "VIRTIO-RUN-END label=$LABEL rc=${rc:-?} guest_fail=${guest_fail:-none} host_fail=$HOST_FAIL seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
rm -f "$W/rw.ext4" "$W/ro.ext4" "$W/base.ext4" "$W/rw.qcow2" "$W/scratch.raw" "$W/net-recv.bin"
[ "${rc:-1}" = 0 ] && [ "${guest_fail:-1}" = 0 ] && [ $HOST_FAIL = 0 ]
