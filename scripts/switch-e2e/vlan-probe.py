#!/usr/bin/env python3
"""Sends an ARP request tagged with a VLAN out of an interface and waits for the tagged reply.

usage: vlan-probe.py IFACE VLAN SENDER_IP TARGET_IP
Exit 0 when an ARP reply for TARGET_IP arrives tagged with VLAN, 1 otherwise. Used to test trunk
ports where the kernel has no 802.1Q module: the kernel reports a received frame's tag beside it
(PACKET_AUXDATA) rather than in it.
"""
import socket, struct, sys, time

iface, vlan, sender, target = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((iface, 0))
s.setsockopt(263, 8, 1)  # SOL_PACKET, PACKET_AUXDATA
mac = s.getsockname()[4][:6]
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton(sender), b"\0" * 6, socket.inet_aton(target))
frame = b"\xff" * 6 + mac + struct.pack("!HH", 0x8100, vlan) + struct.pack("!H", 0x0806) + arp
deadline = time.time() + 3
s.settimeout(0.3)
while time.time() < deadline:
    s.send(frame)
    end = time.time() + 0.3
    while time.time() < end:
        try:
            data, ancillary, _, _ = s.recvmsg(2048, socket.CMSG_SPACE(20))
        except socket.timeout:
            break
        tag = None
        for level, kind, payload in ancillary:
            if level == 263 and kind == 8 and len(payload) >= 20:
                status, _, _, _, _, tci, _ = struct.unpack("IIIHHHH", payload[:20])
                if status & 0x10:
                    tag = tci & 0x0FFF
        ethertype = struct.unpack("!H", data[12:14])[0]
        body = data[14:]
        if ethertype == 0x8100:
            tag = struct.unpack("!H", data[14:16])[0] & 0x0FFF
            ethertype = struct.unpack("!H", data[16:18])[0]
            body = data[18:]
        if ethertype == 0x0806 and len(body) >= 28 and struct.unpack("!H", body[6:8])[0] == 2 and body[14:18] == socket.inet_aton(target):
            print("reply from %s tagged %s" % (target, tag))
            sys.exit(0 if tag == vlan else 1)
print("no reply from %s on VLAN %d" % (target, vlan))
sys.exit(1)
