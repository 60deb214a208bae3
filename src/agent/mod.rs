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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::amqp::client::{self, Client, FailureClass, Retry};
use crate::amqp::presence::{self, Announcements, Hello};
use crate::amqp::BrokerState;
use crate::config::AgentConfig;
use crate::exit::{Exit, Failure};
use crate::identity::{claims::Claims, Trust};
use crate::metrics::kernel::KernelDrops;
use crate::metrics::report::{self, Report};
use crate::metrics::{AgentCounters, Histograms, RxCounters, TxCounters};
use crate::port::Port;
use crate::status::LinkState;
use crate::tun::netns;
use crate::util::{now_ns, Stop};
use crate::worker::queue::{QueueWorker, WorkerSetup};
use crate::worker::uplink::UplinkContext;

mod ports;
pub mod routing;

/// How long the start waits for the broker to drop a dead connection that still holds this
/// agent's queue (its heartbeats time it out: 2 × at most 30 s).
const STALE_WAIT: Duration = Duration::from_secs(65);
/// How long a live owner of the name has to answer the probe.
const NAME_PROBE_WAIT: Duration = Duration::from_millis(1500);

/// How often the `--emulate-to` peers' hellos are asked for while one is unknown.
pub const LEARN_AGAIN: Duration = Duration::from_secs(2);
/// How often they are asked for once all are known (an agent may come back elsewhere).
pub const LEARN_KNOWN: Duration = Duration::from_secs(30);
/// How long shutdown waits for the links to delete their queues and close.
const CLOSE_GRACE: Duration = Duration::from_millis(1200);
/// How often the kernel's drops on the TUN are read.
const KERNEL_POLL: Duration = Duration::from_secs(1);

/// End-to-end encryption's state when `--e2e` is on: the agent's key, and each peer of the
/// peers file with its key (said once at start: which peers have none and are refused).
fn end_to_end(config: &AgentConfig) -> anyhow::Result<Option<Arc<crate::e2e::E2e>>> {
    use crate::e2e::{keys::PrivateKey, keys::PublicKey, E2e, Limits, PeerSpec};
    let Some(keys) = config.e2e() else { return Ok(None) };
    let session = config.bus().session.as_deref();
    let private = PrivateKey::from_bytes(keys.private_key);
    let table = match &config.identity().mode {
        crate::identity::Mode::Strict(table) => table,
        crate::identity::Mode::FirstClaim => {
            let e2e = E2e::first_use(private, config.name().as_str(), session, Limits::default()).map_err(|e| Failure::new(Exit::Local, e))?;
            tracing::info!(agent = %config.name(), public_key = %e2e.public_key(), "end-to-end encryption on, peers' keys pinned on first use from their hellos (no peers file): batches are sealed for their receivers, nothing in clear is accepted");
            return Ok(Some(Arc::new(with_key_log(e2e, config)?)));
        }
        crate::identity::Mode::Off => return Ok(None), // refused by the configuration's check
    };
    let peers: Vec<PeerSpec> = table
        .users()
        .map(|(user, prefixes)| PeerSpec {
            user: user.to_owned(),
            name: crate::identity::agent_of_user(session, user).to_owned(),
            key: keys.peer_keys.iter().find(|(u, _)| u == user).map(|(_, k)| PublicKey(*k)),
            prefixes: prefixes.to_vec(),
        })
        .collect();
    let own = &config.identity().user;
    if let Some((_, k)) = keys.peer_keys.iter().find(|(u, _)| u == own) {
        if *k != private.public().0 {
            return Err(Failure::new(
                Exit::Usage,
                format!(
                    "--e2e: the peers file gives user {own} another public key than --private-key's ({}): the wrong key file, or a stale peers file",
                    private.public()
                ),
            )
            .into());
        }
    }
    let e2e = E2e::new(private, own, session, peers, Limits::default()).map_err(|e| Failure::new(Exit::Local, e))?;
    let e2e = with_key_log(e2e, config)?;
    let without = e2e.peers_without_keys();
    tracing::info!(agent = %config.name(), public_key = %e2e.public_key(), peers = e2e.peers_with_keys(), "end-to-end encryption on: batches are sealed for their receivers, nothing in clear is accepted");
    if !without.is_empty() {
        tracing::warn!(users = %without.join(","), "end-to-end encryption: these peers have no key in the peers file, their traffic is refused both ways");
    }
    Ok(Some(Arc::new(e2e)))
}

/// `--e2e-key-log`: the session keys noted where captures can read them (warned).
fn with_key_log(e2e: crate::e2e::E2e, config: &AgentConfig) -> anyhow::Result<crate::e2e::E2e> {
    let Some(path) = config.e2e().and_then(|k| k.key_log.as_ref()) else { return Ok(e2e) };
    let log = crate::e2e::keylog::KeyLog::create(path, config.name())
        .map_err(|e| Failure::new(Exit::Local, format!("--e2e-key-log {}: cannot write it: {e}", path.display())))?;
    tracing::warn!(agent = %config.name(), file = %path.display(), "end-to-end session keys are noted in a key log: whoever reads it reads this agent's traffic");
    Ok(e2e.with_key_log(log))
}

/// A running agent.
pub struct Agent {
    config: Arc<AgentConfig>,
    stop_tx: watch::Sender<bool>,
    stop_flag: Stop,
    tasks: JoinSet<()>,
    /// Queue workers; each hands its port back when it ends.
    workers: Vec<JoinHandle<Option<Box<dyn Port>>>>,
    /// Helper threads (the ioppytest control connection), stopped with the agent.
    helpers: Vec<JoinHandle<()>>,
    counters: AgentCounters,
    hist: Vec<Arc<Histograms>>,
    connected: Arc<AtomicUsize>,
    /// Each link's state, for `agent status`.
    links: Vec<Arc<LinkState>>,
    started: Instant,
    /// `--pcap`: the writer thread, which ends once the last TUN queue is gone.
    pcap: Option<JoinHandle<crate::capture::tun::Written>>,
    /// A userspace port's handle for pings from other threads (the lab's checks).
    pinger: Option<crate::port::userspace::Pinger>,
    /// A serial probe's counters, for the reports.
    serial: Option<Arc<crate::port::serial::SerialCounters>>,
    /// What subnet routing changed on the host (forwarding, masquerade, accepted routes).
    routing: Option<routing::HostRouting>,
}

/// Opens link 0 before anything is created on this host: what the broker refuses ends the
/// start here, with its exit code. A taken queue name is a live agent of the same name (it
/// answers a probe: exit 8) or a dead connection the broker has not dropped yet (it does
/// within two of its heartbeats: wait for it).
fn join_bus(ctx: &UplinkContext, interrupt: &Stop) -> Result<Option<Client>, Failure> {
    let c = &ctx.config;
    let started = Instant::now();
    let mut said_stale = false;
    loop {
        let mut client = ctx.client(Retry::OncePerNode);
        let e = match client.wait_up(interrupt.flag()) {
            Ok(()) if c.interface().is_l2() => {
                check_layer(c, interrupt)?;
                return Ok(Some(client));
            }
            Ok(()) => return Ok(Some(client)),
            Err(client::Error::Stopped) => return Ok(None),
            Err(e) => e,
        };
        if e.class() != FailureClass::Locked {
            let advice = crate::exit::join_advice(&e, c.bus().session.as_deref(), c.bus().endpoints.first().map(|e| e.url.vhost.as_str()));
            return Err(Failure::new(Exit::from(e.class()), format!("cannot join the bus: {e}.{advice}")));
        }
        let taken = presence::name_answers(&c.bus().endpoints, &c.bus().exchange, c.name(), NAME_PROBE_WAIT, interrupt).map_err(Failure::from)?;
        if taken {
            return Err(Failure::new(
                Exit::NameInUse,
                format!(
                    "agent name {:?} is already in use on this bus (a live agent holds queue {}); pick another --name{}",
                    c.name(),
                    c.queue_name(0),
                    if c.bus().session.is_some() { "" } else { " or a --session" }
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
            tracing::warn!(agent = %c.name(), queue = %c.queue_name(0), "the queue is held by a dead connection (no agent of this name answers); waiting for the broker to drop it");
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

/// How long an L2 agent's start listens for agents of another layer in its session.
const LAYER_PROBE_WAIT: Duration = Duration::from_millis(400);

/// An L2 agent's start: a live IP agent in the session refuses it (an L2 and an L3 session
/// are distinct sessions; frames and packets cannot reach each other).
fn check_layer(c: &AgentConfig, interrupt: &Stop) -> Result<(), Failure> {
    let found = presence::other_layer(&c.bus().endpoints, &c.bus().exchange, presence::HelloLayer::Ethernet, c.name(), LAYER_PROBE_WAIT, interrupt)
        .map_err(Failure::from)?;
    match found {
        None => Ok(()),
        Some((name, layer)) => Err(Failure::new(
            Exit::Usage,
            format!(
                "{} is an {layer} session: agent {name:?} is in it without --l2; an Ethernet (L2) session and an IP (L3) session do not mix. Use another --session for the L2 agents (or start every agent of this one with --l2)",
                c.bus().session.as_deref().map_or_else(|| format!("exchange {}", c.bus().exchange), |s| format!("session {s:?}"))
            ),
        )),
    }
}

/// What this agent announces on the bus.
fn hello_of(config: &AgentConfig) -> Hello {
    Hello {
        name: config.name().clone(),
        session: config.bus().session.clone(),
        addresses: config.owned_prefixes(),
        queues: config.interface().queues,
        wire: presence::HelloWire::of(config.data_path().wire),
        started_unix_ms: now_ns() / 1_000_000,
        interface: config.interface().ifname.clone(),
        netns: config.interface().netns.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node: None,
        leaving: false,
        advertise: config.routing().advertise.iter().map(crate::route::table::network_of).collect(),
        layer: if config.interface().is_l2() { presence::HelloLayer::Ethernet } else { presence::HelloLayer::Ip },
        macs: if config.interface().is_l2() { vec![config.mac()] } else { Vec::new() },
        key: config.e2e().map(|k| crate::e2e::keys::PrivateKey::from_bytes(k.private_key).public()),
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
        let metrics_listener = match config.data_path().metrics_addr {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| Failure::new(Exit::Local, format!("--metrics-addr {addr}: cannot listen: {e}")))?)
            }
            None => None,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_flag = Stop::new();
        let broker = Arc::new(BrokerState::default());
        let connected = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(crate::route::peers::PeerQueues::new());
        let routes = crate::route::table::RouteShare::new();
        if !config.routing().routes.is_empty() {
            // Static next hops hold from the first packet; queue 0's keeper keeps them.
            routes.publish(crate::route::table::Routes::new(config.name()).with_static(&config.routing().routes).compile());
        }
        let trust = Trust::new(&config.identity().mode);
        // First claim: queue 0 of a native agent keeps the claims its hellos bring.
        let claims = (config.identity().mode == crate::identity::Mode::FirstClaim && config.data_path().wire == crate::config::Wire::Native)
            .then(|| Arc::new(std::sync::Mutex::new(Claims::new())));
        let hello = hello_of(&config);
        // Native agents announce themselves on their queue-0 connection (no presence connection).
        let announcements = match config.data_path().wire {
            crate::config::Wire::Native => Some(Arc::new(Announcements::new(&hello))),
            crate::config::Wire::Ioppytest => None,
        };
        // An L2 agent's switch: its TAP's MAC, the learned table, the MACs behind its bridge.
        let l2 = config.interface().is_l2().then(|| crate::worker::switch::L2Shared::new(config.mac()));
        let bridged = matches!(config.interface().kind, crate::config::PortKind::Tap { bridge: Some(_) });
        let links: Vec<Arc<LinkState>> = (0..config.interface().queues).map(|_| Arc::new(LinkState::default())).collect();
        let e2e = end_to_end(&config)?;
        let link_context = |k: usize| UplinkContext {
            config: config.clone(),
            index: k,
            broker: broker.clone(),
            connected: connected.clone(),
            hello: if k == 0 { announcements.clone() } else { None },
            stop: stop_flag.clone(),
            state: links.get(k).cloned().unwrap_or_default(),
            local_macs: if k == 0 && bridged { l2.as_ref().map(|l2| l2.local.clone()) } else { None },
            e2e: e2e.clone(),
        };
        let mut first_link = if config.bus().check_name {
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
        let node = first_link.as_ref().map(|l| l.broker().to_owned());
        let opened = ports::open(&config).with_context(|| format!("setting up the host end ({}) of agent {}", config.interface().ifname, config.name()))?;
        let mut agent = Agent {
            config: config.clone(),
            stop_tx,
            stop_flag: stop_flag.clone(),
            tasks: JoinSet::new(),
            workers: Vec::new(),
            helpers: Vec::new(),
            counters: AgentCounters::default(),
            hist: Vec::new(),
            connected: connected.clone(),
            links: links.clone(),
            started: Instant::now(),
            pcap: None,
            pinger: opened.pinger.clone(),
            serial: opened.serial.clone(),
            routing: None,
        };
        // Fault injection for the test that a dead worker is never silent (read once).
        let fault_worker_panic = std::env::var("TUNBUS_FAULT").as_deref() == Ok("worker-panic");
        let emulation = Arc::new(crate::emulate::Links::new(config.data_path().emulation.clone(), now_ns()));
        if !emulation.emulation().is_off() {
            let e = emulation.emulation();
            let to: Vec<String> = e.to.iter().map(|(peer, spec)| format!("{peer}='{spec}'")).collect();
            let all = e.all.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into());
            tracing::info!(agent = %config.name(), all = %all, to = %to.join(" "), seed = e.seed, "link emulation on (the same --emulate-seed replays the same decisions)");
            agent.learn_emulated_peers(&emulation)?;
        }
        let tap = match &config.data_path().pcap {
            Some(path) => {
                let addrs: Vec<(std::net::IpAddr, u8)> = config.interface().addrs.iter().map(|p| (p.addr, p.len)).collect();
                let layer = if config.interface().is_l2() { crate::port::Layer::Ethernet } else { crate::port::Layer::Ip };
                let (tap, writer) = crate::capture::tun::Tap::start(path, &config.interface().ifname, &addrs, layer)
                    .map_err(|e| Failure::new(Exit::Local, format!("--pcap {}: cannot write it: {e}", path.display())))?;
                agent.pcap = Some(writer);
                Some(tap)
            }
            None => None,
        };
        for (k, port) in opened.ports.into_iter().enumerate() {
            let port: Box<dyn Port> = match &tap {
                Some(t) => Box::new(crate::capture::tun::Tapped::new(port, t.clone())),
                None => port,
            };
            let setup = WorkerSetup {
                port,
                link: link_context(k),
                // Separate blocks for the sending and receiving halves: no shared cache lines.
                tx_counters: Arc::new(TxCounters::default()),
                rx_counters: Arc::new(RxCounters::default()),
                hist: Histograms::new(),
                peers: peers.clone(),
                trust: trust.clone(),
                claims: if k == 0 { claims.clone() } else { None },
                routes: routes.clone(),
                connected: if k == 0 { first_link.take() } else { None },
                shaper: emulation.shaper(),
                l2: l2.clone(),
            };
            agent.spawn_worker(setup, k == 0 && fault_worker_panic)?;
        }
        if let (crate::config::Wire::Ioppytest, Some(serial)) = (config.data_path().wire, config.interface().serial()) {
            let (c, stop, device, baud) = (config.clone(), stop_flag.clone(), serial.device.display().to_string(), serial.baud);
            agent.helpers.push(
                std::thread::Builder::new()
                    .name(format!("ctl-{}", config.name()))
                    .spawn(move || crate::interop::control::run_serial(&c, &device, baud, &stop))
                    .context("spawning the ioppytest control thread")?,
            );
        } else if config.data_path().wire == crate::config::Wire::Ioppytest {
            let (c, stop) = (config.clone(), stop_flag.clone());
            let counters = Arc::new(RxCounters::default());
            agent.counters.rx.push(counters.clone());
            agent.helpers.push(
                std::thread::Builder::new()
                    .name(format!("ctl-{}", config.name()))
                    .spawn(move || {
                        let iface = c.interface();
                        crate::interop::control::run(&c, &stop, counters, |p| {
                            if iface.is_tun() {
                                netns::add_address(iface.netns.as_deref(), &iface.ifname, p).map_err(|e| e.to_string())
                            } else {
                                Err("a userspace endpoint takes its addresses at start (--ipv4/--ipv6 or --wait-config), not while it runs".to_owned())
                            }
                        })
                    })
                    .context("spawning the ioppytest control thread")?,
            );
        }
        if config.interface().is_tun() {
            agent.watch_kernel_drops(&stop_rx);
        }
        if *config.routing() != crate::config::Routing::default() {
            agent.routing = Some(routing::HostRouting::start(&config, routes.clone(), stop_flag.clone())?);
        }
        agent.serve_status(claims, routes.clone(), &stop_rx);
        agent.spawn_reports(metrics_listener, stop_rx);
        let first = config.bus().endpoints.first();
        tracing::info!(
            agent = %config.name(),
            node = node.as_deref().or(first.map(|e| e.url.authority()).as_deref()).unwrap_or("-"),
            vhost = first.map_or("-", |e| e.url.vhost.as_str()),
            user = %config.identity().user,
            exchange = %config.bus().exchange,
            addresses = %hello_of(&config).addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            advertise = %config.routing().advertise.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            routes = %config.routing().routes.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            interface = %config.interface().ifname,
            netns = config.interface().netns.as_deref().unwrap_or("-"),
            queues = config.interface().queues,
            port = %opened.summary,
            "agent up"
        );
        Ok(Some(agent))
    }

    /// `--emulate-to` names agents: their addresses come from their hellos, asked for now,
    /// again every [`LEARN_AGAIN`] until every peer is known, then every [`LEARN_KNOWN`].
    fn learn_emulated_peers(&mut self, links: &Arc<crate::emulate::Links>) -> anyhow::Result<()> {
        if links.peers().next().is_none() {
            return Ok(());
        }
        let (links, config, stop) = (links.clone(), self.config.clone(), self.stop_flag.clone());
        let learn = move || {
            while !stop.is_raised() {
                match presence::discover(&config.bus().endpoints, &config.bus().exchange, Duration::from_secs(1), &stop) {
                    Ok(found) => {
                        for peer in found.iter().filter(|p| links.peers().any(|n| p.hello.name == n)) {
                            // An L2 peer's frames go to its MAC (held as an address, `identity::mac_address`).
                            let macs = peer.hello.macs.iter().map(|m| crate::identity::mac_address(*m));
                            let addrs: Vec<std::net::IpAddr> = peer.hello.addresses.iter().map(|p| p.addr).chain(macs).collect();
                            links.learn(&peer.hello.name, &addrs);
                        }
                    }
                    Err(e) => tracing::debug!(agent = %config.name(), error = %e, "asking for the emulated peers' hellos"),
                }
                let again = Instant::now() + if links.all_known() { LEARN_KNOWN } else { LEARN_AGAIN };
                while !stop.is_raised() && Instant::now() < again {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let handle = std::thread::Builder::new().name(format!("emu-{}", self.config.name())).spawn(learn).context("spawning the emulation's peer thread")?;
        self.helpers.push(handle);
        Ok(())
    }

    /// Starts queue worker k on its own thread, pinned when `--cpus` says so (`die`: the
    /// fault injection for the test that a dead worker is never silent).
    fn spawn_worker(&mut self, setup: WorkerSetup, die: bool) -> anyhow::Result<()> {
        let k = setup.link.index;
        let (tx, rx, hist) = (setup.tx_counters.clone(), setup.rx_counters.clone(), setup.hist.clone());
        let cpus = &self.config.data_path().cpus;
        let core = (!cpus.is_empty()).then(|| cpus[k % cpus.len()]);
        let worker = QueueWorker::new(setup);
        let handle = std::thread::Builder::new()
            .name(format!("q-{}-{k}", self.config.name()))
            .spawn(move || {
                if let Some(id) = core {
                    core_affinity::set_for_current(core_affinity::CoreId { id });
                }
                let _span = tracing::debug_span!("queue", queue = k).entered();
                if die {
                    std::thread::sleep(Duration::from_secs(1));
                    tracing::error!("TUNBUS_FAULT=worker-panic: queue worker 0 dies on purpose");
                    return None;
                }
                Some(worker.run())
            })
            .context("spawning a queue worker thread")?;
        self.workers.push(handle);
        self.counters.tx.push(tx);
        self.counters.rx.push(rx);
        self.hist.push(hist);
        Ok(())
    }

    /// The kernel's drops on our TUN (its queue full while a worker was busy), once a second.
    fn watch_kernel_drops(&mut self, stop: &watch::Receiver<bool>) {
        let kernel_counters = Arc::new(TxCounters::default());
        self.counters.tx.push(kernel_counters.clone());
        let config = &self.config;
        match KernelDrops::open(config.interface().netns.as_deref(), &config.interface().ifname) {
            Ok(mut k) => {
                k.refresh(&kernel_counters);
                let mut stop = stop.clone();
                self.tasks.spawn(async move {
                    let mut tick = tokio::time::interval(KERNEL_POLL);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => { k.refresh(&kernel_counters); }
                            _ = stop.changed() => { k.refresh(&kernel_counters); return; }
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(agent = %config.name(), error = %e, "cannot read the kernel's statistics of the interface; its tun_queue_full drops will not be reported")
            }
        }
    }

    /// The `agent status` socket, when the configuration has a folder for it. A socket
    /// that cannot be made is a warning: the agent carries traffic without it.
    fn serve_status(&mut self, claims: Option<Arc<std::sync::Mutex<Claims>>>, routes: Arc<crate::route::table::RouteShare>, stop: &watch::Receiver<bool>) {
        let Some(dir) = self.config.data_path().status_dir.clone() else { return };
        let (listener, path) = match crate::status::bind(&dir, self.config.name()) {
            Ok(bound) => bound,
            Err(e) => {
                tracing::warn!(agent = %self.config.name(), dir = %dir.display(), error = %e, "no agent status socket");
                return;
            }
        };
        let (config, links, counters, hist, started) = (self.config.clone(), self.links.clone(), self.counters.clone(), self.hist.clone(), self.started);
        let serial = self.serial.clone();
        let sampled = counters.clone();
        let sample = Arc::new(move || {
            let s = crate::metrics::Snapshot::of(&sampled);
            [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes]
        });
        let status = Arc::new(move |rates| {
            let nodes = &config.bus().endpoints;
            let queues = links
                .iter()
                .enumerate()
                .map(|(queue, l)| {
                    let node = l.node().and_then(|i| nodes.get(i)).map(|e| e.url.to_string());
                    crate::status::QueueStatus { queue, connected: node.is_some(), node }
                })
                .collect();
            let table = match &config.identity().mode {
                crate::identity::Mode::Strict(t) => Some(t.clone()),
                crate::identity::Mode::FirstClaim => claims.as_ref().and_then(|c| c.lock().ok().map(|c| c.table())),
                crate::identity::Mode::Off => None,
            };
            let mut peers: Vec<crate::status::PeerStatus> = table
                .iter()
                .flat_map(|t| {
                    t.users().map(|(user, prefixes)| crate::status::PeerStatus {
                        user: user.to_owned(),
                        addresses: prefixes.iter().map(ToString::to_string).collect(),
                    })
                })
                .collect();
            peers.sort_by(|a, b| a.user.cmp(&b.user));
            crate::status::Status {
                agent: config.name().to_string(),
                pid: std::process::id(),
                session: config.bus().session.clone(),
                wire: config.data_path().wire.name().to_owned(),
                interface: config.interface().ifname.clone(),
                netns: config.interface().netns.clone(),
                queues,
                rates,
                identity: match config.identity().mode {
                    crate::identity::Mode::Strict(_) => "strict",
                    crate::identity::Mode::FirstClaim => "first-claim",
                    crate::identity::Mode::Off => "off",
                }
                .to_owned(),
                peers,
                routes: routes
                    .table()
                    .routes()
                    .iter()
                    .map(|r| crate::status::RouteStatus { prefix: r.prefix.to_string(), gateway: r.gateway.clone(), standby: r.standby.clone() })
                    .collect(),
                report: {
                    let mut r = report::build(config.name(), started.elapsed(), &counters, &hist);
                    r.serial = serial.as_ref().map(|c| c.snapshot());
                    crate::status::report_value(&r)
                },
            }
        });
        self.tasks.spawn(crate::status::serve(listener, path, status, sample, stop.clone()));
    }

    /// Prometheus on `listener`, and the periodic stats line.
    fn spawn_reports(&mut self, listener: Option<tokio::net::TcpListener>, stop: watch::Receiver<bool>) {
        let name = self.config.name().to_string();
        if let Some(listener) = listener {
            let sources = crate::metrics::prometheus::Sources {
                agent: name.clone(),
                counters: self.counters.clone(),
                hist: self.hist.clone(),
                links: self.links.clone(),
                serial: self.serial.clone(),
            };
            self.tasks.spawn(crate::metrics::prometheus::serve(listener, sources, stop.clone()));
        }
        let every = self.config.data_path().stats_interval;
        if !every.is_zero() {
            self.tasks.spawn(report::periodic(name, every, self.counters.clone(), self.hist.clone(), stop));
        }
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
        self.workers.iter().position(JoinHandle::is_finished).map(|k| format!("queue worker {k} of agent {} died; see the log above", self.config.name()))
    }

    /// The handle with which the lab has a userspace agent's endpoints ping.
    pub fn pinger(&self) -> Option<&crate::port::userspace::Pinger> {
        self.pinger.as_ref()
    }

    /// Whether every link is connected to the broker (queues declared and bound).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) == self.config.interface().queues
    }

    /// Sums of the counters so far (cheap: relaxed loads).
    pub fn totals(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot::of(&self.counters)
    }

    /// The statistics so far.
    pub fn report(&self) -> Report {
        let mut r = report::build(self.config.name(), self.started.elapsed(), &self.counters, &self.hist);
        r.serial = self.serial.as_ref().map(|c| c.snapshot());
        r
    }

    /// Stops everything and returns the final statistics. Dropping an `Agent` without
    /// calling this still stops its threads and tasks (see `Drop`), just without waiting.
    pub async fn shutdown(mut self) -> Report {
        let _ = self.stop_tx.send(true);
        self.stop_flag.raise();
        if let Some(mut r) = self.routing.take() {
            let _ = tokio::task::spawn_blocking(move || r.stop()).await;
        }
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(agent = %self.config.name(), "links slow to close; aborting them");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        let mut ports = Vec::new();
        for w in self.workers.drain(..) {
            if let Ok(Ok(Some(port))) = tokio::task::spawn_blocking(move || w.join()).await {
                ports.push(port);
            }
        }
        for h in self.helpers.drain(..) {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let report = self.report();
        drop(ports); // closing the TUN queues' fds removes the interface
        if let Some(writer) = self.pcap.take() {
            if let Ok(Ok(w)) = tokio::task::spawn_blocking(move || writer.join()).await {
                let file = self.config.data_path().pcap.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                match &w.error {
                    Some(e) => {
                        tracing::warn!(agent = %self.config.name(), packets = w.packets, left_out = w.left_out, error = %e, "--pcap {file}: writing stopped early")
                    }
                    None => tracing::info!(agent = %self.config.name(), packets = w.packets, left_out = w.left_out, "--pcap {file}: written"),
                }
            }
        }
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
