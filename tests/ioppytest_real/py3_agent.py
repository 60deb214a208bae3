"""Runs the published ioppytest-agent 0.2.20 on Python 3.

The agent's TUN code (agent/utils/opentun.py) is Python 2 only. This launcher replaces
exactly the three bytes-vs-str spots and nothing else, then starts the agent's own CLI
(`python py3_agent.py connect --url ... --name ...`, same options as `python -m agent`):

- OpenTunLinux._createTunIf: struct.pack("16sH", "tun%d", ...) needs bytes, and the
  interface name comes back as bytes ("struct.error: argument for 's' must be a bytes
  object" at start-up otherwise);
- TunReadThread.run: os.read() returns bytes whose items are already ints (ord() of an
  int raises TypeError and the read thread exits: no packet would ever leave);
- OpenTunLinux._eventBusToTun: os.write() needs bytes, not ''.join(chr(b) ...).

Message shapes, routing keys, kombu publishing and the address set-up commands stay the
agent's own: the replaced functions are copies of the originals with those fixes.
"""
import os
import struct
import sys
from fcntl import ioctl

from agent.utils import opentun
from agent.utils.opentun import (IFF_NO_PI, IFF_TUN, TUNSETIFF, formatBuf, formatCrashMessage,
                                 formatCriticalMessage, log)


def _create_tun_if(self):
    try:
        log.info("opening tun interface")
        fd = os.open("/dev/net/tun", os.O_RDWR)
        ifs = ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tun%d", IFF_TUN | IFF_NO_PI))  # py3: bytes
        self.ifname = ifs[:16].strip(b"\x00").decode()  # py3: bytes -> str
        log.info('configuring IPv4/6 address...')
        self.ipv6_host = self.ipv6_host.replace(":", "")
        v = list()
        v.append(os.system('ip link set ' + self.ifname + ' up'))
        v.append(os.system('ip addr add dev tun0 {}/24'.format(self.ipv4_address)))
        v.append(os.system('ip route add {0}/24 dev {1}'.format(self.ipv4_address, self.ifname)))
        v.append(os.system('ip -6 addr add ' + self.ipv6_prefix + '::' + self.ipv6_host + '/64 dev ' + self.ifname))
        v.append(os.system('ip -6 addr add fe80::' + self.ipv6_host + '/64 dev ' + self.ifname))
        log.info('Network configs error codes: {}'.format(v))
        os.system('ip addr show ' + self.ifname)
    except IOError as err:
        log.error('WARNING: could not created tun interface. Are you root? ({0})'.format(err))
        fd = None
    return fd


def _read_run(self):
    try:
        while self.goOn:
            p = os.read(self.tunIf, self.ETHERNET_MTU)
            p = list(p)  # py3: bytes already iterate as ints
            log.debug('packet captured on tun interface: {0}'.format(formatBuf(p)))
            if (p[0] & 0xf0) != 0x60 and (p[0] & 0xf0) != 0x40:
                log.info('this is not an IPv4/6 packet')
                continue
            self.callback(p)
    except Exception as err:
        log.critical(formatCrashMessage(self.name, err))
        sys.exit(1)


def _event_bus_to_tun(self, sender, signal, data):
    if not self.tunIf:
        return
    try:
        os.write(self.tunIf, bytes(data))  # py3: bytes, not a str of chr()
    except Exception as err:
        log.critical(formatCriticalMessage(err))


opentun.OpenTunLinux._createTunIf = _create_tun_if
opentun.TunReadThread.run = _read_run
opentun.OpenTunLinux._eventBusToTun = _event_bus_to_tun

if __name__ == "__main__":
    from agent.agent_cli import main

    sys.argv[0] = "ioppytest-agent"
    main()
