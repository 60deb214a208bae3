//! `agent`: parse the command line, set up tracing, run the chosen command, and turn its
//! outcome into an exit code (`tunbus::exit`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use tunbus::agent::Agent;
use tunbus::cli::{bus_exchange, Cli, Command, LabArgs, PeersArgs, RouteArgs};
use tunbus::exit::{self, Exit, Failure};
use tunbus::util::{now_ns, Stop};

fn main() -> ExitCode {
    let cli = match tunbus::cli::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(tunbus::cli::ParseError::Clap(e)) => e.exit(),
        Err(tunbus::cli::ParseError::File(failure)) => {
            eprintln!("error: {failure}");
            return ExitCode::from(failure.exit.code());
        }
    };
    // A lab runs hundreds of agents in this process: their per-agent lines stay quiet (the
    // lab reports connectivity itself).
    let default_filter = match (cli.quiet, &cli.command) {
        (true, _) => "warn",
        (false, Command::Lab(_)) => "info,tunbus::agent=warn,tunbus::amqp=error",
        (false, _) => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())).init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::code_of(&e).code())
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Connect(args) if args.cleanup => {
            let said = tunbus::agent::routing::cleanup_after_kill(&args.name, args.netns.as_deref()).map_err(|e| exit::Failure::new(exit::Exit::Local, e))?;
            println!("{said}");
            // The status socket a killed agent could not remove (a live agent's answers: kept).
            let dir = if args.status_dir == std::path::Path::new(tunbus::config::RUN_DIR) { tunbus::status::default_dir() } else { args.status_dir.clone() };
            let sock = tunbus::status::socket_path(&dir, &args.name);
            if tunbus::status::is_stale(&sock) && std::fs::remove_file(&sock).is_ok() {
                println!("removed {}: the status socket of a killed agent {}", sock.display(), args.name);
            }
            Ok(())
        }
        Command::Connect(args) => {
            let stats_json = args.stats_json.clone();
            let wait_config = args.wait_config;
            let mut config = args.into_config().map_err(exit::usage)?;
            if config.data_path().wire == tunbus::config::Wire::Native && config.interface().addrs.is_empty() {
                tracing::warn!(
                    agent = %config.name(),
                    link_local = %config.link_local(),
                    "no --ipv4/--ipv6: this agent owns only its link-local address, so its peers can reach it only there (give the addresses the session's operator assigned you)"
                );
            }
            let (interrupt, mut stop) = stop_on_signal()?;
            if wait_config {
                let (c, s) = (config.clone(), interrupt.clone());
                let found = tokio::task::spawn_blocking(move || tunbus::interop::control::wait_for_start(&c, &s)).await??;
                let Some(addressing) = found else { return Ok(()) };
                config = config.with_ordered_addressing(addressing).map_err(|e| Failure::new(Exit::Usage, format!("the ip.tun.start order: {e}")))?;
            }
            serve_agent(config, &interrupt, &mut stop, stats_json).await
        }
        Command::Serial(args) => {
            let stats_json = args.stats_json.clone();
            let config = args.into_config().map_err(exit::usage)?;
            let (interrupt, mut stop) = stop_on_signal()?;
            serve_agent(config, &interrupt, &mut stop, stats_json).await
        }
        Command::Peers(args) => peers(args).await,
        Command::Ping(args) => ping(args).await,
        Command::Doctor(args) => doctor(args).await,
        Command::Lab(args) => lab(args).await,
        Command::Route(args) => route(args).await,
        Command::Provision(args) => provision(args).await,
        Command::Status(args) => status(args),
        Command::Capture(args) => capture(args).await,
        Command::Sniffer(args) => sniffer(args).await,
        Command::Manpages(args) => {
            for path in args.write().with_context(|| format!("writing man pages into {}", args.dir.display()))? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::Keygen(args) => args.run(),
        Command::Completions(args) => {
            args.write(&mut std::io::stdout().lock());
            Ok(())
        }
    }
}

/// Runs agent `config` until Ctrl-C or SIGTERM (or a worker dies): prints the final report,
/// writes it to `stats_json` when given.
async fn serve_agent(
    config: tunbus::config::AgentConfig,
    interrupt: &Stop,
    stop: &mut watch::Receiver<bool>,
    stats_json: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let Some(agent) = Agent::start(config, interrupt).await? else {
        return Ok(()); // interrupted while joining the bus
    };
    let failure = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break None,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(f) = agent.failure() {
                    break Some(f);
                }
            }
        }
    };
    tracing::info!(agent = %agent.config().name(), "stopping");
    let report = agent.shutdown().await;
    println!("{report}");
    if let Some(path) = stats_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing --stats-json {}", path.display()))?;
    }
    match failure {
        Some(f) => Err(Failure::new(Exit::Internal, f).into()),
        None => Ok(()),
    }
}

/// `agent ping PEER`: one line per probe, a summary, and an exit code that tells a dead
/// peer (1) from a dead path to the broker (3) from a refused key (7).
async fn ping(args: tunbus::cli::PingArgs) -> anyhow::Result<()> {
    use tunbus::amqp::ping::{self, Verdict};
    let opts = args.options().map_err(exit::usage)?;
    let (interrupt, _stop) = stop_on_signal()?;
    let shown = opts.endpoints.first().map(|e| e.url.to_string()).unwrap_or_default();
    println!("PING {} on exchange {} via {shown} ({})", opts.target, opts.exchange, args.bus.broker.source());
    let exchange = opts.exchange.clone();
    let summary = tokio::task::spawn_blocking(move || ping::run(&opts, &interrupt, |p, s| println!("{}", ping::probe_line(&s.name, p)))).await?;
    let summary = summary.map_err(|e| {
        let hint = match e.class() {
            tunbus::amqp::client::FailureClass::Permission => " (a permission problem: this broker user may not publish tunbus.v1.ctl.ping.PEER or bind its reply key tunbus.v1.ctl.pong.TOKEN; users provisioned before `agent ping` existed need `agent provision` again)",
            tunbus::amqp::client::FailureClass::Unreachable => " (the path to the broker is dead: check --url, and `agent doctor`)",
            _ => "",
        };
        Failure::new(Exit::from(e.class()), format!("agent ping: {e}{hint}"))
    })?;
    println!("{}", summary.report(&exchange));
    match summary.verdict() {
        Verdict::Answered => Ok(()),
        Verdict::BrokerPathDead => Err(Failure::new(Exit::Unreachable, format!("no answer from {}: the path to the broker is dead", summary.name)).into()),
        Verdict::NotOnBus | Verdict::Silent => Err(Failure::new(Exit::Failure, format!("no answer from {}", summary.name)).into()),
    }
}

/// `agent doctor`: one line per check, in order; the first failure's exit code.
async fn doctor(args: tunbus::cli::DoctorArgs) -> anyhow::Result<()> {
    let inputs = args.inputs();
    let checks = tokio::task::spawn_blocking(move || tunbus::doctor::run(inputs)).await?;
    for c in &checks {
        println!("{c}");
    }
    let failed: Vec<&str> = checks.iter().filter(|c| c.status == tunbus::doctor::Status::Fail).map(|c| c.name).collect();
    match tunbus::doctor::exit_code(&checks) {
        Exit::Ok => {
            println!("agent doctor: a start has what it needs");
            Ok(())
        }
        code => Err(Failure::new(code, format!("agent doctor: {} check(s) failed: {}", failed.len(), failed.join(", "))).into()),
    }
}

async fn provision(args: tunbus::cli::ProvisionArgs) -> anyhow::Result<()> {
    let opts = args.options().map_err(exit::usage)?;
    let revoke = args.revoke;
    let summary = tokio::task::spawn_blocking(move || if revoke { tunbus::provision::revoke(&opts) } else { tunbus::provision::provision(&opts) }).await??;
    match &summary.plan {
        None => println!("session {}: removed its vhost and {} user(s) ({})", args.session, summary.removed_users.len(), summary.backend),
        Some(plan) => {
            println!("session {}: vhost {}, exchange {}, {} user(s), via {}", plan.session, plan.vhost, plan.exchange, plan.users.len(), summary.backend);
            for u in &plan.users {
                let addrs: Vec<String> = u.addresses.iter().map(ToString::to_string).collect();
                println!("  {:<16} user {:<24} may send from {}", u.agent, u.user, addrs.join(" "));
            }
            if summary.files.is_empty() {
                println!("no --out: the passwords were not written anywhere; run again with --out DIR");
            } else {
                for f in &summary.files {
                    println!("  wrote {}", f.display());
                }
                if let (Some(dir), Some(u)) = (&args.out, plan.users.iter().find(|u| !u.observer)) {
                    let config = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()).join(format!("{}.toml", u.agent));
                    println!("start an agent: sudo agent connect --config {}", config.display());
                    println!(
                        "  or as a service: copy it with its URL file to /etc/tunbus/ on the agent's machine (keeping the paths it names), then systemctl enable --now tunbus-agent@{}",
                        u.agent
                    );
                }
            }
        }
    }
    Ok(())
}

async fn route(args: RouteArgs) -> anyhow::Result<()> {
    let opts = args.options().map_err(exit::usage)?;
    let (interrupt, _stop) = stop_on_signal()?;
    let counters = tokio::task::spawn_blocking(move || tunbus::interop::router::run(opts, &interrupt)).await?;
    println!("router: {counters}");
    if let Some(path) = &args.stats_json {
        std::fs::write(path, serde_json::to_vec_pretty(&counters)?).with_context(|| format!("writing --stats-json {}", path.display()))?;
    }
    Ok(())
}

async fn lab(args: LabArgs) -> anyhow::Result<()> {
    if args.cleanup {
        return tunbus::lab::cleanup_all();
    }
    if let Some(pid) = args.guard {
        return tokio::task::spawn_blocking(move || tunbus::lab::guard::run(pid, &args.session)).await?;
    }
    let opts = args.options().map_err(exit::usage)?;
    let keep = opts.keep;
    let (interrupt, stop) = stop_on_signal()?;
    let running = opts.check && tunbus::lab::routed::lab_running(&opts.session);
    let report = if running { tunbus::lab::routed::grade_running(&opts).await? } else { tunbus::lab::run(opts, stop, interrupt).await? };
    if keep && !running {
        println!("lab torn down");
    } else {
        println!("{report}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing --json {}", path.display()))?;
    }
    if !report.ok {
        anyhow::bail!("the lab check failed ({} failure(s))", report.failures.len());
    }
    Ok(())
}

/// A flag (and a watch of it) that turns true on SIGINT or SIGTERM; a second signal ends
/// the process at once.
fn stop_on_signal() -> anyhow::Result<(Stop, watch::Receiver<bool>)> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let stop = Stop::new();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let flag = stop.clone();
    tokio::spawn(async move {
        for round in 0..2 {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if round == 1 {
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            }
            flag.raise();
            let _ = tx.send(true);
        }
    });
    Ok((stop, rx))
}

/// `agent capture`: the session's bus into one pcapng file, until Ctrl-C or --duration.
async fn capture(args: tunbus::cli::CaptureArgs) -> anyhow::Result<()> {
    use tunbus::capture::{self, pcapng};
    let opts = args.options().map_err(exit::usage)?;
    let file = args.write.display().to_string();
    let out = capture::output(&args.write).map_err(|e| Failure::new(Exit::Local, format!("-w {file}: cannot write it: {e}")))?;
    let (interrupt, _stop) = stop_on_signal()?;
    if args.write.as_os_str() != "-" {
        eprintln!(
            "capture: exchange {} into {file}{} (Ctrl-C to stop)",
            opts.exchange,
            opts.duration.map(|d| format!(" for {:.0} s", d.as_secs_f64())).unwrap_or_default()
        );
    }
    let summary = tokio::task::spawn_blocking(move || -> anyhow::Result<capture::Summary> {
        let mut writer = pcapng::Writer::new(out, concat!("tunbus ", env!("CARGO_PKG_VERSION"), " agent capture"))?;
        Ok(capture::run(&opts, &mut writer, &interrupt).map_err(Failure::from)?)
    })
    .await?;
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            // Nothing was captured: leave no empty file behind.
            if args.write.as_os_str() != "-" {
                let _ = std::fs::remove_file(&args.write);
            }
            return Err(e);
        }
    };
    if args.json {
        eprintln!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!("{}", summary.line(&file));
    }
    Ok(())
}

async fn sniffer(args: tunbus::cli::SnifferArgs) -> anyhow::Result<()> {
    let opts = args.options().map_err(exit::usage)?;
    let (interrupt, _stop) = stop_on_signal()?;
    tokio::task::spawn_blocking(move || tunbus::capture::sniffer::serve(opts, &interrupt)).await?
}

fn status(mut args: tunbus::cli::StatusArgs) -> anyhow::Result<()> {
    if args.dir == std::path::Path::new(tunbus::config::RUN_DIR) {
        args.dir = status::default_dir(); // not root: where unprivileged agents put theirs
    }
    use tunbus::status;
    if let Some(wait) = args.wait {
        let limit = std::time::Duration::try_from_secs_f64(wait).map_err(|_| Failure::new(Exit::Usage, "--wait takes seconds, 0 or more"))?;
        status::wait_connected(&args.dir, &args.names, limit).map_err(|e| Failure::new(Exit::Failure, e))?;
    }
    let sockets = status::sockets(&args.dir, &args.names).map_err(|e| Failure::new(Exit::Local, e))?;
    if sockets.is_empty() {
        if !args.json {
            println!("no agents running on this host (no sockets in {})", args.dir.display());
        }
        return Ok(());
    }
    let mut failed = None;
    for (i, path) in sockets.iter().enumerate() {
        match status::query(path) {
            Ok(s) if args.json => println!("{}", serde_json::to_string(&s)?),
            Ok(s) => print!("{}{s}", if i > 0 { "\n" } else { "" }),
            // A socket left by an agent that was killed: remove it, keep going.
            Err(_) if status::is_stale(path) && std::fs::remove_file(path).is_ok() => {
                eprintln!("removed {}: its agent is gone (killed before it could remove it)", path.display());
                if !args.names.is_empty() {
                    failed = Some(format!("agent {} is not running", path.file_stem().unwrap_or_default().to_string_lossy()));
                }
            }
            Err(e) => {
                eprintln!("{e}");
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) if !args.names.is_empty() => Err(Failure::new(Exit::Local, e).into()),
        _ => Ok(()),
    }
}

async fn peers(args: PeersArgs) -> anyhow::Result<()> {
    let endpoints = args.bus.broker.endpoints()?;
    let exchange = bus_exchange(&args.bus).map_err(exit::usage)?;
    let wait = args.wait().map_err(exit::usage)?;
    let (interrupt, _stop) = stop_on_signal()?;
    let ex = exchange.clone();
    let peers = tokio::task::spawn_blocking(move || tunbus::amqp::presence::discover(&endpoints, &ex, wait, &interrupt)).await?.map_err(Failure::from)?;
    let now_ms = now_ns() / 1_000_000;
    // Addresses claimed by more than one broker user: first claim refuses all but one.
    let mut claimants: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for p in &peers {
        for a in &p.hello.addresses {
            let addr = a.addr.to_string();
            claimants.entry(addr).or_default().insert(p.user.clone().unwrap_or_else(|| "(no user_id)".into()));
        }
    }
    let conflicts_of = |p: &tunbus::amqp::presence::Peer| -> Vec<String> {
        p.hello.addresses.iter().map(|a| a.addr.to_string()).filter(|a| claimants.get(a).is_some_and(|u| u.len() > 1)).collect()
    };
    if args.json {
        for p in &peers {
            let mut v = serde_json::to_value(&p.hello)?;
            v["user"] = p.user.as_deref().map_or(serde_json::Value::Null, serde_json::Value::from);
            v["conflicts"] = serde_json::Value::from(conflicts_of(p));
            println!("{}", serde_json::to_string(&v)?);
        }
        return Ok(());
    }
    if peers.is_empty() {
        println!("no agents answered on exchange {exchange}");
        return Ok(());
    }
    println!("{:<16} {:<16} {:>6} {:>10} {:>10}  {:<10} {:<22} addresses", "name", "user", "queues", "heard", "up", "wire", "node");
    for p in &peers {
        let h = &p.hello;
        let up_s = now_ms.saturating_sub(h.started_unix_ms) / 1000;
        let conflicts = conflicts_of(p);
        println!(
            "{:<16} {:<16} {:>6} {:>8}ms {:>9}s  {:<10} {:<22} {}{}",
            h.name,
            p.user.as_deref().unwrap_or("-"),
            h.queues,
            p.heard.elapsed().as_millis(),
            up_s,
            h.wire.to_string(),
            h.node.as_deref().unwrap_or("-"),
            h.addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            if conflicts.is_empty() { String::new() } else { format!("  CONFLICT: {} claimed by several users", conflicts.join(" ")) }
        );
    }
    Ok(())
}
