//! `agent provision`: a session of its own on a shared broker, and an identity for each
//! of its agents.
//!
//! For session `S` it creates the vhost `S`, the durable topic exchange `tunbus.S`, one
//! user `S.<agent>` per agent with a generated password (stored as RabbitMQ's salted
//! SHA-256) and the permissions of [`plan`] (its own queues, the session's exchange, its
//! own address keys), all in one definitions import, and writes each agent's URL file (mode
//! 0600) and the session's peers file (strict mode). `--revoke` removes the vhost and every
//! user tagged with the session.
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

use crate::amqp::tls::TlsOptions;
use crate::amqp::url::BrokerUrl;
use http::{segment, Api};
use plan::{AgentSpec, SessionPlan};

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
    /// Capture users (`--observer`): they read the whole session and send nothing.
    pub observers: Vec<String>,
    /// Where to write the URL files and the peers file.
    pub out: Option<PathBuf>,
    /// Use `rabbitmqctl -n NODE` (a private node of this machine) instead of looking for
    /// the API.
    pub node: Option<String>,
    /// `--keys`: a private key per agent (`NAME.key`, mode 0600), the public keys in the
    /// peers file, and `e2e`/`private-key` in each `NAME.toml` (end-to-end encryption).
    pub keys: bool,
}

/// How the broker's users and permissions are changed.
enum Backend {
    Api(Api),
    /// `rabbitmqctl`, of node `-n NODE` when given.
    Ctl(Option<String>),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Api(_) => "the management HTTP API",
            Backend::Ctl(_) => "rabbitmqctl on this machine",
        }
    }

    /// The API if it answers, else `rabbitmqctl` when the broker is on this machine.
    fn choose(o: &Options) -> anyhow::Result<Backend> {
        if o.node.is_some() {
            return Ok(Backend::Ctl(o.node.clone()));
        }
        let base = o
            .api
            .clone()
            .unwrap_or_else(|| format!("http://{}:15672", if o.admin.host.contains(':') { format!("[{}]", o.admin.host) } else { o.admin.host.clone() }));
        let api = Api::new(&base, o.admin.username.as_deref().unwrap_or("guest"), o.admin.password().unwrap_or("guest"), &o.tls)?;
        match api.request("GET", "/api/overview", None, &[]) {
            Ok(_) => return Ok(Backend::Api(api)),
            Err(http::HttpError::Connect(..)) if o.api.is_none() => {}
            Err(e @ http::HttpError::Status(_, 401 | 403, ..)) => {
                bail!("{e}: the URL's user must be an administrator of the broker (RabbitMQ's administrator tag): provisioning creates vhosts, users and permissions")
            }
            Err(e) => return Err(e.into()),
        }
        let local = matches!(o.admin.host.as_str(), "localhost" | "127.0.0.1" | "::1");
        let no_api = format!("agent provision needs RabbitMQ's management API, and none answers at {base} (on the broker: rabbitmq-plugins enable rabbitmq_management, and open port 15672 to this machine; or give --api URL)");
        if !local {
            bail!("{no_api}; the fallback, rabbitmqctl, works only on the broker's own machine");
        }
        let status = Command::new("rabbitmqctl").arg("-q").arg("status").output();
        match status {
            Ok(r) if r.status.success() => Ok(Backend::Ctl(None)),
            // Debian's rabbitmqctl reads the Erlang cookie of root or the rabbitmq user.
            _ if !crate::sys::is_root() => {
                bail!("{no_api}; the fallback on this machine, rabbitmqctl, needs root: run agent provision as root (sudo), or enable the API")
            }
            Ok(r) => bail!("{no_api}; the fallback on this machine, rabbitmqctl, failed: {}", String::from_utf8_lossy(&r.stderr).trim()),
            Err(e) => bail!("{no_api}; the fallback on this machine, rabbitmqctl, cannot run: {e}"),
        }
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("rabbitmqctl");
        cmd.arg("-q");
        if let Backend::Ctl(Some(node)) = self {
            cmd.args(["-n", node]);
        }
        let out = cmd.args(args).output().context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!("rabbitmqctl {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports definitions (vhost, exchange, users, permissions) in one call: a session of
    /// hundreds of agents takes as long as one of two.
    fn import(&self, defs: &serde_json::Value) -> anyhow::Result<()> {
        match self {
            Backend::Api(a) => a.request("POST", "/api/definitions", Some(&defs.to_string()), &[]).map(drop)?,
            Backend::Ctl(_) => {
                let path = std::env::temp_dir().join(format!("tunbus-definitions-{}-{}.json", std::process::id(), crate::util::now_ns()));
                write_private(&path, &defs.to_string())?;
                // The rabbitmq user reads it (Debian's rabbitmqctl runs as that user).
                let _ = Command::new("chown").arg("rabbitmq").arg(&path).status();
                let r = self.ctl(&["import_definitions", &path.to_string_lossy()]);
                let _ = std::fs::remove_file(&path);
                r?;
            }
        }
        Ok(())
    }

    /// Users carrying `tag`.
    fn users_tagged(&self, tag: &str) -> anyhow::Result<Vec<String>> {
        let list: serde_json::Value = match self {
            Backend::Api(a) => serde_json::from_str(&a.request("GET", "/api/users", None, &[])?.1)?,
            Backend::Ctl(_) => serde_json::from_str(&self.ctl(&["list_users", "--formatter", "json"])?)?,
        };
        let mut out = Vec::new();
        for u in list.as_array().map(Vec::as_slice).unwrap_or_default() {
            let name = u["name"].as_str().or_else(|| u["user"].as_str()).unwrap_or_default();
            let tags: Vec<String> = match &u["tags"] {
                serde_json::Value::Array(a) => a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect(),
                serde_json::Value::String(s) => s.split(',').map(|t| t.trim().to_owned()).collect(),
                _ => Vec::new(),
            };
            if tags.iter().any(|t| t == tag) {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }

    /// Deletes `users` in one call.
    fn delete_users(&self, users: &[String]) -> anyhow::Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        match self {
            Backend::Api(a) => a.request("POST", "/api/users/bulk-delete", Some(&json!({ "users": users }).to_string()), &[]).map(drop)?,
            Backend::Ctl(_) => {
                // One Erlang call for all of them (a rabbitmqctl per user takes half a second).
                let list: Vec<String> = users.iter().map(|u| format!("<<\"{}\">>", u.replace('\\', "\\\\").replace('"', "\\\""))).collect();
                let code = format!("[catch rabbit_auth_backend_internal:delete_user(U, <<\"tunbus\">>) || U <- [{}]], ok.", list.join(","));
                self.ctl(&["eval", &code])?;
            }
        }
        Ok(())
    }

    fn delete_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        match self {
            Backend::Api(a) => a.request("DELETE", &format!("/api/vhosts/{}", segment(vhost)), None, &[404]).map(drop)?,
            Backend::Ctl(_) => {
                if self.ctl(&["list_vhosts"])?.lines().any(|l| l.trim() == vhost) {
                    self.ctl(&["delete_vhost", vhost])?;
                }
            }
        }
        Ok(())
    }
}

/// RabbitMQ's password hash (`rabbit_password_hashing_sha256`): base64 of a 4-byte salt
/// followed by SHA-256 of the salt and the password.
pub fn password_hash(password: &str, salt: [u8; 4]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    crate::util::base64(&out)
}

/// The definitions that make `plan` (RabbitMQ's import format).
pub fn definitions(plan: &SessionPlan, salt: &mut impl FnMut() -> [u8; 4]) -> serde_json::Value {
    let users: Vec<_> = plan
        .users
        .iter()
        .map(|u| json!({ "name": u.user, "password_hash": password_hash(&u.password, salt()), "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": plan.tag, "limits": {} }))
        .collect();
    let perms: Vec<_> = plan
        .users
        .iter()
        .map(|u| json!({ "user": u.user, "vhost": plan.vhost, "configure": u.permissions.configure, "write": u.permissions.write, "read": u.permissions.read }))
        .collect();
    let topic: Vec<_> = plan
        .users
        .iter()
        .map(
            |u| json!({ "user": u.user, "vhost": plan.vhost, "exchange": plan.exchange, "write": u.permissions.topic_write, "read": u.permissions.topic_read }),
        )
        .collect();
    json!({
        "vhosts": [{ "name": plan.vhost }],
        "users": users,
        "permissions": perms,
        "topic_permissions": topic,
        "exchanges": [{ "name": plan.exchange, "vhost": plan.vhost, "type": "topic", "durable": true, "auto_delete": false, "internal": false, "arguments": {} }],
    })
}

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut raw = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw)).context("reading /dev/urandom")?;
    Ok(raw)
}

/// A password of 24 letters and digits from the kernel's random source.
pub fn generate_password() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let raw: [u8; 64] = random_bytes()?;
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
    let mut plan = plan::plan(&o.session, &o.agents, || generate_password().unwrap_or_default()).map_err(anyhow::Error::msg)?;
    for name in &o.observers {
        plan::add_observer(&mut plan, name, generate_password().unwrap_or_default()).map_err(anyhow::Error::msg)?;
    }
    if plan.users.iter().any(|u| u.password.len() < 24) {
        bail!("could not generate passwords");
    }
    let backend = Backend::choose(o)?;
    let mut salt_error = None;
    let defs = definitions(&plan, &mut || {
        random_bytes().unwrap_or_else(|e| {
            salt_error = Some(e);
            [0; 4]
        })
    });
    if let Some(e) = salt_error {
        return Err(e);
    }
    backend.import(&defs).context("importing the session's definitions")?;
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
    backend.delete_users(&users)?;
    backend.delete_vhost(&o.session)?;
    Ok(Summary { backend: backend.name(), plan: None, files: Vec::new(), removed_users: users })
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn write_files(dir: &Path, o: &Options, plan: &SessionPlan) -> anyhow::Result<Vec<PathBuf>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The configurations name the other files by absolute paths: the unit runs agents from /.
    let dir = &std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let mut files = Vec::new();
    let peers = dir.join("peers");
    let mut publics: Vec<(String, String)> = Vec::new();
    for u in &plan.users {
        let url = o.admin.with_credentials(&u.user, &u.password).with_vhost(&plan.vhost);
        let path = dir.join(format!("{}.url", u.agent));
        write_private(&path, &format!("{}\n", url.to_secret_string()))?;
        files.push(path.clone());
        if !u.observer {
            let config = dir.join(format!("{}.toml", u.agent));
            let spec = o.agents.iter().find(|a| a.name == u.agent).map(|a| a.prefixes.as_slice()).unwrap_or_default();
            let mut text = agent_config(plan, &u.agent, spec, &path, &peers, o.tls.ca.as_deref());
            if o.keys {
                let key = crate::e2e::keys::PrivateKey::generate().map_err(anyhow::Error::msg)?;
                let key_path = dir.join(format!("{}.key", u.agent));
                write_private(&key_path, &key.to_file_text())?;
                files.push(key_path.clone());
                publics.push((u.user.clone(), key.public().to_string()));
                text.push_str(&e2e_config(&key_path));
            }
            write_private(&config, &text)?;
            files.push(config);
        }
    }
    write_private(&peers, &with_keys(&plan.peers_file(), &publics))?;
    files.push(peers);
    Ok(files)
}

/// The lines `NAME.toml` gets with `--keys`: end-to-end encryption on, with the agent's key.
fn e2e_config(key: &Path) -> String {
    let mut t = toml::Table::new();
    t.insert("e2e".into(), toml::Value::Boolean(true));
    t.insert("private-key".into(), toml::Value::String(key.display().to_string()));
    toml::to_string(&t).unwrap_or_default()
}

/// A peers file with `key=PUBLIC` on the line of each user in `keys` (user, public key).
fn with_keys(peers: &str, keys: &[(String, String)]) -> String {
    let mut out = String::with_capacity(peers.len() + keys.len() * 70);
    for line in peers.lines() {
        out.push_str(line);
        let user = line.split_whitespace().next().unwrap_or("");
        if let Some((_, k)) = keys.iter().find(|(u, _)| u == user) {
            out.push_str(&format!(" {}{k}", crate::identity::peers_file::KEY_ITEM));
        }
        out.push('\n');
    }
    out
}

/// `NAME.toml` of one agent: what `agent connect --config` and the unit `tunbus-agent@NAME`
/// (which reads `/etc/tunbus/NAME.toml`) need to join the session, and nothing else.
pub fn agent_config(plan: &SessionPlan, agent: &str, prefixes: &[crate::route::Prefix], url_file: &Path, peers: &Path, tls_ca: Option<&Path>) -> String {
    let mut t = toml::Table::new();
    let text = |s: &str| toml::Value::String(s.to_owned());
    t.insert("name".into(), text(agent));
    t.insert("session".into(), text(&plan.session));
    t.insert("url-file".into(), text(&url_file.display().to_string()));
    t.insert("peers".into(), text(&peers.display().to_string()));
    for (key, v4) in [("ipv4", true), ("ipv6", false)] {
        let list: Vec<toml::Value> = prefixes.iter().filter(|p| p.addr.is_ipv4() == v4).map(|p| text(&p.to_string())).collect();
        if !list.is_empty() {
            t.insert(key.into(), toml::Value::Array(list));
        }
    }
    if let Some(ca) = tls_ca {
        let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.to_owned());
        t.insert("tls-ca".into(), text(&ca.display().to_string()));
    }
    format!(
        "# Agent {agent} of session {}, written by `agent provision`. Run it with\n#   agent connect --config THIS_FILE\n# or as /etc/tunbus/{agent}.toml with `systemctl enable --now tunbus-agent@{agent}`.\n# The URL file holds the password: keep both files mode 0600.\n{}",
        plan.session,
        toml::to_string(&t).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_are_rabbitmqs() {
        // RabbitMQ 3.10: rabbitmqctl eval 'base64:encode(rabbit_password:salted_hash(
        // rabbit_password_hashing_sha256, <<144,141,198,10>>, <<"guest">>)).' gives
        // uzAEs1lDMckn3lAujJ8BWihiGe9/uNuqJb0GM5hSWh4= for the hash; stored with the salt first.
        let h = password_hash("guest", [0x90, 0x8d, 0xc6, 0x0a]);
        assert_eq!(h, "kI3GCrswBLNZQzHJJ95QLoyfAVooYhnvf7jbqiW9BjOYUloe");
        assert_eq!(crate::util::base64(&[0x90, 0x8d, 0xc6, 0x0a]).get(..5), h.get(..5));
    }

    #[test]
    fn each_agent_gets_a_configuration_connect_reads() {
        let agents: Vec<AgentSpec> = vec!["h1=198.18.0.1/24,fd00:7b::1/64".parse().unwrap()];
        let plan = plan::plan("lab", &agents, || "pw".into()).unwrap();
        let text = agent_config(&plan, "h1", &agents[0].prefixes, Path::new("/etc/tunbus/lab/h1.url"), Path::new("/etc/tunbus/lab/peers"), None);
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["name"].as_str(), Some("h1"));
        assert_eq!(t["session"].as_str(), Some("lab"));
        assert_eq!(t["url-file"].as_str(), Some("/etc/tunbus/lab/h1.url"));
        assert_eq!(t["peers"].as_str(), Some("/etc/tunbus/lab/peers"));
        assert_eq!(t["ipv4"].as_array().unwrap()[0].as_str(), Some("198.18.0.1/24"));
        assert_eq!(t["ipv6"].as_array().unwrap()[0].as_str(), Some("fd00:7b::1/64"));
        assert!(!text.contains("pw"), "no password in the configuration:\n{text}");
    }

    #[test]
    fn keys_go_into_the_peers_file_and_each_configuration() {
        let agents: Vec<AgentSpec> = vec!["h1=198.18.0.1/24".parse().unwrap(), "h2=198.18.0.2/24".parse().unwrap()];
        let plan = plan::plan("lab", &agents, || "pw".into()).unwrap();
        let k = "ab".repeat(32);
        let text = with_keys(&plan.peers_file(), &[("lab.h2".to_owned(), k.clone())]);
        let keys = crate::identity::peers_file::keys(&text).unwrap();
        assert_eq!(keys, vec![("lab.h2".to_owned(), [0xab; 32])]);
        assert!(crate::identity::peers_file::parse(&text, Some("lab")).is_ok(), "{text}");
        let mut conf = agent_config(&plan, "h1", &agents[0].prefixes, Path::new("/u"), Path::new("/p"), None);
        conf.push_str(&e2e_config(Path::new("/etc/tunbus/lab/h1.key")));
        let t: toml::Table = toml::from_str(&conf).unwrap();
        assert_eq!(t["e2e"].as_bool(), Some(true));
        assert_eq!(t["private-key"].as_str(), Some("/etc/tunbus/lab/h1.key"));
    }

    #[test]
    fn definitions_carry_every_part_of_the_plan() {
        let agents = vec!["h1=198.18.0.1/24".parse().unwrap()];
        let plan = plan::plan("lab", &agents, || "pw".into()).unwrap();
        let d = definitions(&plan, &mut || [1, 2, 3, 4]);
        assert_eq!(d["vhosts"][0]["name"], "lab");
        assert_eq!(d["users"][0]["name"], "lab.h1");
        assert_eq!(d["users"][0]["tags"], "tunbus-lab");
        assert_eq!(d["permissions"][0]["vhost"], "lab");
        assert_eq!(d["topic_permissions"][0]["exchange"], "tunbus.lab");
        assert_eq!(d["exchanges"][0]["durable"], true);
        assert_eq!(d["exchanges"][0]["auto_delete"], false);
    }
}
