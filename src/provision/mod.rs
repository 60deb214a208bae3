//! `agent provision`: a session of its own on a shared broker, and an identity for each
//! of its agents.
//!
//! For session `S` it creates the vhost `S`, the durable topic exchange `tunbus.S` (over
//! AMQP, as the admin), one user `S.<agent>` per agent with a generated password and the
//! permissions of [`plan`] (its own queues, the session's exchange, its own address keys),
//! and writes each agent's URL file (mode 0600) and the session's peers file (strict mode).
//! `--revoke` removes the vhost and every user tagged with the session.
//!
//! It talks to RabbitMQ's management HTTP API when the broker has one (that is what remote
//! operators have: `--api`, else `http://<broker host>:15672`), and falls back to
//! `rabbitmqctl` when the API does not answer and the broker is this machine. It says
//! which it used. Control plane, run once by an operator.

pub mod http;
pub mod plan;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::json;

use crate::amqp::client::{Client, ConnectOptions, Endpoint};
use crate::amqp::session::ExchangeOptions;
use crate::amqp::tls::TlsOptions;
use crate::amqp::url::BrokerUrl;
use crate::util::Stop;
use http::{segment, Api};
use plan::{AgentSpec, Permissions, SessionPlan};

/// What `agent provision` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// An administrator's URL of the broker (any vhost).
    pub admin: BrokerUrl,
    pub tls: TlsOptions,
    /// The management API (`http(s)://host:port`), if not `http://<broker host>:15672`.
    pub api: Option<String>,
    pub session: String,
    pub agents: Vec<AgentSpec>,
    /// Where to write the URL files and the peers file.
    pub out: Option<PathBuf>,
}

/// How the broker's users and permissions are changed.
enum Backend {
    Api(Api),
    Ctl,
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Api(_) => "the management HTTP API",
            Backend::Ctl => "rabbitmqctl on this machine",
        }
    }

    /// The API if it answers, else `rabbitmqctl` when the broker is on this machine.
    fn choose(o: &Options) -> anyhow::Result<Backend> {
        let base = o.api.clone().unwrap_or_else(|| format!("http://{}:15672", if o.admin.host.contains(':') { format!("[{}]", o.admin.host) } else { o.admin.host.clone() }));
        let api = Api::new(&base, o.admin.username.as_deref().unwrap_or("guest"), o.admin.password().unwrap_or("guest"), &o.tls)?;
        match api.request("GET", "/api/overview", None, &[]) {
            Ok(_) => return Ok(Backend::Api(api)),
            Err(http::HttpError::Connect(..)) if o.api.is_none() => {}
            Err(e) => return Err(e.into()),
        }
        let local = matches!(o.admin.host.as_str(), "localhost" | "127.0.0.1" | "::1");
        let ctl = Command::new("rabbitmqctl").arg("-q").arg("status").output().is_ok_and(|r| r.status.success());
        if local && ctl {
            return Ok(Backend::Ctl);
        }
        bail!("no management API at {base} (enable rabbitmq_management, or give --api), and the broker is not this machine's (rabbitmqctl works only here)")
    }

    fn ctl(args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("rabbitmqctl").arg("-q").args(args).output().context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!("rabbitmqctl {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn add_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        match self {
            Backend::Api(a) => a.request("PUT", &format!("/api/vhosts/{}", segment(vhost)), Some("{}"), &[]).map(drop)?,
            Backend::Ctl => {
                if !Backend::ctl(&["list_vhosts"])?.lines().any(|l| l.trim() == vhost) {
                    Backend::ctl(&["add_vhost", vhost])?;
                }
            }
        }
        Ok(())
    }

    fn delete_vhost(&self, vhost: &str) -> anyhow::Result<bool> {
        match self {
            Backend::Api(a) => Ok(a.request("DELETE", &format!("/api/vhosts/{}", segment(vhost)), None, &[404])?.0 != 404),
            Backend::Ctl => {
                if Backend::ctl(&["list_vhosts"])?.lines().any(|l| l.trim() == vhost) {
                    Backend::ctl(&["delete_vhost", vhost])?;
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
        }
    }

    fn put_user(&self, user: &str, password: &str, tag: &str) -> anyhow::Result<()> {
        match self {
            Backend::Api(a) => a.request("PUT", &format!("/api/users/{}", segment(user)), Some(&json!({ "password": password, "tags": tag }).to_string()), &[]).map(drop)?,
            Backend::Ctl => {
                if Backend::users_tagged(self, "")?.iter().any(|u| u == user) {
                    Backend::ctl(&["change_password", user, password])?;
                } else {
                    Backend::ctl(&["add_user", user, password])?;
                }
                Backend::ctl(&["set_user_tags", user, tag])?;
            }
        }
        Ok(())
    }

    fn delete_user(&self, user: &str) -> anyhow::Result<()> {
        match self {
            Backend::Api(a) => a.request("DELETE", &format!("/api/users/{}", segment(user)), None, &[404]).map(drop)?,
            Backend::Ctl => Backend::ctl(&["delete_user", user]).map(drop)?,
        }
        Ok(())
    }

    /// Users carrying `tag` (every user when `tag` is empty).
    fn users_tagged(&self, tag: &str) -> anyhow::Result<Vec<String>> {
        let list: serde_json::Value = match self {
            Backend::Api(a) => serde_json::from_str(&a.request("GET", "/api/users", None, &[])?.1)?,
            Backend::Ctl => serde_json::from_str(&Backend::ctl(&["list_users", "--formatter", "json"])?)?,
        };
        let mut out = Vec::new();
        for u in list.as_array().map(Vec::as_slice).unwrap_or_default() {
            let name = u["name"].as_str().or_else(|| u["user"].as_str()).unwrap_or_default();
            let tags: Vec<String> = match &u["tags"] {
                serde_json::Value::Array(a) => a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect(),
                serde_json::Value::String(s) => s.split(',').map(|t| t.trim().to_owned()).collect(),
                _ => Vec::new(),
            };
            if tag.is_empty() || tags.iter().any(|t| t == tag) {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }

    fn permissions(&self, vhost: &str, user: &str, exchange: &str, p: &Permissions) -> anyhow::Result<()> {
        match self {
            Backend::Api(a) => {
                let path = format!("/api/permissions/{}/{}", segment(vhost), segment(user));
                a.request("PUT", &path, Some(&json!({ "configure": p.configure, "write": p.write, "read": p.read }).to_string()), &[])?;
                let path = format!("/api/topic-permissions/{}/{}", segment(vhost), segment(user));
                a.request("PUT", &path, Some(&json!({ "exchange": exchange, "write": p.topic_write, "read": p.topic_read }).to_string()), &[])?;
            }
            Backend::Ctl => {
                Backend::ctl(&["set_permissions", "-p", vhost, user, &p.configure, &p.write, &p.read])?;
                Backend::ctl(&["set_topic_permissions", "-p", vhost, user, exchange, &p.topic_write, &p.topic_read])?;
            }
        }
        Ok(())
    }

    /// Full permissions for the administrator, to declare the session's exchange.
    fn admin_permissions(&self, vhost: &str, admin: &str) -> anyhow::Result<()> {
        let all = Permissions { configure: ".*".into(), write: ".*".into(), read: ".*".into(), topic_write: ".*".into(), topic_read: ".*".into() };
        match self {
            Backend::Api(a) => a.request("PUT", &format!("/api/permissions/{}/{}", segment(vhost), segment(admin)), Some(&json!({ "configure": all.configure, "write": all.write, "read": all.read }).to_string()), &[]).map(drop)?,
            Backend::Ctl => Backend::ctl(&["set_permissions", "-p", vhost, admin, ".*", ".*", ".*"]).map(drop)?,
        }
        Ok(())
    }
}

/// A password of 24 letters and digits from the kernel's random source.
pub fn generate_password() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut raw = [0u8; 64];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw)).context("reading /dev/urandom")?;
    // Rejection sampling keeps every letter equally likely.
    let limit = 256 - 256 % ALPHABET.len();
    let pw: String = raw.iter().filter(|&&b| usize::from(b) < limit).take(24).map(|&b| ALPHABET[usize::from(b) % ALPHABET.len()] as char).collect();
    if pw.len() < 24 {
        return generate_password();
    }
    Ok(pw)
}

/// What provisioning did.
#[derive(Debug)]
pub struct Summary {
    pub backend: &'static str,
    pub plan: Option<SessionPlan>,
    pub files: Vec<PathBuf>,
    pub removed_users: Vec<String>,
}

/// Creates the session: vhost, exchange, users, permissions, files.
pub fn provision(o: &Options) -> anyhow::Result<Summary> {
    let plan = plan::plan(&o.session, &o.agents, || generate_password().unwrap_or_default()).map_err(anyhow::Error::msg)?;
    if plan.users.iter().any(|u| u.password.len() < 24) {
        bail!("could not generate passwords");
    }
    let backend = Backend::choose(o)?;
    backend.add_vhost(&plan.vhost)?;
    let admin_user = o.admin.username.clone().unwrap_or_else(|| "guest".into());
    backend.admin_permissions(&plan.vhost, &admin_user)?;
    declare_exchange(o, &plan)?;
    for u in &plan.users {
        backend.put_user(&u.user, &u.password, &plan.tag)?;
        backend.permissions(&plan.vhost, &u.user, &plan.exchange, &u.permissions)?;
    }
    let mut files = Vec::new();
    if let Some(dir) = &o.out {
        files = write_files(dir, o, &plan)?;
    }
    Ok(Summary { backend: backend.name(), plan: Some(plan), files, removed_users: Vec::new() })
}

/// Removes the session: its vhost (queues, exchange and all) and its users.
pub fn revoke(o: &Options) -> anyhow::Result<Summary> {
    let backend = Backend::choose(o)?;
    let tag = plan::session_tag(&o.session);
    let users = backend.users_tagged(&tag)?;
    for u in &users {
        backend.delete_user(u)?;
    }
    backend.delete_vhost(&o.session)?;
    Ok(Summary { backend: backend.name(), plan: None, files: Vec::new(), removed_users: users })
}

/// The session's exchange, durable, declared as the administrator in the new vhost.
fn declare_exchange(o: &Options, plan: &SessionPlan) -> anyhow::Result<()> {
    let endpoint = Endpoint::new(o.admin.with_vhost(&plan.vhost), &o.tls).map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    let stop = Stop::new();
    let mut c = Client::open(&endpoint, &ConnectOptions::new("tunbus provision"), stop.flag()).context("connecting to the broker as the administrator")?;
    c.exchange_declare_with(&plan.exchange, ExchangeOptions { passive: false, durable: true, auto_delete: false }, stop.flag())
        .with_context(|| format!("declaring the exchange {}", plan.exchange))?;
    c.close(std::time::Duration::from_millis(300));
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn write_files(dir: &Path, o: &Options, plan: &SessionPlan) -> anyhow::Result<Vec<PathBuf>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    for u in &plan.users {
        let url = o.admin.with_credentials(&u.user, &u.password).with_vhost(&plan.vhost);
        let path = dir.join(format!("{}.url", u.agent));
        write_private(&path, &format!("{}\n", url.to_secret_string()))?;
        files.push(path);
    }
    let peers = dir.join("peers");
    write_private(&peers, &plan.peers_file())?;
    files.push(peers);
    Ok(files)
}
