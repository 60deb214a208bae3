//! Corpus replay: every file under `fuzz/corpus/<target>/` goes through the same function
//! the fuzzer runs (`tunbus::fuzzing`), on stable, so what a fuzzer once found stays fixed.
//! `cargo test --test corpus -- --ignored write_seeds` writes the hand-made seeds the
//! corpora grew from (idempotent).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use tunbus::amqp::wire::{self, method, Properties, Writer};
use tunbus::codec::v1::{self, FrameHeader, Packet, FLAG_VNET};
use tunbus::codec::{ioppytest, slip, vnet};
use tunbus::fuzzing::TARGETS;
use tunbus::route::{self, RoutingKey};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

#[test]
fn every_corpus_file_replays_cleanly() {
    let mut total = 0;
    for (name, target) in TARGETS {
        let dir = corpus_dir(name);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (a target without a corpus)", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        assert!(!files.is_empty(), "{}: empty corpus", dir.display());
        for f in &files {
            let data = std::fs::read(f).expect("corpus file");
            // A panic here names the file: rerun it under the fuzzer with `cargo fuzz run <target> <file>`.
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", f.display());
        }
        total += files.len();
    }
    println!("{total} corpus files replayed over {} targets", TARGETS.len());
}

/// IPv4 or IPv6, TCP or UDP, `payload` bytes, after the virtio header a kernel writes
/// (`gso_size` 0: checksum only).
fn kernel_packet(v6: bool, tcp: bool, payload: usize, gso_size: u16) -> Vec<u8> {
    let p = tunbus::fuzzing::sample_packet(v6, tcp, payload);
    let mut out = tunbus::fuzzing::kernel_header(&p, gso_size).to_bytes().to_vec();
    out.extend_from_slice(&p);
    out
}

fn frame(vnet: bool, packets: &[&[u8]]) -> Vec<u8> {
    let hdr = [0u8; 10];
    let ps: Vec<Packet<'_>> = packets.iter().map(|d| Packet { vnet: vnet.then_some(&hdr), data: d }).collect();
    let mut out = Vec::new();
    let header = FrameHeader { flags: if vnet { FLAG_VNET } else { 0 }, count: 0, sender_queues: 4, seq: 7, timestamp_ns: 1_700_000_000_000_000_000 };
    v1::encode(header, &ps, &mut out).expect("seed frame");
    out
}

fn delivery(tag: u64, key: &[u8], user: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.method(1, method::BASIC_DELIVER, |w| {
        w.shortstr(b"ctag").longlong(tag).bit(false).shortstr(b"tunbus").shortstr(key);
    });
    w.content_header(1, body.len() as u64, &Properties { user_id: user, ..Properties::default() });
    for part in body.chunks(4000) {
        w.begin_frame(wire::FRAME_BODY, 1);
        w.buf.extend_from_slice(part);
        w.end_frame();
    }
    w.buf
}

#[test]
#[ignore = "writes the seed corpora; run by hand"]
fn write_seeds() {
    let ping = {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
        p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        p
    };
    let udp6 = kernel_packet(true, false, 100, 0)[10..].to_vec();
    let mut seeds: Vec<(&str, Vec<u8>)> =
        vec![("v1_decode", frame(false, &[&ping])), ("v1_decode", frame(true, &[&ping, &udp6, &ping])), ("v1_decode", frame(true, &[]))];
    for (v6, tcp, payload, gso) in [(false, true, 3000, 1448), (true, true, 3000, 1428), (false, false, 3000, 1400), (true, false, 100, 0), (false, true, 0, 0)]
    {
        seeds.push(("vnet", kernel_packet(v6, tcp, payload, gso)));
    }
    let mut bad = kernel_packet(false, true, 3000, 1448);
    bad[1] = vnet::GSO_UDP;
    seeds.push(("vnet", bad));
    let mut handshake = Writer::new();
    handshake.method(0, method::CONNECTION_START, |w| {
        w.octet(0).octet(9).table(&[("product", wire::Value::Str("RabbitMQ"))]).longstr(b"PLAIN").longstr(b"en_US");
    });
    handshake.method(0, method::CONNECTION_TUNE, |w| {
        w.short(2047).long(131_072).short(60);
    });
    handshake.method(0, method::CONNECTION_CLOSE, |w| {
        w.short(320).shortstr(b"CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'").short(0).short(0);
    });
    let key = RoutingKey::unicast(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 3);
    let body = frame(true, &[&ping]);
    let d = delivery(1, key.as_str().as_bytes(), Some("h1"), &body);
    let big = delivery(2, b"tunbus.v1.all.h1", None, &vec![0xab; 9000]);
    seeds.push(("amqp_frame", [&[1u8][..], &handshake.buf].concat()));
    seeds.push(("amqp_frame", [&[1u8][..], &d, &big].concat()));
    seeds.push(("amqp_session", [&[1u8][..], &d, &big, &d].concat()));
    seeds.push(("amqp_session", [&[0u8][..], &handshake.buf].concat()));
    let mut blocked = Writer::new();
    blocked.method(0, method::CONNECTION_BLOCKED, |w| {
        w.shortstr(b"low on memory");
    });
    blocked.method(0, method::CONNECTION_UNBLOCKED, |_| {});
    seeds.push(("amqp_session", [&[0x13u8][..], &blocked.buf, &d].concat()));
    let mut json = Vec::new();
    ioppytest::encode_packet(&ping, "tun0", 1_795_303_105, &mut json);
    seeds.push(("ioppytest", json));
    seeds.push(("ioppytest", br#"{"_api_version": "1.2.15", "ipv4_address": "10.2.0.1", "ipv4_netmask": "255.255.255.0", "ipv4_network": "10.2.0.0", "ipv6_host": 1, "ipv6_no_forwarding": false, "ipv6_prefix": "bbbb", "name": "agent_1", "re_route_packets_host": null}"#.to_vec()));
    seeds.push(("ioppytest", br#"{"name": "h1", "addresses": ["198.18.0.1"], "queues": 4, "leaving": false}"#.to_vec()));
    seeds.push((
        "topology",
        b"--- !configuration\nconfiguration_id: demo\ntopology:\n  - link_id: a\n    nodes: [n1, n2]\n  - link_id: b\n    nodes: [n2, n3, agent_TT]\n".to_vec(),
    ));
    seeds.push(("topology", b"a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\ntopology: [*c]\n".to_vec()));
    seeds.push(("routing", key.as_str().as_bytes().to_vec()));
    seeds.push(("routing", RoutingKey::unicast(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)), 0).as_str().as_bytes().to_vec()));
    seeds.push(("routing", route::address_word(IpAddr::V6(Ipv6Addr::LOCALHOST)).as_str().as_bytes().to_vec()));
    seeds.push(("routing", ping.clone()));
    seeds.push(("batcher", vec![0, 1, 2, 0, 1, 2, 1, 3, 1, 4, 0, 50, 7, 2, 0, 0, 1, 7, 4, 0, 1, 7, 0, 0, 4, 0, 200]));
    seeds.push(("batcher", (0..300u32).flat_map(|i| [(i % 4) as u8, (i % 9) as u8, 1 + (i % 3) as u8]).collect()));
    // slip: first byte = framing, maximum and cut (tunbus::fuzzing::slip), then the stream.
    let mut stream = vec![0x55, 0xaa];
    for f in [&[1u8, 2, 3][..], &[0xc0, 0xdb, 0xdc, 0xdd], &(0..127u8).collect::<Vec<_>>(), &ping] {
        slip::encode(f, &mut stream);
    }
    stream.extend_from_slice(&[0xc0, 1, 0xdb, 0x42, 0xc0, 0xc0, 0xc0, 9, 0xdb, 0xc0, 0xc0]);
    seeds.push(("slip", [&[0x78u8][..], &stream].concat()));
    seeds.push(("slip", [&[0x35u8][..], &stream].concat()));
    seeds.push(("slip", [&[0x8au8][..], &[0xc0][..], &[0x11; 300][..], &[0xc0, 0xc0, 7, 0xc0]].concat()));
    let mut json = Vec::new();
    ioppytest::serial::encode_frame(&[0x41, 0xc0, 0xdb, 0x88], 1_796_618_101, &mut json);
    seeds.push(("ioppytest", json));
    seeds.push(("ioppytest", br#"{"_api_version": "1.2.15", "boudrate": "460800", "name": "probe1", "port": "/dev/ttyUSB0"}"#.to_vec()));
    // packet views: IP of both versions with their transports, MLD behind hop-by-hop, a
    // frame with two 802.1Q tags around an IPv4 packet with options.
    seeds.push(("packet", ping.clone()));
    seeds.push(("packet", udp6.clone()));
    seeds.push(("packet", kernel_packet(false, true, 100, 0)[10..].to_vec()));
    let mut mld = vec![0x60, 0, 0, 0, 0, 36, 0, 1];
    mld.extend_from_slice(&Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).octets());
    mld.extend_from_slice(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16).octets());
    mld.extend_from_slice(&[58, 0, 5, 2, 0, 0, 1, 0]); // hop-by-hop: router alert
    mld.extend_from_slice(&[143, 0, 0, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2]);
    seeds.push(("packet", mld));
    let mut frame = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xa8, 0, 100, 0x81, 0, 0, 10, 0x08, 0];
    let mut with_options = ping.clone();
    with_options[0] = 0x46;
    with_options.splice(20..20, [1, 1, 1, 0]);
    with_options[3] += 4;
    frame.extend_from_slice(&with_options);
    seeds.push(("packet", frame));
    for (i, (target, data)) in seeds.iter().enumerate() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{i:02}")), data).expect("seed");
    }
}
