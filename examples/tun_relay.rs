//! `tun_relay`: the userspace-TUN limit that `perf/run.py` measures tunbus against.
//!
//! Two TUN devices, each moved into its own network namespace, and two threads copying
//! packets A→B and B→A: the least any TUN-based tunnel must do (one `read` and one `writev`
//! per packet), with no broker, no batching and no encoding in between. With offloads the
//! reads return `virtio_net_hdr` + super-packets of up to 64 KiB, which are written whole on
//! the other side; with `--no-offload` the header is still there (all zeros) and the code
//! path is the same, but every packet is at most one MTU.
//!
//! ```text
//! tun_relay --ns-a NS --ns-b NS --addr-a 198.19.1.1/24 --addr-b 198.19.1.2/24
//!           [--no-offload] [--mtu 9000] [--seconds N]
//! ```
//!
//! Runs for `--seconds N`, or until its standard input closes (the benchmark holds a pipe
//! and closes it); SIGINT/SIGTERM also end it, and the kernel removes both devices when
//! their file descriptors close. On a clean end it prints one JSON line of counters.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tunbus::codec::vnet;
use tunbus::route::Prefix;
use tunbus::tun::{netns, TunDevice, TunQueue};

struct Args {
    ns_a: String,
    ns_b: String,
    addr_a: Prefix,
    addr_b: Prefix,
    offload: bool,
    mtu: u32,
    seconds: Option<f64>,
}

const USAGE: &str = "usage: tun_relay --ns-a NS --ns-b NS --addr-a ADDR/LEN --addr-b ADDR/LEN \
[--no-offload] [--mtu BYTES] [--seconds N]";

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut ns_a, mut ns_b, mut addr_a, mut addr_b) = (None, None, None, None);
    let (mut offload, mut mtu, mut seconds) = (true, 9000u32, None);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--ns-a" => ns_a = Some(value()?),
            "--ns-b" => ns_b = Some(value()?),
            "--addr-a" => addr_a = Some(value()?.parse::<Prefix>().map_err(anyhow::Error::msg)?),
            "--addr-b" => addr_b = Some(value()?.parse::<Prefix>().map_err(anyhow::Error::msg)?),
            "--mtu" => mtu = value()?.parse().context("--mtu")?,
            "--seconds" => seconds = Some(value()?.parse::<f64>().context("--seconds")?),
            "--no-offload" => offload = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    match (ns_a, ns_b, addr_a, addr_b) {
        (Some(ns_a), Some(ns_b), Some(addr_a), Some(addr_b)) => Ok(Args { ns_a, ns_b, addr_a, addr_b, offload, mtu, seconds }),
        _ => bail!("--ns-a, --ns-b, --addr-a and --addr-b are required\n{USAGE}"),
    }
}

/// What one direction did.
#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    wakeups: AtomicU64,
    write_errors: AtomicU64,
    bad_headers: AtomicU64,
}

/// Copies every packet readable on `from` into `to` until `stop`.
fn relay(from: &TunQueue, to: &TunQueue, stop: &AtomicBool, c: &Counters) {
    // One read buffer, allocated once: vnet header + the largest super-packet.
    let mut buf = vec![0u8; vnet::HDR_LEN + 65_536];
    while !stop.load(Ordering::Relaxed) {
        match from.wait_readable(Duration::from_millis(100)) {
            Ok(tunbus::tun::Readiness::Readable) => {}
            Ok(tunbus::tun::Readiness::TimedOut) => continue,
            Err(_) => return, // the device is gone
        }
        c.wakeups.fetch_add(1, Ordering::Relaxed);
        let (mut packets, mut bytes) = (0u64, 0u64);
        // Drain what is ready, a bounded number per wake-up so the stop flag stays responsive.
        for _ in 0..1024 {
            let n = match from.read(&mut buf) {
                Ok(Some(n)) if n > vnet::HDR_LEN => n,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            };
            let (hdr, packet) = buf[..n].split_at(vnet::HDR_LEN);
            let hdr: &[u8; vnet::HDR_LEN] = hdr.try_into().expect("split_at(HDR_LEN) gives HDR_LEN bytes");
            let hdr = match vnet::build(hdr, packet) {
                Ok(h) => h,
                Err(_) => {
                    c.bad_headers.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            if to.write(&hdr, packet).is_err() {
                c.write_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            packets += 1;
            bytes += packet.len() as u64;
        }
        c.packets.fetch_add(packets, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

fn create(ns: &str, addr: Prefix, mtu: u32, offload: bool, tag: &str) -> anyhow::Result<TunDevice> {
    let temp = format!("trly{}{tag}", std::process::id());
    let dev = TunDevice::create(&temp, 1, offload).with_context(|| format!("creating TUN {temp}"))?;
    if let Err(e) = netns::move_into(&temp, ns, "relay0").and_then(|()| {
        // A distinct link-local per side (the relay joins two one-host "links").
        let ll = if tag == "a" { "fe80::a" } else { "fe80::b" };
        netns::configure(Some(ns), "relay0", mtu, &[addr], ll.parse().expect("constant address"), 0)
    }) {
        netns::delete(Some(ns), "relay0");
        return Err(e).with_context(|| format!("moving {temp} into namespace {ns}"));
    }
    Ok(dev)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let a = create(&args.ns_a, args.addr_a, args.mtu, args.offload, "a")?;
    let b = create(&args.ns_b, args.addr_b, args.mtu, args.offload, "b")?;
    let qa = Arc::new(a.queues.into_iter().next().context("device A has no queue")?);
    let qb = Arc::new(b.queues.into_iter().next().context("device B has no queue")?);
    let stop = Arc::new(AtomicBool::new(false));
    let (ab, ba) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
    let started = Instant::now();

    let threads = [(qa.clone(), qb.clone(), ab.clone()), (qb.clone(), qa.clone(), ba.clone())].map(|(from, to, c)| {
        let stop = stop.clone();
        std::thread::spawn(move || relay(&from, &to, &stop, &c))
    });
    eprintln!(
        "tun_relay: {} ({}) <-> {} ({}), offload {} (tso {}, uso {})",
        args.ns_a, args.addr_a, args.ns_b, args.addr_b, args.offload, a.offloads.tso, a.offloads.uso
    );

    match args.seconds {
        Some(s) => std::thread::sleep(Duration::from_secs_f64(s.max(0.0))),
        None => {
            // Until the parent closes our stdin (EOF) or it errors.
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let json = |c: &Counters| {
        let p = c.packets.load(Ordering::Relaxed);
        let w = c.wakeups.load(Ordering::Relaxed).max(1);
        serde_json::json!({
            "packets": p,
            "bytes": c.bytes.load(Ordering::Relaxed),
            "wakeups": c.wakeups.load(Ordering::Relaxed),
            "packets_per_wakeup": p as f64 / w as f64,
            "write_errors": c.write_errors.load(Ordering::Relaxed),
            "bad_headers": c.bad_headers.load(Ordering::Relaxed),
        })
    };
    println!(
        "{}",
        serde_json::json!({
            "offload": args.offload,
            "tso": a.offloads.tso,
            "uso": a.offloads.uso,
            "seconds": elapsed,
            "a_to_b": json(&ab),
            "b_to_a": json(&ba),
        })
    );
    Ok(())
}
