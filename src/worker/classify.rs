//! How a queue worker turns a unit read from its port into a routing key: one
//! [`Classify`] per [`Layer`], chosen once when the worker is built ([`for_layer`]), so the
//! worker's loops never ask which kind of port they serve. Hot path: one call per unit.
//!
//! - [`IpClassifier`] (TUN, userspace stack): destination address and flow shard →
//!   `tunbus.v1.<dst>.<shard>`; broadcast and multicast → the sender's flood key. A
//!   destination inside a prefix a gateway advertises goes to that gateway's own address
//!   key instead (longest prefix wins, `route::table`, decision 0027): one atomic load per
//!   packet while no gateway advertises anything, and a cache of the last destination.
//! - [`RadioClassifier`] (802.15.4 probes): a radio channel is a broadcast medium, so every
//!   frame is flooded to the session under the sender's flood key; each receiving radio
//!   filters by address as real radios do, and a lab's emulated links decide who hears it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::codec::v1::VNET_HDR_LEN;
use crate::emulate::Flow;
use crate::metrics::DropReason;
use crate::port::Layer;
use crate::route::peers::{self, PeerQueues};
use crate::route::table::RouteView;
use crate::route::{self, Destination, RoutingKey};

/// Turns units into routing keys.
pub trait Classify: Send {
    /// The routing key of `entry` (virtio header and unit), or why it is not sent.
    /// `sender`: the name of the endpoint that sent it, when the port hosts several.
    fn key(&mut self, entry: &[u8], sender: Option<&str>) -> Result<RoutingKey, DropReason>;

    /// Where the last unit classified goes, for the emulation.
    fn last_flow(&self) -> Flow;
}

/// The classifier for a port of `layer`: `flood_key` is the agent's own, `own_v4` its IPv4
/// networks (their directed broadcasts are floods), `peers` the receivers' queue counts,
/// `routes` the prefixes gateways advertise.
pub fn for_layer(layer: Layer, flood_key: RoutingKey, own_v4: Vec<(Ipv4Addr, u8)>, peers: Arc<PeerQueues>, routes: RouteView) -> Box<dyn Classify> {
    match layer {
        Layer::Ip => Box::new(IpClassifier { flood_key, own_v4, peers, routes, last_route: None, last_unicast: None, last_flow: Flow::FLOOD }),
        Layer::Ieee802154 | Layer::Ethernet => Box::new(RadioClassifier { flood_key }),
    }
}

/// The flood key of `sender` (an endpoint of a port that hosts several), else `own`.
fn flood_key_of(sender: Option<&str>, own: RoutingKey) -> RoutingKey {
    sender.and_then(RoutingKey::all).unwrap_or(own)
}

/// A gateway's address (whose key packets go to) and its queue count.
type NextHop = (IpAddr, u8);

/// IP packets: destination and flow shard.
pub struct IpClassifier {
    flood_key: RoutingKey,
    own_v4: Vec<(Ipv4Addr, u8)>,
    /// Receivers' queue counts, learned by the receiving halves: batch per receiving queue.
    peers: Arc<PeerQueues>,
    /// The prefixes gateways advertise.
    routes: RouteView,
    /// The last destination looked up in `routes`, the table's version then, and where it
    /// goes (the gateway's address and queue count; `None`: to the destination itself).
    last_route: Option<(IpAddr, u64, Option<NextHop>)>,
    /// The last unicast (key address, shard) and its key.
    last_unicast: Option<(IpAddr, u8, RoutingKey)>,
    /// Where the last packet classified goes, for the emulation.
    last_flow: Flow,
}

impl Classify for IpClassifier {
    /// A unicast key carries the flow's shard reduced to the receiver's queue count when
    /// known ([`peers::key_shard`]). Formatting a key costs most of the per-packet routing
    /// time, so the key of the last (destination, key shard) is kept: a run of one flow, or
    /// of flows to one receiving queue, formats it once.
    fn key(&mut self, entry: &[u8], sender: Option<&str>) -> Result<RoutingKey, DropReason> {
        let packet = entry.get(VNET_HDR_LEN..).ok_or(DropReason::NotIp)?;
        if route::is_mld(packet) {
            return Err(DropReason::Mld);
        }
        let c = route::classify(packet).map_err(|_| DropReason::NotIp)?;
        let ip = match c.dst {
            Destination::Unicast(IpAddr::V4(v4)) if route::is_directed_broadcast(v4, &self.own_v4) => None,
            Destination::Unicast(ip) => Some(ip),
            Destination::Flood => None,
        };
        self.last_flow = ip.map_or(Flow::FLOOD, |ip| Flow::unicast(ip, c.shard));
        Ok(match ip {
            None => flood_key_of(sender, self.flood_key),
            Some(dst) => {
                let (ip, queues) = match self.next_hop(dst) {
                    Some((via, queues)) => (via, Some(queues)),
                    None => (dst, self.peers.queues(dst)),
                };
                let shard = peers::key_shard(c.shard, queues);
                match self.last_unicast {
                    Some((cached_ip, cached_shard, key)) if cached_ip == ip && cached_shard == shard => key,
                    _ => {
                        let key = RoutingKey::unicast(ip, shard);
                        self.last_unicast = Some((ip, shard, key));
                        key
                    }
                }
            }
        })
    }

    fn last_flow(&self) -> Flow {
        self.last_flow
    }
}

impl IpClassifier {
    /// The gateway (its address and queue count) that `dst` goes through, when a prefix
    /// some gateway advertises contains it. No lookup while none does.
    #[inline]
    fn next_hop(&mut self, dst: IpAddr) -> Option<NextHop> {
        let version = self.routes.refresh();
        if self.routes.table().is_empty() {
            return None;
        }
        if let Some((last, v, hop)) = self.last_route {
            if last == dst && v == version {
                return hop;
            }
        }
        let hop = self.routes.table().lookup(dst).map(|r| (r.via, r.queues));
        self.last_route = Some((dst, version, hop));
        hop
    }
}

/// Frames on a shared medium: every one to the whole session.
pub struct RadioClassifier {
    flood_key: RoutingKey,
}

impl Classify for RadioClassifier {
    fn key(&mut self, entry: &[u8], sender: Option<&str>) -> Result<RoutingKey, DropReason> {
        if entry.len() <= VNET_HDR_LEN {
            return Err(DropReason::NotIp); // an empty frame
        }
        Ok(flood_key_of(sender, self.flood_key))
    }

    fn last_flow(&self) -> Flow {
        Flow::FLOOD
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::table::RouteShare;

    fn own() -> RoutingKey {
        RoutingKey::all("h1").expect("a topic word")
    }

    #[test]
    fn radio_frames_are_flooded_under_their_sender() {
        let mut c = for_layer(Layer::Ieee802154, own(), Vec::new(), Arc::new(PeerQueues::new()), RouteShare::new().view());
        let frame = [0u8; VNET_HDR_LEN + 5];
        assert_eq!(c.key(&frame, None), Ok(own()));
        assert_eq!(c.key(&frame, Some("mote7")), Ok(RoutingKey::all("mote7").expect("word")));
        assert_eq!(c.key(&frame[..VNET_HDR_LEN], None), Err(DropReason::NotIp));
        assert_eq!(c.last_flow(), Flow::FLOOD);
    }

    #[test]
    fn ip_floods_go_out_under_the_endpoint_that_sent_them() {
        let mut c = for_layer(Layer::Ip, own(), Vec::new(), Arc::new(PeerQueues::new()), RouteShare::new().view());
        // An IPv4 packet to 255.255.255.255.
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 255, 255, 255, 255]);
        p.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        assert_eq!(c.key(&p, None), Ok(own()));
        assert_eq!(c.key(&p, Some("u42")), Ok(RoutingKey::all("u42").expect("word")));
        // A name that is not a topic word cannot make a key: the agent's own is used.
        assert_eq!(c.key(&p, Some("not a word")), Ok(own()));
    }

    /// An IPv4 UDP packet (with its virtio header) from 198.18.0.1 to `dst`.
    fn udp_to(dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1]);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        p
    }

    #[test]
    fn destinations_in_advertised_prefixes_go_to_their_gateway() {
        use crate::route::table::{Announcement, Routes};
        use std::time::Instant;
        let share = RouteShare::new();
        let mut c = for_layer(Layer::Ip, own(), Vec::new(), Arc::new(PeerQueues::new()), share.view());
        let far = udp_to([198, 19, 50, 2]);
        let shard_of = |k: RoutingKey| RoutingKey::parse_unicast(k.as_str()).expect("unicast").1;
        let direct = c.key(&far, None).expect("a key");
        assert_eq!(RoutingKey::parse_unicast(direct.as_str()).map(|k| k.0), Some("198.19.50.2".parse().unwrap()), "no routes: straight to the address");
        // gw advertises 198.19.50.0/24 (2 queues): the key names gw's address, shard reduced.
        let mut r = Routes::new("me");
        let (addrs, adv) = (["198.18.0.9/24".parse().unwrap()], ["198.19.50.0/24".parse().unwrap()]);
        r.on_announcement(&Announcement { name: "gw", user: None, addresses: &addrs, queues: 2, advertise: &adv }, Instant::now());
        share.publish(r.compile());
        let via = c.key(&far, None).expect("a key");
        let (addr, shard) = RoutingKey::parse_unicast(via.as_str()).expect("unicast");
        assert_eq!(addr, "198.18.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(shard, shard_of(direct) % 2);
        // Others still go straight; the cache follows the table's changes.
        let near = c.key(&udp_to([198, 18, 0, 3]), None).expect("a key");
        assert_eq!(RoutingKey::parse_unicast(near.as_str()).map(|k| k.0), Some("198.18.0.3".parse().unwrap()));
        assert_eq!(c.key(&far, None), Ok(via));
        share.publish(Routes::new("me").compile());
        assert_eq!(c.key(&far, None), Ok(direct), "the advertisement went");
    }
}
