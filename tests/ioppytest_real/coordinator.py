"""A test coordinator built on the published ioppytest-utils 1.2.14: asks for a capture with
its own message classes and its own request helper (event_bus_utils.amqp_request, which
matches replies by correlation_id on the reply_to key), then reads the returned pcap with
the package's own reader (pure_pcapy).

Usage: coordinator.py AMQP_URL EXCHANGE CAPTURE_ID OUT
  prints "started" once sniffing.start is answered, waits for a line on stdin (the test
  sends traffic meanwhile), stops, fetches the capture, and writes one line per packet
  (hex) to OUT; prints a JSON summary of what it got.
"""
import base64
import io
import json
import sys

import pika

import event_bus_utils.event_bus_utils as bus
import messages
import pure_pcapy


def ask(connection, request):
    reply = bus.amqp_request(connection, request, "tunbus-test", retries=40, time_between_retries=0.25, use_message_typing=True)
    if reply is None:
        sys.exit("no typed reply to %s" % request.routing_key)
    return reply


def main():
    url, exchange, capture_id, out = sys.argv[1:5]
    bus.AMQP_EXCHANGE = exchange
    connection = pika.BlockingConnection(pika.URLParameters(url))

    started = ask(connection, messages.MsgSniffingStart(capture_id=capture_id, filter_if="tun0", filter_proto="udp"))
    assert isinstance(started, messages.MsgSniffingStartReply), type(started)
    assert started.ok is True, started.to_dict()
    print("started", flush=True)
    sys.stdin.readline()

    stopped = ask(connection, messages.MsgSniffingStop())
    assert isinstance(stopped, messages.MsgSniffingStopReply), type(stopped)
    assert stopped.ok is True, stopped.to_dict()

    got = ask(connection, messages.MsgSniffingGetCapture(capture_id=capture_id))
    assert isinstance(got, messages.MsgSniffingGetCaptureReply), type(got)
    assert got.ok is True and got.file_enc == "pcap_base64", got.to_dict()
    last = ask(connection, messages.MsgSniffingGetCaptureLast())
    assert isinstance(last, messages.MsgSniffingGetCaptureLastReply), type(last)
    assert last.value == got.value, "getlastcapture gives the last capture"

    reader = pure_pcapy.Reader(io.BytesIO(base64.b64decode(got.value)))
    packets = []
    while True:
        header, data = reader.next()
        if header is None:
            break
        packets.append(data.hex())
    with open(out, "w") as f:
        f.write("\n".join(packets))
    print(json.dumps({"filename": got.filename, "linktype": reader.datalink(), "packets": len(packets)}), flush=True)
    connection.close()


if __name__ == "__main__":
    main()
