//! Zero allocations per packet on the steady-state TX and RX paths (STYLE.md, "The hot
//! path"), measured on real TUN devices in a namespace.
//!
//! A counting global allocator wraps `System`. A thread opts in by naming the [`Tally`] its
//! allocations go to, and a tally counts only while armed, so the test harness, the traffic
//! generator, the stand-in publisher and the start-up of the code under test allocate
//! freely. Each test warms its path up (buffers circulate, lazy state is initialised), arms
//! its tally, pushes well over 10 000 packets through, disarms, and asserts that nothing was
//! allocated. The first counted allocation keeps its backtrace, so a failure names the
//! line of the hot path that allocated.
//!
//! - TX: a `TxWorker` on its own thread reads UDP datagrams that a socket in the namespace
//!   sends out of the TUN, batches them and hands the batches to a consumer thread that
//!   plays the publisher (it drops the lease, which returns the buffer).
//! - RX: `worker::rx::deliver` writes valid v1 frames (vnet headers, checksummed IPv4 UDP
//!   packets to the namespace's own address) into the TUN queue.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{in_netns, system_ready, unique, Netns};
use tunbus::codec::v1::{self, BatchWriter};
use tunbus::metrics::{new_histogram, Counters, DropReason, LocalHistogram};
use tunbus::ring::Ring;
use tunbus::route::RoutingKey;
use tunbus::tun::{netns, vnet, TunDevice, TunQueue};
use tunbus::worker::{now_ns, rx, tx};

// ---------------------------------------------------------------------------------------
// The counting allocator.

/// Allocation counts of one path under test.
struct Tally {
    armed: AtomicBool,
    allocs: AtomicU64,
    reallocs: AtomicU64,
    frees: AtomicU64,
    bytes: AtomicU64,
    /// What the first counted allocation was, with its backtrace.
    first: Mutex<Option<String>>,
}

impl Tally {
    const fn new() -> Tally {
        Tally {
            armed: AtomicBool::new(false),
            allocs: AtomicU64::new(0),
            reallocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            first: Mutex::new(None),
        }
    }

    /// Zeroes the counts and starts counting.
    fn arm(&self) {
        for c in [&self.allocs, &self.reallocs, &self.frees, &self.bytes] {
            c.store(0, Ordering::SeqCst);
        }
        *self.first.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.armed.store(true, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    fn report(&self) -> Report {
        Report {
            allocs: self.allocs.load(Ordering::SeqCst),
            reallocs: self.reallocs.load(Ordering::SeqCst),
            frees: self.frees.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            first: self.first.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

#[derive(Debug)]
struct Report {
    allocs: u64,
    reallocs: u64,
    frees: u64,
    bytes: u64,
    first: Option<String>,
}

impl Report {
    /// Fails the test, naming the first allocation, unless nothing was (re)allocated.
    fn assert_none(&self, path: &str, packets: u64) {
        assert!(
            self.allocs == 0 && self.reallocs == 0,
            "{path}: the steady-state hot path allocated: {} allocations and {} reallocations \
             ({} bytes, {} frees) over {packets} packets.\nFirst one: {}",
            self.allocs,
            self.reallocs,
            self.bytes,
            self.frees,
            self.first.as_deref().unwrap_or("(no backtrace)"),
        );
    }
}

thread_local! {
    /// The tally this thread's allocations go to, if it opted in.
    static TALLY: Cell<Option<&'static Tally>> = const { Cell::new(None) };
}

/// Sends this thread's allocations to `tally` (counted while it is armed).
fn count_on_this_thread(tally: &'static Tally) {
    TALLY.with(|t| t.set(Some(tally)));
}

fn stop_counting_on_this_thread() {
    TALLY.with(|t| t.set(None));
}

#[derive(Clone, Copy)]
enum Kind {
    Alloc,
    Realloc,
    Free,
}

/// Books one allocator call. Never allocates itself except to describe the first counted
/// allocation, during which this thread's counting is switched off.
fn note(kind: Kind, size: usize) {
    let Some(tally) = TALLY.try_with(Cell::get).ok().flatten() else {
        return;
    };
    if !tally.armed.load(Ordering::Relaxed) {
        return;
    }
    let counter = match kind {
        Kind::Alloc => &tally.allocs,
        Kind::Realloc => &tally.reallocs,
        Kind::Free => {
            tally.frees.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    tally.bytes.fetch_add(size as u64, Ordering::Relaxed);
    if counter.fetch_add(1, Ordering::Relaxed) == 0 {
        TALLY.with(|t| t.set(None));
        let what = match kind {
            Kind::Alloc => "allocation",
            _ => "reallocation",
        };
        let text = format!("{what} of {size} bytes at\n{}", Backtrace::force_capture());
        if let Ok(mut first) = tally.first.lock() {
            first.get_or_insert(text);
        }
        TALLY.with(|t| t.set(Some(tally)));
    }
}

struct Counting;

// SAFETY: every method forwards its arguments unchanged to `System`, so `System`'s
// guarantees are ours; the bookkeeping in `note` touches only atomics and a thread-local
// `Cell` (const-initialised, no destructor), and allocates only with counting switched off.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(Kind::Alloc, layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(Kind::Alloc, layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(Kind::Realloc, new_size);
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(Kind::Free, layout.size());
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

static TX: Tally = Tally::new();
static RX: Tally = Tally::new();

// ---------------------------------------------------------------------------------------
// Helpers.

/// A one-queue TUN device with offloads, moved into `ns` as `tb0` with address `addr`.
fn tun_in(ns: &Netns, addr: &str) -> TunQueue {
    let name = unique("tbna");
    let mut dev = TunDevice::create(&name, 1, true).expect("create TUN device");
    netns::move_into(&name, &ns.name, "tb0").expect("move TUN into the namespace");
    let prefix = addr.parse().expect("valid prefix");
    netns::configure(Some(&ns.name), "tb0", 9000, &[prefix], "fe80::99".parse().expect("constant"), 0)
        .expect("configure tb0");
    dev.queues.pop().expect("the device has one queue")
}

/// Packets `tb0` in `ns` has received (from the namespace's `/proc/net/dev`).
fn tb0_rx_packets(ns: &Netns) -> u64 {
    let out = ns.exec(&["cat", "/proc/net/dev"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("tb0:"))
        .and_then(|fields| fields.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no tb0 in the namespace's /proc/net/dev:\n{text}"))
}

/// Sets a stop flag when dropped, so a failing test does not leave its threads running.
struct RaiseOnDrop(Arc<AtomicBool>);

impl Drop for RaiseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Waits until `value()` has not changed for `quiet`, or `limit` passes.
fn settle(value: &impl Fn() -> u64, quiet: Duration, limit: Duration) {
    let t0 = Instant::now();
    let mut last = value();
    let mut since = Instant::now();
    while t0.elapsed() < limit {
        thread::sleep(Duration::from_millis(20));
        let v = value();
        if v != last {
            last = v;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
    }
}

/// Sends UDP datagrams from inside `ns` to `dst`, runs of 100 at each IP packet size in
/// `sizes` in turn, until `enough()` (checked between runs) or `limit` passes; returns how
/// many the kernel accepted. The TUN drops what its reader does not keep up with, so the
/// caller stops on what was read, not on what was sent.
fn send_udp_until(
    ns: &str,
    dst: SocketAddr,
    sizes: &'static [usize],
    enough: impl Fn() -> bool + Send + 'static,
    limit: Duration,
) -> u64 {
    in_netns(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind UDP socket");
        sock.connect(dst).expect("connect UDP socket");
        let payloads: Vec<Vec<u8>> = sizes.iter().map(|&size| vec![0x5a; size - 28]).collect(); // 20-byte IPv4 + 8-byte UDP header
        let t0 = Instant::now();
        let mut sent = 0;
        'send: while t0.elapsed() < limit {
            for payload in &payloads {
                if enough() {
                    break 'send;
                }
                for _ in 0..100 {
                    if sock.send(payload).is_ok() {
                        sent += 1;
                    }
                }
            }
        }
        sent
    })
    .join()
    .expect("UDP sender")
}

/// An IPv4 UDP packet of `len` bytes from `src` to `dst` port 9, header checksum set.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = p[..20].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    // UDP checksum 0: none (allowed for IPv4).
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn tx_worker_steady_state_does_not_allocate() {
    if !system_ready("tx_worker_steady_state_does_not_allocate") {
        return;
    }
    const WARM_UP: u64 = 10_000;
    const PACKETS: u64 = 100_000;
    // Declared first, dropped last: the device goes before its namespace.
    let ns = Netns::new();
    let queue = Arc::new(tun_in(&ns, "198.18.99.1/24"));
    let ring = Arc::new(Ring::new(32, tx::MAX_OPEN + 2, 256 * 1024));
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_worker = RaiseOnDrop(stop.clone());
    let flood = RoutingKey::all("t").expect("valid word");
    let worker = tx::TxWorker::new(queue.clone(), ring.clone(), counters.clone(), stop.clone(), flood, Vec::new());
    let worker = thread::spawn(move || {
        count_on_this_thread(&TX);
        worker.run();
        stop_counting_on_this_thread();
    });

    // The publisher's stand-in: pops batches, checks they decode, drops the leases.
    let popped = Arc::new(AtomicU64::new(0));
    let batches = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let _stop_consumer = RaiseOnDrop(consumer_stop.clone());
    let consumer = {
        let (ring, popped, batches, bad, consumer_stop) =
            (ring.clone(), popped.clone(), batches.clone(), bad.clone(), consumer_stop.clone());
        thread::spawn(move || {
            while !consumer_stop.load(Ordering::Relaxed) {
                let Some(batch) = ring.pop() else {
                    thread::yield_now();
                    continue;
                };
                let ok = v1::decode(batch.writer.as_bytes()).is_ok_and(|f| f.len() == batch.packets as usize);
                if !ok {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                popped.fetch_add(u64::from(batch.packets), Ordering::Relaxed);
                batches.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let dst: SocketAddr = "198.18.99.2:9".parse().expect("valid address");
    let packets = {
        let popped = popped.clone();
        move || popped.load(Ordering::Relaxed)
    };
    // Warm-up: every buffer goes round the ring several times.
    let warm_until = {
        let packets = packets.clone();
        move || packets() >= WARM_UP
    };
    send_udp_until(&ns.name, dst, &[64, 1400], warm_until, Duration::from_secs(10));
    settle(&packets, Duration::from_millis(200), Duration::from_secs(5));
    let warm = packets();
    assert!(
        warm >= WARM_UP,
        "the worker read only {warm} packets during warm-up; drops: {:?}",
        counters.snapshot().drops
    );

    let (p0, b0) = (packets(), batches.load(Ordering::Relaxed));
    TX.arm();
    let measure_until = {
        let packets = packets.clone();
        move || packets() >= p0 + PACKETS
    };
    let sent = send_udp_until(&ns.name, dst, &[64, 1400], measure_until, Duration::from_secs(20));
    settle(&packets, Duration::from_millis(200), Duration::from_secs(10));
    TX.disarm();
    let read = packets() - p0;
    let batch_count = batches.load(Ordering::Relaxed) - b0;

    stop.store(true, Ordering::Relaxed);
    worker.join().expect("TX worker thread");
    consumer_stop.store(true, Ordering::Relaxed);
    consumer.join().expect("consumer thread");

    let report = TX.report();
    let snap = counters.snapshot();
    eprintln!(
        "tx: {} allocations, {} reallocations, {} frees over {read} packets in {batch_count} batches \
         ({sent} sent; drops: no_buffer {}, ring_full {}, not_ip {})",
        report.allocs,
        report.reallocs,
        report.frees,
        snap.dropped(DropReason::NoBuffer),
        snap.dropped(DropReason::RingFull),
        snap.dropped(DropReason::NotIp),
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "some batches did not decode or miscounted their packets");
    assert!(read >= PACKETS, "the worker read only {read} of {sent} packets while measured");
    report.assert_none("TX worker", read);
}

#[test]
fn rx_deliver_steady_state_does_not_allocate() {
    if !system_ready("rx_deliver_steady_state_does_not_allocate") {
        return;
    }
    const PACKETS: u64 = 100_000;
    let ns = Netns::new();
    let queue = Arc::new(tun_in(&ns, "198.18.98.1/24"));
    let (own, peer) = (Ipv4Addr::new(198, 18, 98, 1), Ipv4Addr::new(198, 18, 98, 2));

    // Two frames as a peer's TX worker would send them: vnet headers, 64 and 1400 bytes.
    let frames: Vec<Vec<u8>> = [(64, 128), (1400, 64)]
        .iter()
        .map(|&(size, count)| {
            let pkt = ipv4_udp(peer, own, size);
            let mut w = BatchWriter::with_capacity(256 * 1024);
            w.reset(v1::FLAG_VNET);
            for _ in 0..count {
                w.push(Some(&vnet::PLAIN), &pkt).expect("packet fits the batch");
            }
            w.finish(1, now_ns()).to_vec()
        })
        .collect();
    let per_round: u64 = frames.iter().map(|f| v1::decode(f).expect("valid frame").len() as u64).sum();

    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Mutex::new(new_histogram()));
    let rx_before = tb0_rx_packets(&ns);
    let delivered = {
        let (counters, queue) = (counters.clone(), queue.clone());
        thread::spawn(move || {
            let mut latency = LocalHistogram::new(shared);
            let round = |latency: &mut LocalHistogram| -> u64 {
                frames.iter().map(|f| rx::deliver(f, &queue, &counters, latency, now_ns())).sum()
            };
            for _ in 0..20 {
                round(&mut latency);
            }
            count_on_this_thread(&RX);
            RX.arm();
            let mut written = 0;
            let mut rounds = 0;
            while written < PACKETS && rounds < 2 * PACKETS / per_round {
                written += round(&mut latency);
                rounds += 1;
            }
            RX.disarm();
            stop_counting_on_this_thread();
            (written, rounds * per_round)
        })
        .join()
        .expect("RX thread")
    };
    let (written, offered) = delivered;
    let rx_after = tb0_rx_packets(&ns);

    let report = RX.report();
    let snap = counters.snapshot();
    eprintln!(
        "rx: {} allocations, {} reallocations, {} frees over {written} packets written of {offered} \
         (tb0 rx_packets +{}; drops: tun_write {}, bad_vnet {}, malformed {})",
        report.allocs,
        report.reallocs,
        report.frees,
        rx_after - rx_before,
        snap.dropped(DropReason::TunWrite),
        snap.dropped(DropReason::BadVnet),
        snap.dropped(DropReason::Malformed),
    );
    assert!(written >= PACKETS, "only {written} of {offered} packets were written into the TUN: {snap:?}");
    assert!(
        rx_after - rx_before >= written,
        "tb0 counted {} received packets, deliver wrote {written}",
        rx_after - rx_before
    );
    report.assert_none("RX deliver", written);
}
