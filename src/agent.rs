//! One agent's life: create and configure the TUN, start one worker per queue (each with its
//! link; worker 0 also announces presence) and the statistics reporter, and take it all
//! down again.
//!
//! [`Agent::start`] runs on a tokio runtime (the reporter, the Prometheus endpoint and the
//! ioppytest control messages are tasks on it); the queue workers are OS threads, pinned
//! only with `--cpus`. [`Agent::shutdown`] stops everything within about a second: the
//! workers say goodbye, close their connections (which deletes their queues) and are
//! joined, and the TUN queues close, which removes the interface. Several agents can live
//! in one process (the lab does that); they share nothing but the runtime.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::amqp::link::LinkContext;
use crate::amqp::presence::{Announcements, Hello};
use crate::amqp::BrokerState;
use crate::config::AgentConfig;
use crate::metrics::report::{self, Report};
use crate::metrics::{Counters, Histograms};
use crate::route::RoutingKey;
use crate::tun::{netns, TunDevice, TunQueue};
use crate::worker::queue::QueueWorker;

/// How long shutdown waits for the links to delete their queues and close.
const CLOSE_GRACE: Duration = Duration::from_millis(1200);

/// A running agent.
pub struct Agent {
    config: Arc<AgentConfig>,
    stop_tx: watch::Sender<bool>,
    stop_flag: Arc<AtomicBool>,
    tasks: JoinSet<()>,
    workers: Vec<JoinHandle<()>>,
    queues: Vec<Arc<TunQueue>>,
    counters: Vec<Arc<Counters>>,
    hist: Vec<Arc<Histograms>>,
    connected: Arc<AtomicUsize>,
    started: Instant,
}

/// A name that cannot collide: the device is created under it, then renamed in its namespace.
fn temporary_ifname() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("tbt{:05x}{:03x}", std::process::id() & 0xf_ffff, n & 0xfff)
}

/// Creates the interface and configures it where it belongs.
fn bring_up_interface(c: &AgentConfig) -> anyhow::Result<TunDevice> {
    let create_as = match &c.netns {
        Some(ns) => {
            if !netns::namespace_exists(ns) {
                bail!(netns::Error::NoNamespace(ns.clone()));
            }
            temporary_ifname()
        }
        None => {
            if netns::interface_exists(None, &c.ifname) {
                bail!(netns::Error::Exists { name: c.ifname.clone(), netns: None });
            }
            c.ifname.clone()
        }
    };
    let dev = TunDevice::create(&create_as, c.queues, c.offload)?;
    if let Some(ns) = &c.netns {
        netns::move_into(&create_as, ns, &c.ifname)?; // on error `dev` drops: interface gone
    }
    netns::configure(c.netns.as_deref(), &c.ifname, c.mtu, &c.addrs, c.link_local(), c.router_solicitations)?;
    Ok(dev)
}

impl Agent {
    /// Brings the agent up. Returns once the interface exists and every task is started
    /// (the links connect in the background; traffic flows as soon as they are connected).
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        let config = Arc::new(config);
        // Bind the metrics port first: a bad address must not bring the agent onto the bus.
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}: cannot listen"))?),
            None => None,
        };
        let first_queue = config.queue_name(0);
        if config.check_name && crate::amqp::queue_in_use(&config.url, &first_queue).await.unwrap_or(false) {
            bail!(
                "agent name {:?} is already in use on this bus (queue {first_queue} exists); pick another --name{}",
                config.name,
                if config.session.is_some() { "" } else { " or a --session" }
            );
        }
        let dev = bring_up_interface(&config)
            .with_context(|| format!("setting up interface {} for agent {}", config.ifname, config.name))?;
        let Some(flood_key) = RoutingKey::all(&config.name) else {
            bail!("agent name {:?} is not a valid topic word", config.name);
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_flag = Arc::new(AtomicBool::new(false));
        let broker = Arc::new(BrokerState::default());
        let connected = Arc::new(AtomicUsize::new(0));
        let own_v4: Vec<(Ipv4Addr, u8)> = config
            .addrs
            .iter()
            .filter_map(|p| match p.addr {
                IpAddr::V4(a) => Some((a, p.len)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let cpus = config.cpus.clone();
        let peers = Arc::new(crate::route::peers::PeerQueues::new());
        let mut agent = Agent {
            config: config.clone(),
            stop_tx,
            stop_flag: stop_flag.clone(),
            tasks: JoinSet::new(),
            workers: Vec::new(),
            queues: Vec::new(),
            counters: Vec::new(),
            hist: Vec::new(),
            connected: connected.clone(),
            started: Instant::now(),
        };
        let hello = Hello {
            name: config.name.clone(),
            session: config.session.clone(),
            addresses: config.addrs.iter().map(ToString::to_string).chain([format!("{}/64", config.link_local())]).collect(),
            queues: config.queues,
            wire: config.wire.name().to_owned(),
            started_unix_ms: crate::worker::now_ns() / 1_000_000,
            interface: config.ifname.clone(),
            netns: config.netns.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            leaving: false,
        };
        // Native agents announce themselves on their queue-0 connection (no presence connection).
        let announcements = match config.wire {
            crate::config::Wire::Native => Some(Arc::new(Announcements::new(&hello)?)),
            crate::config::Wire::Ioppytest => None,
        };
        for q in dev.queues {
            let k = q.index();
            let queue = Arc::new(q);
            // Separate blocks for the TX and RX threads: no shared cache lines.
            let tx_counters = Arc::new(Counters::default());
            let rx_counters = Arc::new(Counters::default());
            let hist = Histograms::new();
            let link = LinkContext {
                config: config.clone(),
                index: k,
                broker: broker.clone(),
                connected: connected.clone(),
                hello: if k == 0 { announcements.clone() } else { None },
            };
            let worker = QueueWorker::new(
                queue.clone(),
                link,
                tx_counters.clone(),
                rx_counters.clone(),
                hist.clone(),
                stop_flag.clone(),
                flood_key,
                own_v4.clone(),
                peers.clone(),
            );
            let core = (!cpus.is_empty()).then(|| cpus[k % cpus.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("q-{}-{k}", config.name))
                .spawn(move || {
                    if let Some(id) = core {
                        core_affinity::set_for_current(core_affinity::CoreId { id });
                    }
                    let _span = tracing::debug_span!("queue", queue = k).entered();
                    worker.run();
                })
                .context("spawning a queue worker thread")?;
            agent.workers.push(handle);
            agent.queues.push(queue);
            agent.counters.push(tx_counters);
            agent.counters.push(rx_counters);
            agent.hist.push(hist);
        }
        if config.wire == crate::config::Wire::Ioppytest {
            agent.tasks.spawn(crate::interop::control::run(config.clone(), stop_rx.clone()));
        }
        if let Some(listener) = metrics_listener {
            agent.tasks.spawn(crate::metrics::prometheus::serve(listener, config.name.clone(), agent.counters.clone(), agent.hist.clone(), stop_rx.clone()));
        }
        if !config.stats_interval.is_zero() {
            agent.tasks.spawn(report::periodic(
                config.name.clone(),
                config.stats_interval,
                agent.counters.clone(),
                agent.hist.clone(),
                stop_rx,
            ));
        }
        tracing::info!(
            agent = %config.name,
            interface = %config.ifname,
            netns = config.netns.as_deref().unwrap_or("-"),
            queues = config.queues,
            tso = dev.offloads.tso,
            uso = dev.offloads.uso,
            "agent up"
        );
        Ok(agent)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Whether every link is connected to the broker (queues declared and bound).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) == self.config.queues
    }

    /// Sums of the counters so far (cheap: relaxed loads).
    pub fn totals(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot::sum(self.counters.iter().map(|c| &**c))
    }

    /// The statistics so far.
    pub fn report(&self) -> Report {
        report::build(&self.config.name, self.started.elapsed(), &self.counters, &self.hist)
    }

    /// Stops everything and returns the final statistics. Dropping an `Agent` without
    /// calling this still stops its threads and tasks (see `Drop`), just without waiting.
    pub async fn shutdown(mut self) -> Report {
        let _ = self.stop_tx.send(true);
        self.stop_flag.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(agent = %self.config.name, "links slow to close; aborting them");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        for w in self.workers.drain(..) {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let report = self.report();
        self.queues.clear(); // last references: closing the fds removes the interface
        report
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Workers see the flag within their idle poll (250 ms); dropping the JoinSet aborts the tasks, and
        // the last TUN queue reference goes with them, removing the interface.
        self.stop_flag.store(true, Ordering::Relaxed);
        let _ = self.stop_tx.send(true);
    }
}
