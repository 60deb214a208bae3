//! How a queue worker turns a unit read from its port into a routing key: one
//! [`Classify`] per [`Layer`], chosen once when the worker is built ([`for_layer`]), so the
//! worker's loops never ask which kind of port they serve. Hot path: one call per unit.
//!
//! - [`IpClassifier`] (TUN, userspace stack): destination address and flow shard →
//!   `tunbus.v1.<dst>.<shard>`; broadcast and multicast → the sender's flood key. A
//!   destination inside a prefix a gateway advertises goes to that gateway's own address
//!   key instead (longest prefix wins, `route::table`, decision 0027): one atomic load per
//!   packet while no gateway advertises anything, and a cache of the last destination.
//! - [`EthernetClassifier`] (TAP, L2 sessions): destination MAC → the key of the agent
//!   that owns it (`route::mac`, learned table `worker::switch`) with the frame's flow
//!   shard; broadcast, multicast and unknown unicast → the sender's flood key.
//! - [`RadioClassifier`] (802.15.4 probes): a radio channel is a broadcast medium, so every
//!   frame is flooded to the session under the sender's flood key; each receiving radio
//!   filters by address as real radios do, and a lab's emulated links decide who hears it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::codec::v1::VNET_HDR_LEN;
use crate::emulate::Flow;
use crate::metrics::DropReason;
use crate::packet::ethernet::Mac;
use crate::port::Layer;
use crate::route::peers::{self, PeerQueues};
use crate::route::table::RouteView;
use crate::route::{self, mac, Destination, RoutingKey};

use super::switch::{L2Shared, LocalMacs, MacView};

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
/// `routes` the prefixes gateways advertise. `l2`: an L2 agent's shared switch state
/// (Ethernet ports without it flood every frame).
pub fn for_layer(
    layer: Layer,
    flood_key: RoutingKey,
    own_v4: Vec<(Ipv4Addr, u8)>,
    peers: Arc<PeerQueues>,
    routes: RouteView,
    l2: Option<(&L2Shared, bool)>,
) -> Box<dyn Classify> {
    match (layer, l2) {
        (Layer::Ip, _) => Box::new(IpClassifier { flood_key, own_v4, peers, routes, last_route: None, last_unicast: None, last_flow: Flow::FLOOD }),
        (Layer::Ethernet, Some((l2, bridged))) => Box::new(EthernetClassifier::new(flood_key, l2, bridged)),
        (Layer::Ieee802154 | Layer::Ethernet, _) => Box::new(RadioClassifier { flood_key }),
    }
}

/// The flood key of `sender` (an endpoint of a port that hosts several), else `own`.
fn flood_key_of(sender: Option<&str>, own: RoutingKey) -> RoutingKey {
    sender.and_then(RoutingKey::all).unwrap_or(own)
}

/// A gateway's address (whose key packets go to) and its queue count, when its hello said.
type NextHop = (IpAddr, Option<u8>);

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
                    Some((via, queues)) => (via, queues.or_else(|| self.peers.queues(via))),
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

/// Ethernet frames: switched by destination MAC.
pub struct EthernetClassifier {
    flood_key: RoutingKey,
    own: Mac,
    view: MacView,
    /// With `--bridge`: where sources other than the TAP's own MAC are noted (for hellos).
    local: Option<Arc<LocalMacs>>,
    /// The last few foreign sources noted (so a note costs a lock once per new source).
    noted: [Mac; 4],
    /// The last unicast (owner, shard) and its key.
    last_unicast: Option<(Mac, u8, RoutingKey)>,
    last_flow: Flow,
}

impl EthernetClassifier {
    pub fn new(flood_key: RoutingKey, l2: &L2Shared, bridged: bool) -> EthernetClassifier {
        EthernetClassifier {
            flood_key,
            own: l2.own,
            view: l2.directory.view(),
            local: bridged.then(|| l2.local.clone()),
            noted: [l2.own; 4],
            last_unicast: None,
            last_flow: Flow::FLOOD,
        }
    }
}

impl Classify for EthernetClassifier {
    fn key(&mut self, entry: &[u8], sender: Option<&str>) -> Result<RoutingKey, DropReason> {
        let frame = entry.get(VNET_HDR_LEN..).ok_or(DropReason::BadFrame)?;
        let dst = mac::classify_frame(frame).map_err(|_| DropReason::BadFrame)?;
        if let Some(local) = &self.local {
            if let Some(src) = mac::frame_source(frame) {
                if src != self.own && !self.noted.contains(&src) {
                    local.note(src);
                    self.noted.rotate_right(1);
                    self.noted[0] = src;
                }
            }
        }
        self.view.refresh();
        let owner = match dst {
            mac::FrameDestination::Unicast { dst, shard } => self.view.owner(dst).map(|o| (o, shard)),
            mac::FrameDestination::Flood => None,
        };
        self.last_flow = owner.map_or(Flow::FLOOD, |(o, shard)| Flow::unicast(crate::identity::mac_address(o), shard));
        Ok(match owner {
            // Unknown unicast is flooded, as a switch does.
            None => flood_key_of(sender, self.flood_key),
            Some((o, shard)) => match self.last_unicast {
                Some((co, cs, key)) if co == o && cs == shard => key,
                _ => {
                    let key = RoutingKey::mac(o, shard);
                    self.last_unicast = Some((o, shard, key));
                    key
                }
            },
        })
    }

    fn last_flow(&self) -> Flow {
        self.last_flow
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
        let mut c = for_layer(Layer::Ieee802154, own(), Vec::new(), Arc::new(PeerQueues::new()), RouteShare::new().view(), None);
        let frame = [0u8; VNET_HDR_LEN + 5];
        assert_eq!(c.key(&frame, None), Ok(own()));
        assert_eq!(c.key(&frame, Some("mote7")), Ok(RoutingKey::all("mote7").expect("word")));
        assert_eq!(c.key(&frame[..VNET_HDR_LEN], None), Err(DropReason::NotIp));
        assert_eq!(c.last_flow(), Flow::FLOOD);
    }

    #[test]
    fn ip_floods_go_out_under_the_endpoint_that_sent_them() {
        let mut c = for_layer(Layer::Ip, own(), Vec::new(), Arc::new(PeerQueues::new()), RouteShare::new().view(), None);
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
        let mut c = for_layer(Layer::Ip, own(), Vec::new(), Arc::new(PeerQueues::new()), share.view(), None);
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

    fn eth(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&[7; 46]);
        f
    }

    #[test]
    fn ethernet_frames_go_to_their_owner_or_are_flooded() {
        let (a, b, x) = (Mac([2, 0, 0, 0, 0, 0xa]), Mac([2, 0, 0, 0, 0, 0xb]), Mac([2, 0, 0, 0, 0, 0x99]));
        let l2 = L2Shared::new(a);
        let mut c = for_layer(Layer::Ethernet, own(), Vec::new(), Arc::new(PeerQueues::new()), RouteShare::new().view(), Some((&l2, true)));
        // Unknown unicast and broadcast: flooded.
        assert_eq!(c.key(&eth(b, a), None), Ok(own()));
        assert_eq!(c.key(&eth(Mac::BROADCAST, a), None), Ok(own()));
        assert_eq!(c.last_flow(), Flow::FLOOD);
        // Learned: b owns b, and x is behind b's bridge.
        let mut learner = super::super::switch::Learner::new(a, l2.directory.clone());
        let hello =
            br#"{"name":"h2","addresses":[],"queues":1,"wire":"v1","started_unix_ms":1,"layer":"ethernet","macs":["02:00:00:00:00:0b","02:00:00:00:00:99"]}"#;
        learner.on_hello(&serde_json::from_slice(hello).expect("a hello"), std::time::Instant::now());
        let k = c.key(&eth(b, a), None).expect("a key");
        let (owner, _) = RoutingKey::parse_mac(k.as_str()).expect("a MAC key");
        assert_eq!(owner, b);
        let k = c.key(&eth(x, a), None).expect("a key");
        assert_eq!(RoutingKey::parse_mac(k.as_str()).map(|(o, _)| o), Some(b), "x goes to the agent it is behind");
        // A runt is refused.
        assert_eq!(c.key(&[0u8; VNET_HDR_LEN + 10], None), Err(DropReason::BadFrame));
        // A bridged agent notes foreign sources for its hellos.
        c.key(&eth(Mac::BROADCAST, x), None).expect("flood");
        assert_eq!(l2.local.list(), vec![x]);
    }
}
