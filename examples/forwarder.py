#!/usr/bin/env python3
"""A router in 25 lines, for a routed lab whose routers do not forward (pyroute's exercise).

    agent lab --topology examples/routed-star.yaml --routers off --keep
    ip netns exec tb-h4 python3 examples/forwarder.py tb0
    agent lab --check --topology examples/routed-star.yaml

Every IP packet the bus brings in on IFACE for an address that is not this host's goes
back out of IFACE: the agent then sends it to its destination (or the next router). The
kernel's own forwarding is off, so this program is the router. It does not decrement the
TTL (a real router would) and sends nothing larger than the interface's MTU.
"""
import ipaddress, socket, subprocess, sys

iface = sys.argv[1] if len(sys.argv) > 1 else "tb0"
out = subprocess.run(["ip", "-brief", "address", "show", iface], capture_output=True, text=True, check=True).stdout
mine = {ipaddress.ip_address(a.split("/")[0]) for a in out.split()[2:]}
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))  # ETH_P_ALL
s.bind((iface, 0))
forwarded = 0
while True:
    packet, (_, proto, kind, _, _) = s.recvfrom(65535)
    if kind == socket.PACKET_OUTGOING or not packet:
        continue  # what the kernel (or this program) sends out
    version = packet[0] >> 4
    dst = ipaddress.ip_address(packet[16:20] if version == 4 else packet[24:40]) if version in (4, 6) else None
    if dst is None or dst in mine or dst.is_multicast:
        continue  # not IP, or for this host: the kernel takes it
    try:
        s.sendto(packet, (iface, proto))
        forwarded += 1
    except OSError as e:
        print(f"forwarder: cannot send {len(packet)} bytes to {dst}: {e}", file=sys.stderr)
