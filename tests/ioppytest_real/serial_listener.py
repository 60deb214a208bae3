"""Runs the serial side of the published ioppytest-agent 0.2.20 against a serial device
(a pseudo-terminal a test plays the probe on) and a broker, for tunbus's tests.

    python serial_listener.py URL NAME DEVICE [BAUD]

- Probe -> bus: the package's own listener, agent.utils.serial_listener.SerialListener,
  built as the agent's serial connector (up to 0.2.0) built it (agent name, kombu connection,
  exchange amq.topic, device, baud rate as a string) and run on a thread of its own.
  It publishes fromAgent.NAME.802154.serial.started when it has opened the device, then
  every SLIP frame it reads as MsgPacketSniffedRaw on
  fromAgent.NAME.802154.serial.packet.raw, through its own kombu producer.
  0.2.20's command line no longer starts it (its serial connector was dropped), hence
  this launcher.
- On Python 3 the listener's byte handling is Python 2 only: it calls .encode('hex') on
  each character pyserial returns (bytes items are ints on Python 3). The launcher hands
  recv_chars one-character strings that answer encode('hex') as Python 2 did, and
  changes nothing else: states, framing, message building and publishing stay the
  package's. On Python 2.7 the class runs unmodified.
- Bus -> probe: 0.2.20 has no code that writes frames to a probe. The harness consumes
  toAgent.NAME.802154.serial.packet.raw, parses each body with the package's own message
  classes (Message.load -> MsgPacketInjectRaw, as that connector's consumer did)
  and writes its `data` to the device the way that consumer did: END, the bytes with END
  and ESC escaped, END.

Prints "ready" once the listener has published its started message and the consumer is
bound; stops at the end of stdin.
"""
import logging
import os
import sys
import threading

from kombu import Connection, Consumer, Exchange, Queue

from agent.utils import messages, serial_listener

SLIP_END, SLIP_ESC, SLIP_ESC_END, SLIP_ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD

if sys.version_info[0] >= 3:

    class _Py2Char(str):
        """A one-character str that hex-encodes as Python 2's str did."""

        def encode(self, encoding="utf-8", errors="strict"):
            if encoding == "hex":
                return "%02x" % ord(self)
            return str.encode(self, encoding, errors)

    _recv_chars = serial_listener.SerialListener.recv_chars

    def _recv_chars_py3(self, chars):
        return _recv_chars(self, [_Py2Char(chr(b)) for b in bytearray(chars)])

    serial_listener.SerialListener.recv_chars = _recv_chars_py3


def slip_frame(data):
    out = bytearray([SLIP_END])
    for b in data:
        if b == SLIP_END:
            out += bytearray([SLIP_ESC, SLIP_ESC_END])
        elif b == SLIP_ESC:
            out += bytearray([SLIP_ESC, SLIP_ESC_ESC])
        else:
            out.append(b)
    out.append(SLIP_END)
    return bytes(out)


def main():
    url, name, device = sys.argv[1], sys.argv[2], sys.argv[3]
    baud = sys.argv[4] if len(sys.argv) > 4 else "460800"
    logging.getLogger("kombu").setLevel(logging.INFO)
    logging.getLogger("amqp").setLevel(logging.INFO)

    listener_conn = Connection(url)
    listener = serial_listener.SerialListener(
        agent_name=name,
        rmq_connection=listener_conn,
        rmq_exchange="amq.topic",
        serial_port=device,
        serial_boudrate=baud,
    )
    reader = threading.Thread(target=listener.run, name="SerialListener")
    reader.daemon = True
    reader.start()

    inject_key = messages.MsgPacketInjectRaw.routing_key.replace("*", name).replace("ip.tun", "802154.serial")
    consumer_conn = Connection(url)
    channel = consumer_conn.channel()
    # amq.* exchanges cannot be declared, only used.
    queue = Queue("tunbus-serial-harness-%s-%d" % (name, os.getpid()), channel=channel, exclusive=True, auto_delete=True)
    queue.declare()
    queue.bind_to(exchange="amq.topic", routing_key=inject_key)
    injected = [0]

    def on_message(body, message):
        raw = message.body  # bytes, or text when kombu decoded the content_encoding
        if not isinstance(raw, type(u"")):
            raw = raw.decode("utf-8")
        m = messages.Message.load(raw, message.delivery_info["routing_key"])
        assert isinstance(m, messages.MsgPacketInjectRaw), repr(m)
        listener.ser.write(slip_frame(m.data))
        listener.ser.flush()
        injected[0] += 1

    consumer = Consumer(channel, queues=[queue], callbacks=[on_message], accept=["json"], no_ack=True, auto_declare=False)
    consumer.consume()

    stop = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    watcher = threading.Thread(target=watch_stdin)
    watcher.daemon = True
    watcher.start()

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    import socket

    while not stop.is_set():
        try:
            consumer_conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass
    listener.close()
    reader.join(2)
    sys.stdout.write("stopped: %d reads from the device, %d frames injected\n" % (listener.message_read_count, injected[0]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
