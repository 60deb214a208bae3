"""Orders an agent's addresses as ioppytest's testing tool does, with the published
ioppytest-utils 1.2.14: a MsgAgentTunStart whose routing key's '*' is replaced by the
agent's name, published by event_bus_utils.publish_message (pika; the message's own
properties: content_type, message_id, timestamp, and no user_id).

Usage: tun_start.py AMQP_URL EXCHANGE AGENT PREFIX:HOST [PREFIX:HOST ...]
  one order per PREFIX:HOST (e.g. bbbb:7), in order; prints "published N".
"""
import sys
import time

import pika

import event_bus_utils.event_bus_utils as bus
import messages


def main():
    url, exchange, agent = sys.argv[1:4]
    bus.AMQP_EXCHANGE = exchange
    connection = pika.BlockingConnection(pika.URLParameters(url))
    orders = [a.split(":", 1) for a in sys.argv[4:]]
    for prefix, host in orders:
        msg = messages.MsgAgentTunStart(name=agent, ipv6_prefix=prefix, ipv6_host=host, ipv6_no_forwarding=False)
        msg.routing_key = msg.routing_key.replace("*", agent)
        assert "user_id" not in msg.get_properties(), msg.get_properties()
        bus.publish_message(connection, msg)
        time.sleep(0.05)
    connection.close()
    print("published %d" % len(orders), flush=True)


if __name__ == "__main__":
    main()
