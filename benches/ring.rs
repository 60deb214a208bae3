//! Ring micro benchmarks: the hand-off of finished batches from a TX worker to its
//! publisher, and of their buffers back.
//!
//! One element is one batch: take a free buffer, push it as a batch, pop it, drop the lease
//! (which returns the buffer). The ring is sized as the agent sizes it (32 slots,
//! `MAX_OPEN + 2` spare buffers); buffers are small because their contents are never
//! touched here. Nobody awaits `Ring::ready`, so `push` only stores a `Notify` permit.
//!
//! Run: `cargo bench --bench ring`.

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tunbus::ring::{OutBatch, Ring};
use tunbus::route::RoutingKey;
use tunbus::worker::tx::MAX_OPEN;

const SLOTS: usize = 32;
const BUFFER_BYTES: usize = 4096;

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
}

/// Waits a little: spins first, then yields the core (on 2 cores under load a spinning
/// thread would otherwise burn the time slice the other side needs).
fn backoff(step: &mut u32) {
    if *step < 64 {
        spin_loop();
        *step += 1;
    } else {
        thread::yield_now();
    }
}

fn batch(writer: tunbus::codec::v1::BatchWriter, key: RoutingKey) -> OutBatch {
    OutBatch { writer, key, packets: 1, bytes: 64, read_ns: 0 }
}

/// Single thread: take, push, pop, drop, with the ring otherwise empty.
fn round_trip(c: &mut Criterion) {
    let ring = Ring::new(SLOTS, MAX_OPEN + 2, BUFFER_BYTES);
    let key = RoutingKey::all("bench").expect("valid word");
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("round_trip", |b| {
        b.iter(|| {
            let w = ring.take_buffer().expect("a free buffer");
            if ring.push(batch(w, key)).is_err() {
                unreachable!("the ring is empty between iterations");
            }
            let leased = ring.pop().expect("the batch just pushed");
            black_box(leased.packets);
        })
    });
    g.finish();
}

/// Two threads, as in the agent: a producer (worker) takes buffers and pushes batches, a
/// consumer (publisher) pops them and drops the leases. Both busy-wait ([`backoff`]) rather
/// than sleep, so this is the ring's throughput limit, not a latency figure. On a 2-core
/// machine each thread has a core to itself only while nothing else runs.
fn two_threads(c: &mut Criterion) {
    let ring = Ring::new(SLOTS, MAX_OPEN + 2, BUFFER_BYTES);
    let key = RoutingKey::all("bench").expect("valid word");
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("two_threads", |b| {
        b.iter_custom(|iters| {
            std::thread::scope(|s| {
                let t0 = Instant::now();
                s.spawn(|| {
                    for _ in 0..iters {
                        let mut step = 0;
                        let mut w = loop {
                            match ring.take_buffer() {
                                Some(w) => break w,
                                None => backoff(&mut step),
                            }
                        };
                        loop {
                            match ring.push(batch(w, key)) {
                                Ok(()) => break,
                                Err(back) => {
                                    w = back.writer;
                                    backoff(&mut step);
                                }
                            }
                        }
                    }
                });
                let (mut got, mut step) = (0, 0);
                while got < iters {
                    match ring.pop() {
                        Some(leased) => {
                            black_box(leased.packets);
                            got += 1;
                            step = 0;
                        }
                        None => backoff(&mut step),
                    }
                }
                t0.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = round_trip, two_threads
}
criterion_main!(benches);
