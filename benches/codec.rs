//! Codec micro benchmarks: wire format v1 (encode with `BatchWriter`, decode and iterate),
//! the ioppytest JSON form, SLIP and the ioppytest serial JSON (802.15.4 frames).
//!
//! v1 frames carry a virtio header per entry, as the TX worker builds them (`FLAG_VNET`).
//! Sizes are IP packet sizes; throughput counts IP bytes only (not headers or framing).
//! "single" is one packet per frame (header work dominates), "batch" fills a 256 KiB frame
//! (the agent's default batch size) with packets of one size. `decode` checks lengths and
//! never reads packet bytes, so its cost is per packet: its byte throughput grows with the
//! packet size and means "this many IP bytes validated per second", not memory bandwidth.
//!
//! `vnet/build` is the receiver's allow-list on one packet as a kernel sends it (checksum
//! only, or a TSO super-packet of about 64 KiB; one element is one packet);
//! `checksum/complete` completes a partial transport checksum (`--no-offload-from-bus`, the
//! ioppytest bridge) and `checksum/segment` cuts a 64 KiB TSO super-packet into 1448-byte
//! segments with all their checksums (capture, emulation): both count the packet's bytes.
//!
//! Run: `cargo bench --bench codec` (add a filter, e.g. `-- v1_decode`, to run a subset).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tunbus::codec::segment::Segmenter;
use tunbus::codec::{ioppytest, slip, v1, vnet};
use tunbus::fuzzing::{kernel_header, sample_packet};

const SIZES: [usize; 5] = [64, 576, 1400, 9000, 65535];
const BATCH_BYTES: usize = 256 * 1024;
const VNET: [u8; v1::VNET_HDR_LEN] = [0; v1::VNET_HDR_LEN];

/// An IPv4 UDP packet of `len` bytes (20-byte header + 8-byte UDP header + payload), with a
/// pseudo-random payload so the JSON form has realistic digit counts.
fn ipv4_udp(len: usize) -> Vec<u8> {
    assert!((28..=65535).contains(&len));
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[198, 18, 0, 1]);
    p[16..20].copy_from_slice(&[198, 18, 0, 2]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5001u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut p[28..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    p
}

/// How many `size`-byte packets fit a vnet batch of `BATCH_BYTES`.
fn per_batch(size: usize) -> usize {
    let entry = v1::ENTRY_LEN_FIELD + v1::VNET_HDR_LEN + size;
    (BATCH_BYTES - v1::HEADER_LEN) / entry
}

/// Appends one packet through the zero-copy path: copy into the slot (standing in for the
/// TUN read), then commit.
#[inline]
fn slot_commit(w: &mut v1::BatchWriter, pkt: &[u8]) {
    let n = v1::VNET_HDR_LEN + pkt.len();
    let slot = w.slot(n);
    slot[..v1::VNET_HDR_LEN].copy_from_slice(&VNET);
    slot[v1::VNET_HDR_LEN..n].copy_from_slice(pkt);
    w.commit(n).expect("packet fits the batch");
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20)
}

fn v1_encode(c: &mut Criterion) {
    let mut single = c.benchmark_group("v1_encode_single");
    for size in SIZES {
        let pkt = ipv4_udp(size);
        let mut w = v1::BatchWriter::with_capacity(BATCH_BYTES);
        single.throughput(Throughput::Bytes(size as u64));
        single.bench_with_input(BenchmarkId::new("push", size), &pkt, |b, pkt| {
            b.iter(|| {
                w.reset(v1::FLAG_VNET);
                w.push(Some(&VNET), black_box(pkt)).expect("packet fits");
                black_box(w.finish(1, 2).len())
            })
        });
        single.bench_with_input(BenchmarkId::new("slot_commit", size), &pkt, |b, pkt| {
            b.iter(|| {
                w.reset(v1::FLAG_VNET);
                slot_commit(&mut w, black_box(pkt));
                black_box(w.finish(1, 2).len())
            })
        });
    }
    single.finish();

    let mut batch = c.benchmark_group("v1_encode_batch");
    for size in SIZES {
        let pkt = ipv4_udp(size);
        let n = per_batch(size);
        let mut w = v1::BatchWriter::with_capacity(BATCH_BYTES);
        batch.throughput(Throughput::Bytes((n * size) as u64));
        batch.bench_with_input(BenchmarkId::new("push", size), &pkt, |b, pkt| {
            b.iter(|| {
                w.reset(v1::FLAG_VNET);
                for _ in 0..n {
                    w.push(Some(&VNET), black_box(pkt)).expect("packet fits");
                }
                black_box(w.finish(1, 2).len())
            })
        });
        batch.bench_with_input(BenchmarkId::new("slot_commit", size), &pkt, |b, pkt| {
            b.iter(|| {
                w.reset(v1::FLAG_VNET);
                for _ in 0..n {
                    slot_commit(&mut w, black_box(pkt));
                }
                black_box(w.finish(1, 2).len())
            })
        });
    }
    batch.finish();
}

/// A finished vnet frame of `count` copies of `pkt`.
fn frame(pkt: &[u8], count: usize) -> Vec<u8> {
    let mut w = v1::BatchWriter::with_capacity(BATCH_BYTES);
    w.reset(v1::FLAG_VNET);
    for _ in 0..count {
        w.push(Some(&VNET), pkt).expect("packet fits");
    }
    w.finish(1, 2).to_vec()
}

/// What the RX path does with a body: validate it, then walk every packet.
#[inline]
fn decode_and_iterate(body: &[u8]) -> usize {
    let f = v1::decode(body).expect("valid frame");
    let mut bytes = 0;
    for p in f.packets() {
        black_box(p.vnet);
        bytes += black_box(p.data).len();
    }
    bytes
}

fn v1_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("v1_decode");
    for size in SIZES {
        let pkt = ipv4_udp(size);
        for (name, count) in [("single", 1), ("batch", per_batch(size))] {
            let body = frame(&pkt, count);
            g.throughput(Throughput::Bytes((count * size) as u64));
            g.bench_with_input(BenchmarkId::new(name, size), &body, |b, body| b.iter(|| decode_and_iterate(black_box(body))));
        }
    }
    g.finish();
}

fn ioppytest_json(c: &mut Criterion) {
    let mut g = c.benchmark_group("ioppytest");
    for size in [84, 1400] {
        let pkt = ipv4_udp(size);
        let mut body = Vec::new();
        ioppytest::encode_packet(&pkt, "tun0", 1_795_303_105, &mut body);
        let mut out = Vec::new();
        ioppytest::decode_packet(&body, &mut out).expect("own encoding decodes");
        assert_eq!(out, pkt);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode", size), &pkt, |b, pkt| {
            let mut out = Vec::new();
            b.iter(|| {
                ioppytest::encode_packet(black_box(pkt), "tun0", 1_795_303_105, &mut out);
                black_box(out.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("decode", size), &body, |b, body| {
            let mut out = Vec::new();
            b.iter(|| {
                ioppytest::decode_packet(black_box(body), &mut out).expect("valid body");
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// 802.15.4 frames as probes send them: SLIP decode of a stream of frames (each with a
/// leading END, some END and ESC bytes inside), SLIP encode, and the serial JSON body.
/// Throughput counts frame bytes. At 460800 baud a probe delivers at most 46 kB/s.
fn serial(c: &mut Criterion) {
    let mut g = c.benchmark_group("serial");
    for size in [20, slip::MAX_PSDU] {
        let frame: Vec<u8> = ipv4_udp(size.max(28))[..size].iter().enumerate().map(|(i, &b)| if i % 16 == 5 { slip::END } else { b }).collect();
        let frames = 64;
        let mut line = Vec::new();
        for _ in 0..frames {
            slip::encode(&frame, &mut line);
        }
        g.throughput(Throughput::Bytes((size * frames) as u64));
        g.bench_with_input(BenchmarkId::new("slip_decode_64", size), &line, |b, line| {
            let mut d = slip::Decoder::new(slip::Framing::Delimited, slip::DEFAULT_MAX_FRAME);
            b.iter(|| {
                let mut n = 0;
                d.decode_all(black_box(line), |f| n += f.len());
                assert_eq!(n, size * frames);
            })
        });
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("slip_encode", size), &frame, |b, frame| {
            let mut out = Vec::with_capacity(slip::max_encoded_len(size));
            b.iter(|| {
                out.clear();
                slip::encode(black_box(frame), &mut out);
                black_box(out.len())
            })
        });
        let mut body = Vec::new();
        ioppytest::serial::encode_frame(&frame, 1_796_618_101, &mut body);
        g.bench_with_input(BenchmarkId::new("json_encode", size), &frame, |b, frame| {
            let mut out = Vec::new();
            b.iter(|| {
                ioppytest::serial::encode_frame(black_box(frame), 1_796_618_101, &mut out);
                black_box(out.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("json_decode", size), &body, |b, body| {
            let mut out = Vec::new();
            b.iter(|| {
                ioppytest::serial::decode_frame(black_box(body), slip::DEFAULT_MAX_FRAME, &mut out).expect("valid body");
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// The receiver's allow-list, checksum completion and the segmenter.
fn offload(c: &mut Criterion) {
    let mut g = c.benchmark_group("vnet");
    g.throughput(Throughput::Elements(1));
    for (name, v6, tcp, payload, gso) in [
        ("tcp4_csum", false, true, 1348, 0),
        ("udp6_csum", true, false, 1352, 0),
        ("tcp4_tso", false, true, 65_000, 1448),
        ("tcp6_tso", true, true, 65_000, 1428),
    ] {
        let p = sample_packet(v6, tcp, payload);
        let h = kernel_header(&p, gso).to_bytes();
        assert!(vnet::build(&h, &p).is_ok(), "{name} is on the allow-list");
        g.bench_function(format!("build/{name}"), |b| b.iter(|| vnet::build(black_box(&h), black_box(&p))));
    }
    g.finish();

    let mut g = c.benchmark_group("checksum");
    for payload in [12, 1348, 65_000] {
        let mut p = sample_packet(false, true, payload);
        let h = kernel_header(&p, 0).to_bytes();
        g.throughput(Throughput::Bytes(p.len() as u64));
        g.bench_function(BenchmarkId::new("complete", p.len()), |b| b.iter(|| vnet::complete_checksum(black_box(&h), black_box(&mut p))));
    }
    for v6 in [false, true] {
        let p = sample_packet(v6, true, 65_000);
        let h = kernel_header(&p, 1448).to_bytes();
        let mut s = Segmenter::new();
        g.throughput(Throughput::Bytes(p.len() as u64));
        g.bench_function(format!("segment/{}", if v6 { "tcp6" } else { "tcp4" }), |b| {
            b.iter(|| {
                let mut bytes = 0;
                let n = s.segments(Some(&h), black_box(&p), |seg| bytes += seg.len()).expect("a valid super-packet");
                black_box((n, bytes))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = v1_encode, v1_decode, ioppytest_json, serial, offload
}
criterion_main!(benches);
