//! `cluster_sim`: what a broker (cluster) pays per agent, without TUNs.
//!
//! Simulated agents, each as a real one-queue agent is on the broker: its own connection
//! (nodes taken round robin), an exclusive queue with the agent's bounds, the wildcard
//! binding of each of its three addresses and the flood binding, and one hello. They are
//! added in steps (`--steps 10,100,1000,10000`); after each step the time to declare the
//! step's agents is printed, the program waits for a line on stdin (so that the caller can
//! measure the nodes' memory), then measures the publish rate to agent 0 (1500-byte
//! messages on its unicast key, consumed by agent 0) with every binding of the step in the
//! exchange. One JSON object per step on stdout.
//!
//! ```text
//! cluster_sim --urls amqp://guest:guest@127.0.0.1:5701/%2f,… [--steps 10,100,1000,10000] [--seconds 3] [--threads 8]
//! ```

use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tunbus::amqp::client::{Client, ConnectOptions, Endpoint, Published};
use tunbus::amqp::session::{Event, QueueOptions};
use tunbus::amqp::wire::{Properties, Value};
use tunbus::route::{self, RoutingKey};

const EXCHANGE: &str = "tunbus.sim";

fn addresses(i: usize) -> [IpAddr; 3] {
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32 + 1);
    let v6 = Ipv6Addr::new(0xfd00, 0x7b, 0, 0, 0, 0, (i >> 16) as u16, (i & 0xffff) as u16 + 1);
    [IpAddr::V4(v4), IpAddr::V6(v6), IpAddr::V6(tunbus::identity::link_local(Some("sim"), &format!("h{i}")))]
}

/// One simulated agent: connection, queue, bindings, hello.
fn agent(endpoints: &[Endpoint], i: usize) -> anyhow::Result<Client> {
    let never = AtomicBool::new(false);
    let mut opts = ConnectOptions::new(format!("sim h{i}"));
    opts.frame_max = Some(8192);
    opts.heartbeat = Duration::ZERO; // nobody ticks these connections
    opts.timeout = Some(Duration::from_secs(30));
    let plan = tunbus::amqp::client::Plan { exchange: EXCHANGE.into(), queue: None };
    let mut c = Client::connect(vec![endpoints[i % endpoints.len()].clone()], &opts, plan, tunbus::amqp::client::Retry::OncePerNode, &never)?;
    let q = format!("tunbus.sim.h{i}.0");
    c.queue_declare(
        &q,
        QueueOptions { exclusive: true, ..QueueOptions::default() },
        &[("x-max-length", Value::I32(4096)), ("x-max-length-bytes", Value::I64(4 << 20))],
        &never,
    )?;
    for a in addresses(i) {
        c.queue_bind(&q, EXCHANGE, &route::unicast_pattern(a), &never)?;
    }
    c.queue_bind(&q, EXCHANGE, route::ALL_PATTERN, &never)?;
    let hello = format!(r#"{{"name":"h{i}","addresses":["{}/15"],"queues":1,"wire":"v1","started_unix_ms":0}}"#, addresses(i)[0]);
    c.publish_copy(EXCHANGE, RoutingKey::hello(&format!("h{i}")).context("name")?.as_str(), &Properties::default(), hello.as_bytes())?;
    Ok(c)
}

/// Messages per second agent 0 receives from one publisher, over `seconds`.
fn publish_rate(endpoints: &[Endpoint], receiver: &mut Client, seconds: f64) -> anyhow::Result<f64> {
    let never = AtomicBool::new(false);
    let mut publisher = Client::open(&endpoints[1 % endpoints.len()], &ConnectOptions::new("sim publisher"), &never)?;
    let key = RoutingKey::unicast(addresses(0)[0], 3);
    let body = vec![0x5au8; 1500];
    let (mut sent, mut got) = (0u64, 0u64);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        while sent - got < 2000 {
            match publisher.publish(Instant::now(), EXCHANGE, key.as_str(), &Properties::default(), &body)? {
                Published::Sent => sent += 1,
                Published::Busy => {
                    publisher.wait_writable(Duration::from_millis(100))?;
                }
                Published::Blocked => bail!("the broker blocked publishing"),
                Published::Down => bail!("lost the broker"),
            }
        }
        receiver.read_some()?;
        while let Some(e) = receiver.next_event(Instant::now())? {
            if let Event::Delivery(_) = e {
                got += 1;
            }
        }
        if sent - got >= 2000 {
            if let Some((fd, _)) = receiver.fd() {
                tunbus::sys::wait_fd(fd, tunbus::sys::Interest::Read, Duration::from_millis(10))?;
            }
        }
    }
    let rate = got as f64 / t0.elapsed().as_secs_f64();
    publisher.close(Duration::from_millis(300));
    // Drain what is still in flight, so the next step starts empty.
    let drain = Instant::now();
    while got < sent && drain.elapsed() < Duration::from_secs(5) {
        receiver.read_some()?;
        while let Some(e) = receiver.next_event(Instant::now())? {
            if let Event::Delivery(_) = e {
                got += 1;
            }
        }
        if let Some((fd, _)) = receiver.fd() {
            tunbus::sys::wait_fd(fd, tunbus::sys::Interest::Read, Duration::from_millis(20))?;
        }
    }
    Ok(rate)
}

fn main() -> anyhow::Result<()> {
    let (mut urls, mut steps, mut seconds, mut threads) = (String::new(), vec![10usize, 100, 1000, 10_000], 3.0f64, 8usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--urls" => urls = value()?,
            "--steps" => steps = value()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
            "--seconds" => seconds = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let endpoints: Vec<Endpoint> = urls.split(',').map(|u| Ok(Endpoint::plain(u.parse()?))).collect::<anyhow::Result<_>>()?;
    if endpoints.is_empty() {
        bail!("--urls is required");
    }
    let most = steps.iter().copied().max().unwrap_or(0);
    tunbus::sys::raise_fd_limit(most as u64 + 1024)?;
    let never = AtomicBool::new(false);
    let mut agents: Vec<Client> = Vec::with_capacity(most);
    agents.push(agent(&endpoints, 0)?);
    agents[0].basic_consume("tunbus.sim.h0.0", "", true, true, &never)?;
    let stdin = std::io::stdin();
    for step in steps {
        let t0 = Instant::now();
        let from = agents.len();
        let chunk = (step.saturating_sub(from)).div_ceil(threads.max(1)).max(1);
        let made: Vec<anyhow::Result<Vec<Client>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (from..step)
                .step_by(chunk)
                .map(|start| {
                    let endpoints = &endpoints;
                    s.spawn(move || (start..(start + chunk).min(step)).map(|i| agent(endpoints, i)).collect::<anyhow::Result<Vec<_>>>())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))).collect()
        });
        for m in made {
            agents.extend(m?);
        }
        let declare_s = t0.elapsed().as_secs_f64();
        println!("{}", serde_json::json!({ "phase": "declared", "agents": agents.len(), "declare_s": declare_s, "new": step.saturating_sub(from) }));
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?; // the caller measures memory now
        let rate = publish_rate(&endpoints, &mut agents[0], seconds)?;
        println!("{}", serde_json::json!({ "phase": "published", "agents": agents.len(), "bindings": agents.len() * 4, "msg_per_s": rate }));
    }
    for c in agents {
        drop(c); // closing 10 000 connections politely takes minutes; the sockets just close
    }
    Ok(())
}
