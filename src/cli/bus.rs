//! The flags every command that connects shares: broker URLs (flags, file, environment)
//! and TLS files into endpoints, session and exchange.
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

use crate::amqp::client::{Endpoint, DEFAULT_HEARTBEAT};
use crate::amqp::tls::TlsOptions;
use crate::amqp::url::{self, BrokerUrl, DEFAULT_URL};
use crate::exit::{Exit, Failure};
use crate::route;

/// `--heartbeat`'s default: the client's, in whole seconds (10 s: no truncation).
const DEFAULT_HEARTBEAT_S: u16 = DEFAULT_HEARTBEAT.as_secs() as u16;

/// Where the broker is and how to reach it: shared by every command that connects.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Broker URL: amqp[s]://USER:PASS@HOST[:PORT]/VHOST[?heartbeat=S&connection_timeout=MS&…]
    /// (vhost URL-encoded: %2f is "/"). Repeat it for the nodes of one cluster, in order
    /// of preference. Without it: --url-file, else $AMQP_URL_FILE, else $AMQP_URL (a
    /// comma-separated list), else amqp://guest:guest@localhost:5672/%2f (RabbitMQ's guest
    /// works from localhost only). Passwords are never printed.
    #[arg(long, value_name = "URL")]
    pub url: Vec<String>,
    /// Read the URL (or a comma- or line-separated list) from FILE, keeping the password out
    /// of the process list [env: AMQP_URL_FILE].
    #[arg(long, value_name = "FILE")]
    pub url_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the broker's certificate, for amqps:// [default:
    /// the system's roots]. The URL's cacertfile= overrides it.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM): log in by certificate (SASL EXTERNAL) when the URL names no
    /// user. The URL's certfile= overrides it.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Key of --tls-cert (PEM). The URL's keyfile= overrides it.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Do not verify the broker's certificate (warns once; anyone on the path can then pose
    /// as the broker). Same as the URL's verify=verify_none.
    #[arg(long)]
    pub tls_insecure: bool,
    /// Heartbeat interval asked of the broker, in seconds (0: off); a dead path is noticed
    /// within two of them. The URL's heartbeat= overrides it.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_HEARTBEAT_S)]
    pub heartbeat: u16,
}

impl BrokerArgs {
    /// Whether any URL was given (flag, file or environment).
    pub fn given(&self) -> bool {
        self.given_on_command_line() || std::env::var_os("AMQP_URL_FILE").is_some() || std::env::var_os("AMQP_URL").is_some()
    }

    /// Whether the command line itself gave a URL (`--url` or `--url-file`).
    pub fn given_on_command_line(&self) -> bool {
        !self.url.is_empty() || self.url_file.is_some()
    }

    /// Where the URLs come from, for messages: `--url`, `--url-file FILE`, `AMQP_URL_FILE`,
    /// `AMQP_URL`, or the default.
    pub fn source(&self) -> String {
        if !self.url.is_empty() {
            "--url".into()
        } else if let Some(f) = &self.url_file {
            format!("--url-file {}", f.display())
        } else if let Some(f) = std::env::var_os("AMQP_URL_FILE") {
            format!("AMQP_URL_FILE={}", std::path::Path::new(&f).display())
        } else if std::env::var_os("AMQP_URL").is_some() {
            "AMQP_URL".into()
        } else {
            "the default URL".into()
        }
    }

    /// The broker URLs, from the first place that has them.
    pub fn urls(&self) -> Result<Vec<BrokerUrl>, Failure> {
        let usage = |e: url::UrlError| Failure::new(Exit::Usage, e.to_string());
        if !self.url.is_empty() {
            let mut all = Vec::new();
            for u in &self.url {
                all.extend(url::parse_list(u).map_err(usage)?);
            }
            return Ok(all);
        }
        let file = self.url_file.clone().or_else(|| std::env::var_os("AMQP_URL_FILE").map(PathBuf::from));
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path).map_err(|e| Failure::new(Exit::Local, format!("cannot read the URL file {}: {e}", path.display())))?;
            let list: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
            return url::parse_list(&list.join(",")).map_err(|e| Failure::new(Exit::Usage, format!("{}: {e}", path.display())));
        }
        if let Ok(env) = std::env::var("AMQP_URL") {
            return url::parse_list(&env).map_err(|e| Failure::new(Exit::Usage, format!("$AMQP_URL: {e}")));
        }
        url::parse_list(DEFAULT_URL).map_err(usage)
    }

    pub fn tls(&self) -> TlsOptions {
        TlsOptions { ca: self.tls_ca.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone(), insecure: self.tls_insecure }
    }

    /// The nodes with their TLS clients built (certificate files read now).
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, Failure> {
        let tls = self.tls();
        if (tls.ca.is_some() || tls.cert.is_some() || tls.insecure) && self.urls()?.iter().all(|u| !u.tls) {
            return Err(Failure::new(Exit::Usage, "--tls-* flags need an amqps:// URL (TLS is chosen by the URL's scheme)"));
        }
        self.urls()?
            .into_iter()
            .map(|u| {
                let shown = u.to_string();
                Endpoint::new(u, &tls).map_err(|e| Failure::new(Exit::Tls, format!("TLS settings for {shown}: {e}")))
            })
            .collect()
    }

    pub fn heartbeat(&self) -> Result<Duration, Failure> {
        Ok(Duration::from_secs(u64::from(self.heartbeat)))
    }
}

#[derive(Debug, Args)]
pub struct BusArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Testbed session: agents of different sessions never see each other's packets or
    /// presence. Uses the topic exchange `tunbus.<SESSION>` unless --exchange is given.
    #[arg(long)]
    pub session: Option<String>,
    /// Topic exchange carrying data and presence [default: amq.topic, or tunbus.<SESSION>].
    #[arg(long)]
    pub exchange: Option<String>,
}

/// Exchange and session from the shared bus flags.
pub fn bus_exchange(bus: &BusArgs) -> anyhow::Result<String> {
    if let Some(s) = &bus.session {
        if !route::is_valid_word(s) {
            bail!("--session {s:?} must be one topic word: letters, digits, '-' or '_'");
        }
    }
    Ok(match (&bus.exchange, &bus.session) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => route::session_exchange(s),
        (None, None) => route::DEFAULT_EXCHANGE.to_owned(),
    })
}
