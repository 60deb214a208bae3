//! Memory of idle userspace endpoints: builds N (10,000 by default) endpoints in one
//! `UserspacePort` and prints the heap they hold (a counting allocator) and, on Linux, the
//! growth of the resident set; then pings a sample of them from a second port.
//!
//! `cargo run --release --example userspace_endpoints -- [N]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tunbus::codec::v1::VNET_HDR_LEN;
use tunbus::port::userspace::{EndpointConfig, Limits, PortConfig, Services, UserspacePort};
use tunbus::port::Port;

struct Counting;

static HELD: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to `System` unchanged and counts bytes in an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Resident set in bytes (Linux; `None` elsewhere).
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn endpoint(i: u32) -> EndpointConfig {
    EndpointConfig {
        name: format!("h{i}"),
        addrs: vec![
            format!("198.18.{}.{}/15", (i >> 8) & 0xff, i & 0xff).parse().unwrap_or_else(|e| panic!("{e}")),
            format!("fd00:7b::{i:x}/64").parse().unwrap_or_else(|e| panic!("{e}")),
        ],
        link_local: format!("fe80::7b:{i:x}").parse().unwrap_or_else(|e| panic!("{e}")),
        services: Services::default(),
    }
}

fn main() {
    let n: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    assert!((1..65535).contains(&n), "N in 1..65535");
    let t0 = Instant::now();
    let config = |seed| PortConfig { index: 0, seed, limits: Limits::default() };
    let mut probe = UserspacePort::new(config(1), t0).expect("port");
    let a = probe.add_endpoint(endpoint(65535), t0).expect("probe endpoint");
    let (heap0, rss0) = (HELD.load(Ordering::Relaxed), rss());
    let mut port = UserspacePort::new(config(2), t0).expect("port");
    let fixed = port.fixed_footprint();
    let (heap1, rss1) = (HELD.load(Ordering::Relaxed), rss());
    let started = Instant::now();
    for i in 1..=n {
        port.add_endpoint(endpoint(i), t0).expect("endpoint");
    }
    let took = started.elapsed();
    let (heap2, rss2) = (HELD.load(Ordering::Relaxed), rss());
    let per = (heap2 - heap1) as f64 / f64::from(n);
    println!("port: {} KiB fixed (rings, scratch), {} KiB heap", fixed / 1024, (heap1 - heap0) / 1024);
    println!("{n} idle endpoints in {took:.2?}: {per:.0} bytes of heap per endpoint ({:.4} MiB)", per / 1048576.0);
    if let (Some(r0), Some(r1), Some(r2)) = (rss0, rss1, rss2) {
        println!("resident set: +{} KiB for the port, +{:.0} bytes per endpoint", r1.saturating_sub(r0) / 1024, r2.saturating_sub(r1) as f64 / f64::from(n));
    }
    // A sample answers: 200 pings from the probe, moved by hand.
    let mut buf = vec![0u8; 65536 + VNET_HDR_LEN];
    let mut now = t0;
    let sample: Vec<u32> = (1..=n).step_by((n as usize / 200).max(1)).collect();
    for (seq, &i) in sample.iter().enumerate() {
        now += Duration::from_millis(1);
        let dst: IpAddr = format!("198.18.{}.{}", (i >> 8) & 0xff, i & 0xff).parse().unwrap_or_else(|e| panic!("{e}"));
        probe.ping(a, dst, seq as u16, now).expect("ping");
        for _ in 0..2 {
            probe.poll(now);
            port.poll(now);
            while let Ok(Some(len)) = probe.read(&mut buf) {
                let (h, p) = buf[..len].split_at(VNET_HDR_LEN);
                let _ = port.write(h.try_into().expect("10 bytes"), p);
            }
            port.poll(now);
            while let Ok(Some(len)) = port.read(&mut buf) {
                let (h, p) = buf[..len].split_at(VNET_HDR_LEN);
                let _ = probe.write(h.try_into().expect("10 bytes"), p);
            }
        }
    }
    probe.poll(now);
    println!("pings: {} of {} sampled endpoints answered", probe.ping_replies().count(), sample.len());
    println!(
        "sizes: Interface {} B, tcp::Socket {} B (+ 2 buffers of {} KiB), udp::Socket {} B (+ 2 buffers of {} KiB)",
        std::mem::size_of::<smoltcp::iface::Interface>(),
        std::mem::size_of::<smoltcp::socket::tcp::Socket>(),
        Limits::default().tcp_buffer / 1024,
        std::mem::size_of::<smoltcp::socket::udp::Socket>(),
        Limits::default().udp_buffer / 1024,
    );
}
