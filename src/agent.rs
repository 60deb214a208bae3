//! One agent's life: join the bus (the first data connection is opened before anything is
//! created on this host, so a wrong password, an unknown vhost, a TLS failure or a taken
//! name ends the start with its own exit code and leaves nothing behind), create and
//! configure the TUN, start one worker per queue (each with its link; worker 0 also
//! announces presence) and the statistics reporter, watch the workers, and take it all
//! down again.
//!
//! [`Agent::start`] runs on a tokio runtime (the reporter, the Prometheus endpoint and the
//! ioppytest control thread's watcher are tasks on it); the queue workers are OS threads,
//! pinned only with `--cpus`. [`Agent::failure`] says when a worker died (the caller then
//! exits non-zero: a queue never dies silently). [`Agent::shutdown`] stops everything
//! within about a second: the workers say goodbye, close their connections (which deletes
//! their queues) and are joined, and the TUN queues close, which removes the interface.
//! Several agents can live in one process (the lab does that); they share nothing but the
//! runtime.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::amqp::client::{self, Client, FailureClass};
use crate::worker::link::LinkContext;
use crate::amqp::presence::{self, Announcements, Hello};
use crate::amqp::BrokerState;
use crate::config::AgentConfig;
use crate::exit::{Exit, Failure};
use crate::metrics::report::{self, Report};
use crate::metrics::kernel::KernelDrops;
use crate::metrics::{AgentCounters, Histograms, RxCounters, TxCounters};
use crate::route::RoutingKey;
use crate::tun::{netns, TunDevice, TunQueue};
use crate::util::{now_ns, Stop};
use crate::identity::{claims::Claims, Trust};
use crate::worker::queue::{QueueWorker, WorkerSetup};

/// How long the start waits for the broker to drop a dead connection that still holds this
/// agent's queue (its heartbeats time it out: 2 × at most 30 s).
const STALE_WAIT: Duration = Duration::from_secs(65);
/// How long a live owner of the name has to answer the probe.
const NAME_PROBE_WAIT: Duration = Duration::from_millis(1500);

/// How long shutdown waits for the links to delete their queues and close.
const CLOSE_GRACE: Duration = Duration::from_millis(1200);
/// How often the kernel's drops on the TUN are read.
const KERNEL_POLL: Duration = Duration::from_secs(1);

/// A running agent.
pub struct Agent {
    config: Arc<AgentConfig>,
    stop_tx: watch::Sender<bool>,
    stop_flag: Stop,
    tasks: JoinSet<()>,
    workers: Vec<JoinHandle<()>>,
    /// Helper threads (the ioppytest control connection), stopped with the agent.
    helpers: Vec<JoinHandle<()>>,
    queues: Vec<Arc<TunQueue>>,
    counters: AgentCounters,
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
    let dev = TunDevice::create(&create_as, c.queues, c.offload).map_err(|e| Failure::new(Exit::Local, e.to_string()))?;
    if let Some(ns) = &c.netns {
        netns::move_into(&create_as, ns, &c.ifname)?; // on error `dev` drops: interface gone
    }
    netns::configure(c.netns.as_deref(), &c.ifname, c.mtu, &c.addrs, c.link_local(), c.router_solicitations)?;
    Ok(dev)
}

/// Opens link 0 before anything is created on this host: what the broker refuses ends the
/// start here, with its exit code. A taken queue name is a live agent of the same name (it
/// answers a probe: exit 8) or a dead connection the broker has not dropped yet (it does
/// within two of its heartbeats: wait for it).
fn join_bus(ctx: &LinkContext, interrupt: &Stop) -> Result<Option<(Client, usize)>, Failure> {
    let c = &ctx.config;
    let started = Instant::now();
    let mut said_stale = false;
    loop {
        let e = match ctx.open(0, client::CONNECT_TIMEOUT) {
            Ok(link) => return Ok(Some(link)),
            Err(client::Error::Stopped) => return Ok(None),
            Err(e) => e,
        };
        if e.class() != FailureClass::Locked {
            let advice = match e.class() {
                FailureClass::Unreachable => " Is RabbitMQ running there? Check --url (host and port).",
                FailureClass::Permission => " The broker user lacks a permission tunbus needs (see docs/security.md).",
                _ => "",
            };
            return Err(Failure::new(Exit::from(e.class()), format!("cannot join the bus: {e}.{advice}")));
        }
        let taken = presence::name_answers(&c.endpoints, &c.exchange, &c.name, NAME_PROBE_WAIT, interrupt).map_err(Failure::from)?;
        if taken {
            return Err(Failure::new(
                Exit::NameInUse,
                format!(
                    "agent name {:?} is already in use on this bus (a live agent holds queue {}); pick another --name{}",
                    c.name,
                    c.queue_name(0),
                    if c.session.is_some() { "" } else { " or a --session" }
                ),
            ));
        }
        if started.elapsed() > STALE_WAIT {
            return Err(Failure::new(
                Exit::NameInUse,
                format!("queue {} is still held by a connection that does not answer, after {} s; the broker will drop it once its heartbeats time out (see `rabbitmqctl list_connections`)", c.queue_name(0), STALE_WAIT.as_secs()),
            ));
        }
        if !said_stale {
            tracing::warn!(agent = %c.name, queue = %c.queue_name(0), "the queue is held by a dead connection (no agent of this name answers); waiting for the broker to drop it");
            said_stale = true;
        }
        for _ in 0..10 {
            if interrupt.is_raised() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Agent {
    /// Brings the agent up. Returns once the interface exists and every task is started
    /// (when `config.check_name`, link 0 is connected first; the other links connect in
    /// the background; traffic flows as soon as they are connected). `Ok(None)` when
    /// `interrupt` was raised during the start.
    pub async fn start(config: AgentConfig, interrupt: &Stop) -> anyhow::Result<Option<Agent>> {
        let config = Arc::new(config);
        // Bind the metrics port first: a bad address must not bring the agent onto the bus.
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Failure::new(Exit::Local, format!("--metrics-addr {addr}: cannot listen: {e}")))?,
            ),
            None => None,
        };
        if RoutingKey::all(&config.name).is_none() {
            bail!("agent name {:?} is not a valid topic word", config.name);
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_flag = Stop::new();
        let broker = Arc::new(BrokerState::default());
        let connected = Arc::new(AtomicUsize::new(0));
        let cpus = config.cpus.clone();
        let peers = Arc::new(crate::route::peers::PeerQueues::new());
        let trust = Trust::new(&config.identity);
        // First claim: queue 0 of a native agent keeps the claims its hellos bring.
        let claims = (config.identity == crate::identity::Mode::FirstClaim && config.wire == crate::config::Wire::Native).then(|| Arc::new(std::sync::Mutex::new(Claims::new())));
        let hello = Hello {
            name: config.name.clone(),
            session: config.session.clone(),
            addresses: config.addrs.iter().map(ToString::to_string).chain([format!("{}/64", config.link_local())]).collect(),
            queues: config.queues,
            wire: config.wire.name().to_owned(),
            started_unix_ms: now_ns() / 1_000_000,
            interface: config.ifname.clone(),
            netns: config.netns.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            node: None,
            leaving: false,
        };
        // Native agents announce themselves on their queue-0 connection (no presence connection).
        let announcements = match config.wire {
            crate::config::Wire::Native => Some(Arc::new(Announcements::new(&hello)?)),
            crate::config::Wire::Ioppytest => None,
        };
        let link_context = |k: usize| LinkContext {
            config: config.clone(),
            index: k,
            broker: broker.clone(),
            connected: connected.clone(),
            hello: if k == 0 { announcements.clone() } else { None },
            stop: stop_flag.clone(),
        };
        let mut first_link = if config.check_name {
            // Connection attempts of the start give up on Ctrl-C.
            let mut ctx = link_context(0);
            ctx.stop = interrupt.clone();
            let joined = tokio::task::spawn_blocking(move || join_bus(&ctx, &ctx.stop)).await.context("the start-up connection thread")??;
            match joined {
                Some(link) => Some(link),
                None => return Ok(None),
            }
        } else {
            None
        };
        if interrupt.is_raised() {
            return Ok(None);
        }
        let dev = bring_up_interface(&config).with_context(|| format!("setting up interface {} for agent {}", config.ifname, config.name))?;
        let mut agent = Agent {
            config: config.clone(),
            stop_tx,
            stop_flag: stop_flag.clone(),
            tasks: JoinSet::new(),
            workers: Vec::new(),
            helpers: Vec::new(),
            queues: Vec::new(),
            counters: AgentCounters::default(),
            hist: Vec::new(),
            connected: connected.clone(),
            started: Instant::now(),
        };
        // Fault injection for the test that a dead worker is never silent (read once).
        let fault_worker_panic = std::env::var("TUNBUS_FAULT").as_deref() == Ok("worker-panic");
        for q in dev.queues {
            let k = q.index();
            let queue = Arc::new(q);
            // Separate blocks for the sending and receiving halves: no shared cache lines.
            let tx_counters = Arc::new(TxCounters::default());
            let rx_counters = Arc::new(RxCounters::default());
            let hist = Histograms::new();
            let link = link_context(k);
            let worker = QueueWorker::new(WorkerSetup {
                queue: queue.clone(),
                link,
                tx_counters: tx_counters.clone(),
                rx_counters: rx_counters.clone(),
                hist: hist.clone(),
                peers: peers.clone(),
                trust: trust.clone(),
                claims: if k == 0 { claims.clone() } else { None },
                connected: if k == 0 { first_link.take() } else { None },
            });
            let core = (!cpus.is_empty()).then(|| cpus[k % cpus.len()]);
            let die = k == 0 && fault_worker_panic;
            let handle = std::thread::Builder::new()
                .name(format!("q-{}-{k}", config.name))
                .spawn(move || {
                    if let Some(id) = core {
                        core_affinity::set_for_current(core_affinity::CoreId { id });
                    }
                    let _span = tracing::debug_span!("queue", queue = k).entered();
                    if die {
                        std::thread::sleep(Duration::from_secs(1));
                        tracing::error!("TUNBUS_FAULT=worker-panic: queue worker 0 dies on purpose");
                        return;
                    }
                    worker.run();
                })
                .context("spawning a queue worker thread")?;
            agent.workers.push(handle);
            agent.queues.push(queue);
            agent.counters.tx.push(tx_counters);
            agent.counters.rx.push(rx_counters);
            agent.hist.push(hist);
        }
        if config.wire == crate::config::Wire::Ioppytest {
            let (c, stop) = (config.clone(), stop_flag.clone());
            let counters = Arc::new(RxCounters::default());
            agent.counters.rx.push(counters.clone());
            agent.helpers.push(
                std::thread::Builder::new()
                    .name(format!("ctl-{}", config.name))
                    .spawn(move || crate::interop::control::run(&c, &stop, counters))
                    .context("spawning the ioppytest control thread")?,
            );
        }
        // The kernel's drops on our TUN (its queue full while a worker was busy), once a second.
        let kernel_counters = Arc::new(TxCounters::default());
        agent.counters.tx.push(kernel_counters.clone());
        match KernelDrops::open(config.netns.as_deref(), &config.ifname) {
            Ok(mut k) => {
                k.refresh(&kernel_counters);
                let mut stop = stop_rx.clone();
                agent.tasks.spawn(async move {
                    let mut tick = tokio::time::interval(KERNEL_POLL);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => { k.refresh(&kernel_counters); }
                            _ = stop.changed() => { k.refresh(&kernel_counters); return; }
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(agent = %config.name, error = %e, "cannot read the kernel's statistics of the interface; its tun_queue_full drops will not be reported"),
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
        Ok(Some(agent))
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// A worker that ended while the agent was not stopping: the agent is broken and must
    /// not pretend to forward (the caller exits with [`Exit::Internal`]).
    pub fn failure(&self) -> Option<String> {
        if self.stop_flag.is_raised() {
            return None;
        }
        self.workers.iter().position(JoinHandle::is_finished).map(|k| format!("queue worker {k} of agent {} died; see the log above", self.config.name))
    }

    /// Whether every link is connected to the broker (queues declared and bound).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) == self.config.queues
    }

    /// Sums of the counters so far (cheap: relaxed loads).
    pub fn totals(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot::of(&self.counters)
    }

    /// The statistics so far.
    pub fn report(&self) -> Report {
        report::build(&self.config.name, self.started.elapsed(), &self.counters, &self.hist)
    }

    /// Stops everything and returns the final statistics. Dropping an `Agent` without
    /// calling this still stops its threads and tasks (see `Drop`), just without waiting.
    pub async fn shutdown(mut self) -> Report {
        let _ = self.stop_tx.send(true);
        self.stop_flag.raise();
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
        for w in self.workers.drain(..).chain(self.helpers.drain(..)) {
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
        self.stop_flag.raise();
        let _ = self.stop_tx.send(true);
    }
}
