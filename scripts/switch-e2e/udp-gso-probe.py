#!/usr/bin/env python3
"""UDP segmentation offload across the switch: the sender's stack hands the switch one UDP
super-frame (UDP_SEGMENT), which a port toward a peer without offloads (VXLAN) must cut into
datagrams.

usage: udp-gso-probe.py recv ADDRESS PORT EXPECTED   (prints the sizes; exit 0 when EXPECTED arrived)
       udp-gso-probe.py send ADDRESS PORT            (3 sends of 3,500 bytes in 1,000-byte segments)
"""
import socket, sys, time

SOL_UDP, UDP_SEGMENT = 17, 103
mode, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "send":
    s.setsockopt(SOL_UDP, UDP_SEGMENT, 1000)
    for _ in range(3):
        s.sendto(bytes(range(250)) * 14, (address, port))
        time.sleep(0.1)
    sys.exit(0)
expected = sorted(int(n) for n in sys.argv[4].split(","))
s.bind((address, port))
s.settimeout(0.5)
sizes = []
deadline = time.time() + 5
while time.time() < deadline and len(sizes) < len(expected):
    try:
        sizes.append(len(s.recv(65536)))
    except socket.timeout:
        pass
print(",".join(map(str, sizes)) or "nothing")
sys.exit(0 if sorted(sizes) == expected else 1)
