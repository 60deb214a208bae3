//! The bodies of the fuzz targets, one function per parser, shared by the cargo-fuzz
//! crate (`fuzz/`, nightly) and the corpus replay (`tests/corpus.rs`, stable): whatever a
//! fuzzer found stays fixed because an ordinary `cargo test` runs the committed corpus
//! through the same code.
//!
//! A target returns normally for any input; it panics only when an oracle fails (a round
//! trip that does not come back, a header off the allow-list, a packet lost by the
//! batcher). Not part of the tool's API.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use crate::amqp::session::{Config, Event, Session};
use crate::amqp::url::Mechanism;
use crate::amqp::wire::{self, method, Args, Close, ContentHeader, Deliver, Tune, Value, Writer};
use crate::codec::slip::{self, DecodeStats, Decoder, Framing, Malformed};
use crate::codec::v1::{self, BatchWriter, FrameHeader, Packet, FLAG_VNET, MAX_PACKET_LEN, VNET_HDR_LEN};
use crate::codec::{ioppytest, vnet};
use crate::metrics::DropReason;
use crate::route::{self, RoutingKey};
use crate::worker::batch::{self, Batcher, Outlet};

/// A fuzz target: any bytes in, a panic only when an oracle fails.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("v1_decode", v1_decode),
    ("vnet", vnet_header),
    ("amqp_frame", amqp_frame),
    ("amqp_session", amqp_session),
    ("ioppytest", ioppytest_json),
    ("topology", topology),
    ("routing", routing),
    ("batcher", batcher),
    ("slip", slip),
    ("packet", packet_views),
];

/// `v1::decode`; what decodes is encoded again by `v1::encode` and by the hot path's
/// `BatchWriter`, which must agree byte for byte and decode to the same packets.
pub fn v1_decode(data: &[u8]) {
    let Ok(frame) = v1::decode(data) else { return };
    let h = frame.header();
    let packets: Vec<Packet<'_>> = frame.packets().collect();
    assert_eq!(packets.len(), usize::from(h.count));
    let mut encoded = Vec::new();
    v1::encode(h, &packets, &mut encoded).expect("a decoded frame encodes again");
    let mut w = BatchWriter::with_capacity(encoded.len().max(v1::HEADER_LEN));
    w.set_sender_queues(h.sender_queues);
    w.reset(h.flags & FLAG_VNET);
    for p in &packets {
        w.push(p.vnet, p.data).expect("a decoded packet fits a batch of the same size");
    }
    assert_eq!(w.finish(h.seq, h.timestamp_ns), encoded.as_slice(), "encode and BatchWriter disagree");
    let again = v1::decode(&encoded).expect("an encoded frame decodes");
    let FrameHeader { flags, count, sender_queues, seq, timestamp_ns } = again.header();
    assert_eq!((flags, count, sender_queues, seq, timestamp_ns), (h.flags & FLAG_VNET, h.count, h.sender_queues, h.seq, h.timestamp_ns));
    assert!(again.packets().eq(packets.iter().copied()), "packets changed in the round trip");
}

/// `vnet::build` on a header (first 10 bytes) and a packet (the rest), with the
/// allow-list written out independently ([`vnet_allowed`]) as the oracle.
pub fn vnet_header(data: &[u8]) {
    let Some((hdr, packet)) = data.split_first_chunk::<{ vnet::HDR_LEN }>() else { return };
    let Ok(out) = vnet::build(hdr, packet) else { return };
    assert!(vnet_allowed(&out, packet), "{:?} built for {:?}", vnet::VnetHdr::parse(&out), vnet::VnetHdr::parse(hdr));
    let mut copy = packet.to_vec();
    assert!(vnet::complete_checksum(&out, &mut copy).is_ok(), "an allowed header places its checksum inside the packet");
}

/// Whether header `h` may go to the kernel with packet `p`: the table in `codec::vnet`,
/// checked field by field without sharing code with `vnet::build`.
pub fn vnet_allowed(h: &[u8; vnet::HDR_LEN], p: &[u8]) -> bool {
    if *h == vnet::PLAIN {
        return true;
    }
    let (flags, gso_type) = (h[0], h[1]);
    let [hdr_len, gso_size, csum_start, csum_offset] = [2, 4, 6, 8].map(|i| usize::from(u16::from_le_bytes([h[i], h[i + 1]])));
    if flags != vnet::F_NEEDS_CSUM || p.len() < 20 {
        return false;
    }
    let version = p[0] >> 4;
    let (l4, proto) = match version {
        4 => {
            let tot = usize::from(u16::from_be_bytes([p[2], p[3]]));
            let frag = u16::from_be_bytes([p[6], p[7]]) & 0x3fff;
            (usize::from(p[0] & 15) * 4, if tot == p.len() && frag == 0 { p[9] } else { 0 })
        }
        6 if p.len() >= 40 => (40, if usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len() { p[6] } else { 0 }),
        _ => return false,
    };
    let (l4_hdr, field) = match proto {
        6 if p.len() >= l4 + 13 => (usize::from(p[l4 + 12] >> 4) * 4, 16),
        17 => (8, 6),
        _ => return false,
    };
    if l4 < 20 || l4_hdr < 8 || csum_start != l4 || csum_offset != field || hdr_len != l4 + l4_hdr || hdr_len > p.len() {
        return false;
    }
    let segments_ok = |max_segments: usize| {
        gso_size >= usize::from(vnet::MIN_GSO_SIZE) && p.len() - hdr_len > gso_size && (p.len() - hdr_len).div_ceil(gso_size) <= max_segments
    };
    match gso_type {
        vnet::GSO_NONE => gso_size == 0,
        t if t & !vnet::GSO_ECN == vnet::GSO_TCPV4 => proto == 6 && version == 4 && segments_ok(vnet::MAX_SEGMENTS),
        t if t & !vnet::GSO_ECN == vnet::GSO_TCPV6 => proto == 6 && version == 6 && segments_ok(vnet::MAX_SEGMENTS),
        vnet::GSO_UDP_L4 => proto == 17 && segments_ok(vnet::MAX_SEGMENTS),
        _ => false,
    }
}

/// The AMQP frame parser at any length and limit, then every method and header parser
/// on what it yields.
pub fn amqp_frame(data: &[u8]) {
    let Some((&limit, mut rest)) = data.split_first() else { return };
    let frame_max = [4096, 131_072, u32::MAX, 8][usize::from(limit & 3)];
    while let Ok(Some((frame, n))) = wire::parse_frame(rest, frame_max) {
        assert!(n > 0 && n <= rest.len());
        rest = &rest[n..];
        match frame.kind {
            wire::FRAME_METHOD => {
                let Ok((id, args)) = wire::method_of(frame.payload) else { continue };
                let _ = match id {
                    method::CONNECTION_CLOSE | method::CHANNEL_CLOSE => Close::parse(args).map(drop),
                    method::CONNECTION_TUNE => Tune::parse(args).map(drop),
                    method::BASIC_DELIVER => Deliver::parse(args).map(drop),
                    _ => all_fields(args),
                };
            }
            wire::FRAME_HEADER => {
                let _ = wire::content_body_size(frame.payload);
                let _ = ContentHeader::parse(frame.payload);
            }
            _ => {}
        }
    }
}

/// Reads every kind of field from `a` until it runs out.
fn all_fields(mut a: Args<'_>) -> Result<(), wire::Error> {
    loop {
        a.octet()?;
        a.bit()?;
        a.short()?;
        a.shortstr()?;
        a.long()?;
        a.longstr()?;
        a.longlong()?;
    }
}

/// A client session fed what a hostile broker sends: with the first bit of the input set,
/// after a correct handshake (so the fuzzer reaches deliveries); the rest split into reads
/// at points the input chooses. Whatever comes, the session returns an error or events,
/// never consumes more than it was given, and never hands over a body above its limit.
pub fn amqp_session(data: &[u8]) {
    let Some((&control, data)) = data.split_first() else { return };
    let now = Instant::now();
    let max_body = 1 << 16;
    let config = Config {
        mechanism: Mechanism::Plain,
        username: "fuzz".into(),
        password: "fuzz".into(),
        vhost: "/".into(),
        connection_name: "fuzz".into(),
        frame_max: 4096 << (control >> 6),
        heartbeat: Duration::from_secs(u64::from(control >> 4 & 3)),
        max_body,
    };
    let mut s = Session::new(config, now);
    let mut input = if control & 1 != 0 { broker_handshake() } else { Vec::new() };
    input.extend_from_slice(data);
    let chunk = usize::from(control >> 1 & 7) * 97 + 1;
    let mut buffer: Vec<u8> = Vec::new();
    for (i, part) in input.chunks(chunk).enumerate() {
        let _ = s.pending().len();
        s.sent(s.pending().len(), now);
        buffer.extend_from_slice(part);
        loop {
            match s.handle(now, &buffer) {
                Err(_) => return, // the connection would be closed
                Ok(h) => {
                    assert!(h.consumed <= buffer.len());
                    if let Some(Event::Delivery(d)) = h.event {
                        assert!(d.body.len() <= max_body);
                    }
                    let progressed = h.consumed > 0 || h.event.is_some();
                    buffer.drain(..h.consumed);
                    if !progressed {
                        break;
                    }
                }
            }
        }
        if i % 7 == 3 && s.handle_timeout(now + Duration::from_secs(i as u64)).is_err() {
            return;
        }
    }
}

/// What RabbitMQ sends to open a connection and its channel.
fn broker_handshake() -> Vec<u8> {
    let mut w = Writer::new();
    w.method(0, method::CONNECTION_START, |w| {
        w.octet(0).octet(9).table(&[("product", Value::Str("RabbitMQ"))]).longstr(b"PLAIN AMQPLAIN").longstr(b"en_US");
    });
    w.method(0, method::CONNECTION_TUNE, |w| {
        w.short(2047).long(131_072).short(60);
    });
    w.method(0, method::CONNECTION_OPEN_OK, |w| {
        w.shortstr(b"");
    });
    w.method(1, method::CHANNEL_OPEN_OK, |w| {
        w.longstr(b"");
    });
    w.buf
}

/// ioppytest JSON: a packet body (and a serial frame body) decodes, is encoded again and
/// decodes to the same bytes; the control messages parse without panicking.
pub fn ioppytest_json(data: &[u8]) {
    let mut packet = Vec::new();
    if ioppytest::decode_packet(data, &mut packet).is_ok() && !packet.is_empty() {
        let mut body = Vec::new();
        ioppytest::encode_packet(&packet, "tun0", 1, &mut body);
        let mut again = Vec::new();
        ioppytest::decode_packet(&body, &mut again).expect("an encoded packet decodes");
        assert_eq!(again, packet);
    }
    if let Ok(started) = serde_json::from_slice::<ioppytest::TunStarted>(data) {
        let addressing = crate::codec::ioppytest::addressing::OldAddressing::from_started(&started);
        let _ = (addressing.prefixes(), addressing.addresses(), addressing.to_started("agent"));
    }
    let _ = serde_json::from_slice::<ioppytest::ComponentReady>(data);
    let _ = serde_json::from_slice::<crate::amqp::presence::Hello>(data);
    // The serial side: a frame body comes back, the start body parses.
    if ioppytest::serial::decode_frame(data, slip::DEFAULT_MAX_FRAME, &mut packet).is_ok() {
        let mut body = Vec::new();
        ioppytest::serial::encode_frame(&packet, 1, &mut body);
        let mut again = Vec::new();
        ioppytest::serial::decode_frame(&body, slip::DEFAULT_MAX_FRAME, &mut again).expect("an encoded frame decodes");
        assert_eq!(again, packet);
    }
    if let Ok(start) = serde_json::from_slice::<ioppytest::serial::SerialStart>(data) {
        let _ = start.baud();
    }
}

/// The SLIP decoder: the first byte picks the framing, the maximum frame length and where
/// the rest is cut in two; the streaming decoder must agree with [`slip_reference`]
/// (whole and in two pieces), and every frame it hands out must encode and decode back.
pub fn slip(data: &[u8]) {
    let Some((&choice, input)) = data.split_first() else { return };
    let framing = if choice & 1 == 0 { Framing::Delimited } else { Framing::Terminated };
    let max = [1, 2, 3, 8, slip::MAX_PSDU, slip::DEFAULT_MAX_FRAME, 0, 1000][usize::from((choice >> 1) & 7)];
    let cut = usize::from(choice >> 4) * input.len() / 15;
    let want = slip_reference(framing, max, input);
    let mut d = Decoder::new(framing, max);
    let mut frames = Vec::new();
    d.decode_all(&input[..cut], |f| frames.push(f.to_vec()));
    d.decode_all(&input[cut..], |f| frames.push(f.to_vec()));
    assert_eq!(frames, want.frames, "frames differ from the reference");
    assert_eq!(d.stats(), want.stats, "totals differ from the reference");
    for f in &frames {
        let mut encoded = Vec::new();
        slip::encode(f, &mut encoded);
        assert_eq!(encoded.len(), slip::encoded_len(f));
        let mut again = Decoder::new(framing, max);
        let (used, back) = again.decode(&encoded);
        assert_eq!((used, back), (encoded.len(), Some(f.as_slice())), "a decoded frame does not come back");
    }
}

/// What [`slip_reference`] decodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlipReference {
    pub frames: Vec<Vec<u8>>,
    pub stats: DecodeStats,
}

/// SLIP decoding as `codec::slip` documents it, written independently as the oracle of its
/// tests and of the `slip` fuzz target: the whole input at once, cut at every END.
pub fn slip_reference(framing: Framing, max: usize, input: &[u8]) -> SlipReference {
    let max = max.max(1);
    let mut out = SlipReference::default();
    let segments: Vec<&[u8]> = input.split(|&b| b == slip::END).collect();
    let count = |stats: &mut DecodeStats, why: Malformed| match why {
        Malformed::BadEscape => stats.bad_escape += 1,
        Malformed::TooLong => stats.too_long += 1,
        Malformed::Noise => stats.noise += 1,
    };
    // Before the first END: the middle of something, noise.
    if !segments[0].is_empty() {
        out.stats.noise += 1;
    }
    // Whether the END before a segment opened a frame (the first always does) or closed one.
    let mut opened = true;
    let last = segments.len() - 1;
    for (k, seg) in segments.iter().enumerate().skip(1) {
        let closed_by_end = k < last;
        if !opened {
            // Delimited framing, after a closing END: anything here is noise, and the END
            // after it opens the next frame.
            if !seg.is_empty() {
                out.stats.noise += 1;
            }
            opened = true;
            continue;
        }
        // Inside a frame: unescape, first fault wins.
        let mut frame = Vec::new();
        let mut fault = None;
        let mut i = 0;
        while i < seg.len() && fault.is_none() {
            let b = if seg[i] == slip::ESC {
                match seg.get(i + 1) {
                    Some(&slip::ESC_END) => slip::END,
                    Some(&slip::ESC_ESC) => slip::ESC,
                    Some(_) => {
                        fault = Some(Malformed::BadEscape);
                        break;
                    }
                    // ESC right before END: broken; at the end of the input: not yet known.
                    None if closed_by_end => {
                        fault = Some(Malformed::BadEscape);
                        break;
                    }
                    None => break,
                }
            } else {
                seg[i]
            };
            i += if seg[i] == slip::ESC { 2 } else { 1 };
            if frame.len() == max {
                fault = Some(Malformed::TooLong);
            } else {
                frame.push(b);
            }
        }
        if let Some(why) = fault {
            count(&mut out.stats, why);
        }
        if !closed_by_end {
            break;
        }
        if fault.is_none() && frame.is_empty() {
            out.stats.empty += 1;
            continue;
        }
        if fault.is_none() {
            out.stats.frames += 1;
            out.frames.push(frame);
        }
        opened = framing == Framing::Terminated;
    }
    out
}

/// The topology YAML (aliases, tags and nesting included).
pub fn topology(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(t) = crate::interop::topology::Topology::parse(text) {
        for node in t.nodes() {
            let _ = t.flood_targets(node);
        }
    }
}

/// Routing words and keys: what parses formats back to itself; `classify` and `source`
/// take any bytes as a packet.
pub fn routing(data: &[u8]) {
    let _ = route::classify(data);
    let _ = route::source(data);
    let _ = route::is_mld(data);
    let _ = route::flow_hash(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(ip) = route::word_to_address(text) {
        assert_eq!(route::word_to_address(route::address_word(ip).as_str()), Some(ip));
    }
    if let Some((ip, shard)) = RoutingKey::parse_unicast(text) {
        let key = RoutingKey::unicast(ip, shard);
        assert_eq!(RoutingKey::parse_unicast(key.as_str()), Some((ip, shard)), "{text:?} -> {}", key.as_str());
    }
    if route::is_valid_word(text) {
        assert!(RoutingKey::all(text).is_some());
    }
    // Every key the grammar reads is one its constructors build, spelled the same way.
    let rebuilt = match route::Key::parse(text) {
        Some(route::Key::Unicast { dst, shard }) => Some(RoutingKey::unicast(dst, shard)),
        Some(route::Key::All { sender }) => RoutingKey::all(sender),
        Some(route::Key::Hello { name }) => RoutingKey::hello(name),
        Some(route::Key::Bye { name }) => RoutingKey::bye(name),
        Some(route::Key::Route { name }) => RoutingKey::route(name),
        Some(route::Key::Ping { name }) => RoutingKey::ping(name),
        Some(route::Key::Pong { token }) => RoutingKey::pong(token),
        Some(route::Key::Probe) => {
            assert_eq!(text, route::CTL_PROBE);
            None
        }
        None => None,
    };
    if let Some(key) = rebuilt {
        assert_eq!(key.as_str(), text);
    }
    if let Some(from) = crate::codec::ioppytest::parse_from_agent(text) {
        let again = match from {
            crate::codec::ioppytest::FromAgent::Packet { name } => crate::codec::ioppytest::routing_key_from_agent(name),
            crate::codec::ioppytest::FromAgent::Started { name } => crate::codec::ioppytest::routing_key_tun_started(name),
        };
        assert_eq!(again, text);
    }
}

/// The packet views of `crate::packet` on any bytes: as an IP packet of either version
/// and its transport header (by protocol, behind the IPv6 extension headers), as ICMP, as
/// an Ethernet frame; every accessor of a checked view returns. Oracles: the checksum is
/// the plain RFC 1071 sum however the bytes are split; ECN marking keeps a filled IPv4
/// header checksum verifying and marks exactly the ECN-capable packets; the IPv6 walk
/// never points inside the fixed header; filled transport checksums verify.
pub fn packet_views(data: &[u8]) {
    use crate::packet::icmp::{Icmpv4Packet, Icmpv6Packet};
    use crate::packet::ip::protocol;
    use crate::packet::{checksum, ipv6, EthernetFrame, IpPacket, TcpPacket, UdpPacket};

    let mut plain: u64 = 0;
    for c in data.chunks(2) {
        plain += u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while plain > 0xffff {
        plain = (plain & 0xffff) + (plain >> 16);
    }
    let cut = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (a, b) = data.split_at(cut);
    assert_eq!(checksum::Sum::of(data).fold(), plain as u16, "the checksum is not RFC 1071's");
    assert_eq!(checksum::Sum::new().add_bytes(a).add_bytes(b).fold(), plain as u16, "a split at {cut} changes the sum");

    // The transport header at the start of `l4` with `proto`, every accessor.
    let transport = |proto: u8, l4: &[u8]| match proto {
        protocol::TCP => {
            if let Ok(t) = TcpPacket::new_checked(l4) {
                let _ = (t.src_port(), t.dst_port(), t.seq_number(), t.ack_number(), t.header_len(), t.flags(), t.window());
                let _ = (t.checksum(), t.urgent(), t.options(), t.payload(), t.check_len());
            }
        }
        protocol::UDP => {
            if let Ok(u) = UdpPacket::new_checked(l4) {
                let _ = (u.src_port(), u.dst_port(), u.len(), u.checksum(), u.payload(), u.check_len());
            }
        }
        protocol::ICMP => {
            if let Ok(m) = Icmpv4Packet::new_checked(l4) {
                let _ = (m.msg_type(), m.code(), m.checksum(), m.rest_of_header(), m.echo_ident(), m.echo_seq(), m.payload(), m.verify_checksum());
            }
        }
        protocol::ICMPV6 => {
            if let Ok(m) = Icmpv6Packet::new_checked(l4) {
                let _ = (m.msg_type(), m.is_mld(), m.payload());
            }
        }
        _ => {}
    };
    match IpPacket::new_checked(data) {
        Ok(IpPacket::V4(p)) => {
            let _ = (p.header_len(), p.dscp(), p.ecn(), p.total_len(), p.ident(), p.dont_frag(), p.more_frags(), p.frag_offset());
            let _ = (p.is_fragment(), p.ttl(), p.checksum(), p.src_addr(), p.dst_addr(), p.options(), p.verify_checksum(), p.check_len());
            if let Some(l4) = p.payload() {
                transport(p.protocol(), l4);
            }
        }
        Ok(IpPacket::V6(p)) => {
            let _ = (p.traffic_class(), p.dscp(), p.ecn(), p.flow_label(), p.payload_len(), p.hop_limit(), p.src_addr(), p.dst_addr(), p.check_len());
            let u = p.upper_layer();
            if let Some(at) = u.offset {
                assert!(at >= ipv6::HEADER_LEN, "the walk points inside the fixed header");
                if let Some(l4) = data.get(at..) {
                    transport(u.protocol, l4);
                }
            }
        }
        Err(_) => {}
    }
    let mut copy = data.to_vec();
    if let Ok(mut ip) = IpPacket::new_checked(&mut copy[..]) {
        if let IpPacket::V4(p) = &mut ip {
            p.fill_checksum();
        }
        let capable = ip.ecn().is_capable();
        assert_eq!(ip.mark_ce(), capable, "mark_ce on {:?}", ip.ecn());
        assert_eq!(ip.ecn().is_capable(), capable);
        if let IpPacket::V4(p) = &ip {
            assert!(p.verify_checksum(), "ECN marking broke the IPv4 header checksum");
        }
        let len = u16::try_from(ip.as_bytes().len()).unwrap_or(u16::MAX);
        let pseudo = ip.pseudo_header(protocol::TCP, len);
        if let Ok(mut t) = TcpPacket::new_checked(&mut copy[..]) {
            t.fill_checksum(pseudo);
            assert!(t.verify_checksum(pseudo), "a filled TCP checksum does not verify");
        }
    }
    if let Ok(f) = EthernetFrame::new_checked(data) {
        let _ = (f.dst(), f.src(), f.tag(0), f.tag(1), f.ethertype());
        assert_eq!(f.header_len() + f.payload().len(), data.len());
        let _ = IpPacket::new_checked(f.payload()).map(|ip| (ip.src_addr(), ip.dst_addr()));
        // L2 switching reads the same frame: destination, shard, source; never panics.
        match crate::route::mac::classify_frame(data) {
            Ok(crate::route::mac::FrameDestination::Unicast { dst, shard }) => {
                assert!(dst.is_unicast() && shard < crate::route::SHARDS);
            }
            Ok(crate::route::mac::FrameDestination::Flood) => assert!(f.dst().is_multicast()),
            Err(_) => panic!("a checked frame always classifies"),
        }
        // Whatever the first ten bytes claim as an offload header for this frame.
        if let Some(h) = data.first_chunk::<{ crate::codec::vnet::HDR_LEN }>() {
            let _ = crate::codec::vnet::build_ethernet(h, data);
        }
    }
}

/// A well-formed packet for tests and seeds: IPv4 or IPv6, TCP (a 32-byte header) or UDP
/// (its length set), `payload` zero bytes; checksums are left zero.
pub fn sample_packet(v6: bool, tcp: bool, payload: usize) -> Vec<u8> {
    let ip = if v6 { 40 } else { 20 };
    let l4 = if tcp { 32 } else { 8 };
    let len = ip + l4 + payload;
    let mut p = vec![0u8; len];
    if v6 {
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = if tcp { 6 } else { 17 };
    } else {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[9] = if tcp { 6 } else { 17 };
    }
    if tcp {
        p[ip + 12] = 8 << 4;
    } else {
        p[ip + 4..ip + 6].copy_from_slice(&((len - ip) as u16).to_be_bytes());
    }
    p
}

/// The virtio header a sending kernel writes for [`sample_packet`] `p` with segments of
/// `gso_size` (0: checksum only).
pub fn kernel_header(p: &[u8], gso_size: u16) -> vnet::VnetHdr {
    use crate::packet::{ip::protocol::TCP, IpPacket};
    let (v6, tcp) = match IpPacket::new_checked(p) {
        Ok(IpPacket::V6(ip)) => (true, ip.next_header() == TCP),
        Ok(IpPacket::V4(ip)) => (false, ip.protocol() == TCP),
        Err(_) => (false, false),
    };
    let ip = if v6 { 40 } else { 20 };
    let gso_type = match (gso_size, tcp, v6) {
        (0, _, _) => vnet::GSO_NONE,
        (_, true, false) => vnet::GSO_TCPV4,
        (_, true, true) => vnet::GSO_TCPV6,
        (_, false, _) => vnet::GSO_UDP_L4,
    };
    let l4 = if tcp { 32 } else { 8 };
    vnet::VnetHdr { flags: vnet::F_NEEDS_CSUM, gso_type, hdr_len: (ip + l4) as u16, gso_size, csum_start: ip as u16, csum_offset: if tcp { 16 } else { 6 } }
}

/// One step of the batcher model.
#[derive(Clone, Copy, Debug)]
pub enum BatchOp {
    /// A packet read from the TUN: which of ten keys (9: one the classifier refuses) and
    /// which of eight sizes (the first shorter than a virtio header).
    Packet { key: u8, size: u8 },
    /// The TUN has nothing more, `us` microseconds later.
    EndBurst { us: u16 },
    /// A new burst starts, `us` microseconds later.
    BeginBurst { us: u16 },
    /// The broker becomes busy, refuses messages (half-written), or goes away.
    Outlet { busy: bool, refuse: bool, down: bool },
}

/// Read sizes (virtio header included) the model draws from.
const SIZES: [usize; 8] = [4, 30, 74, 586, 1510, 9010, 32_010, VNET_HDR_LEN + MAX_PACKET_LEN];

/// The batcher driven by bytes: three per operation.
pub fn batcher(data: &[u8]) {
    let ops: Vec<BatchOp> = data
        .chunks_exact(3)
        .map(|c| match c[0] % 8 {
            0..=3 => BatchOp::Packet { key: c[1] % 10, size: c[2] % 8 },
            4 | 5 => BatchOp::EndBurst { us: u16::from_be_bytes([c[1], c[2]]) % 400 },
            6 => BatchOp::BeginBurst { us: u16::from(c[1]) },
            _ => BatchOp::Outlet { busy: c[1] & 1 != 0, refuse: c[1] & 2 != 0, down: c[1] & 4 != 0 },
        })
        .collect();
    batcher_model(&ops, 128 * 1024);
}

/// Runs `ops` through a [`Batcher`] with batches of `max_batch_bytes` and checks it against
/// the model: every packet is published once or dropped once, never both; per key the
/// order is kept; no message is larger than allowed or mixes keys; a batch that is not
/// held back by the broker never waits longer than the linger; a refused packet is
/// dropped only for a reason the model expects.
pub fn batcher_model(ops: &[BatchOp], max_batch_bytes: usize) {
    let key_of = |k: u8| RoutingKey::unicast(IpAddr::V4(Ipv4Addr::new(198, 18, 0, k)), 0);
    let mut b = Batcher::new(max_batch_bytes, 2, key_of(200));
    let mut out =
        ModelOutlet { max_len: max_batch_bytes.max(v1::HEADER_LEN + batch::MAX_ENTRY), keys: (0..10).map(key_of).collect(), ..ModelOutlet::default() };
    let mut now = 1_000_000u64;
    let mut next_id = 0u32;
    // Committed, not yet published or dropped: id -> start of its burst.
    let mut open: std::collections::BTreeMap<u32, u64> = Default::default();
    let mut burst_ns = now;
    let mut dropped: Vec<(u32, DropReason)> = Vec::new();
    let mut ever_refused = false;
    let mut buf = vec![0u8; batch::MAX_READ];
    b.begin_burst(now);
    for op in ops.iter().chain(&[BatchOp::Outlet { busy: false, refuse: false, down: false }, BatchOp::EndBurst { us: 60_000 }]) {
        match *op {
            BatchOp::Packet { key, size } => {
                let id = next_id;
                next_id += 1;
                let n = SIZES[usize::from(size % 8)];
                if n > VNET_HDR_LEN + 4 {
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + 4].copy_from_slice(&id.to_be_bytes());
                    buf[VNET_HDR_LEN + 4] = key;
                }
                let Some(slot) = b.slot(&mut out) else {
                    dropped.push((id, DropReason::NoBuffer)); // the worker reads it into scratch
                    continue;
                };
                slot[..n].copy_from_slice(&buf[..n]);
                let before = out.batcher_drops.len();
                let classify = |entry: &[u8]| match entry.get(VNET_HDR_LEN + 4) {
                    Some(&k) if k < 9 => Ok(key_of(k)),
                    _ => Err(DropReason::NotIp),
                };
                b.commit(n, classify, &mut out);
                open.insert(id, burst_ns);
                match &out.batcher_drops[before..] {
                    [] => {}
                    [reason] => {
                        open.remove(&id);
                        dropped.push((id, *reason));
                    }
                    more => panic!("one commit dropped {} packets: {more:?}", more.len()),
                }
            }
            BatchOp::EndBurst { us } => {
                now += u64::from(us) * 1000;
                b.end_of_burst(now, &mut out);
                if !out.busy && !out.refuse && b.holding() {
                    let published: std::collections::HashSet<u32> = out.published.iter().chain(&out.lost).copied().collect();
                    open.retain(|id, _| !published.contains(id));
                    let oldest = open.values().min().copied().unwrap_or(now);
                    assert!(now - oldest < batch::LINGER.as_nanos() as u64, "a batch waited {} ns with a free broker", now - oldest);
                }
            }
            BatchOp::BeginBurst { us } => {
                now += u64::from(us) * 1000;
                burst_ns = now;
                b.begin_burst(now);
            }
            BatchOp::Outlet { busy, refuse, down } => {
                ever_refused |= refuse;
                (out.busy, out.refuse, out.down) = (busy, refuse, down);
            }
        }
    }
    assert!(!b.holding(), "packets left open after a final flush to a free broker");
    let mut seen = std::collections::HashMap::new();
    for id in out.published.iter().chain(&out.lost).chain(dropped.iter().map(|(id, _)| id)) {
        *seen.entry(*id).or_insert(0) += 1;
    }
    for id in 0..next_id {
        assert_eq!(seen.get(&id), Some(&1), "packet {id} published or dropped {:?} times", seen.get(&id));
    }
    for (id, reason) in dropped {
        let (key, size) =
            ops.iter().filter_map(|o| if let BatchOp::Packet { key, size } = o { Some((*key, *size)) } else { None }).nth(id as usize).unwrap_or((0, 0));
        let expected = match reason {
            DropReason::NotIp => size == 0 || key == 9,
            DropReason::NoBuffer => ever_refused,
            _ => false,
        };
        assert!(expected, "packet {id} (key {key}, size {size}) dropped as {reason:?}");
    }
}

#[derive(Default)]
struct ModelOutlet {
    busy: bool,
    refuse: bool,
    down: bool,
    max_len: usize,
    keys: Vec<RoutingKey>,
    /// Ids in publishing order, and the last id per key.
    published: Vec<u32>,
    last_per_key: std::collections::HashMap<u8, u32>,
    /// Ids taken while the broker was away (counted as `broker_down` by the real outlet).
    lost: Vec<u32>,
    batcher_drops: Vec<DropReason>,
    seq: u64,
}

impl Outlet for ModelOutlet {
    fn publish(&mut self, batch: &mut BatchWriter, key: RoutingKey, _read_ns: u64) -> bool {
        if self.refuse {
            return false;
        }
        self.seq += 1;
        let body = batch.finish(self.seq, 0);
        assert!(body.len() <= self.max_len, "a message of {} bytes, above {}", body.len(), self.max_len);
        let k = self.keys.iter().position(|x| *x == key).expect("published under a key the classifier gave") as u8;
        let frame = v1::decode(body).expect("the batcher's frames decode");
        for p in frame.packets() {
            assert_eq!(p.data.get(4), Some(&k), "a packet under another packet's key");
            let id = u32::from_be_bytes(p.data[..4].try_into().expect("4 bytes"));
            if self.down {
                self.lost.push(id);
                continue;
            }
            if let Some(last) = self.last_per_key.insert(k, id) {
                assert!(last < id, "key {k}: packet {id} published after {last}");
            }
            self.published.push(id);
        }
        true
    }

    fn busy(&self) -> bool {
        self.busy
    }

    fn dropped(&mut self, reason: DropReason, packets: u64) {
        for _ in 0..packets {
            self.batcher_drops.push(reason);
        }
    }
}
