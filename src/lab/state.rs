//! The lab's state file (`/run/tunbus/lab-<session>.json`), written before anything it
//! names is created, and the clean-up of what a dead lab of a session left.
//!
//! Main thread (and the lab's guard process); not on the hot path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::broker::PrivateBroker;
use super::bus::revoke_local;
use super::hosts::{delete_namespaces, session_namespaces};
use super::plan;

/// Where lab state files live.
pub const STATE_DIR: &str = crate::config::RUN_DIR;

/// What a lab leaves on the machine, recorded before it is created.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) pid: u32,
    pub(super) session: String,
    pub(super) hosts: usize,
    pub(super) broker_node: Option<String>,
    pub(super) broker_port: Option<u16>,
    /// The private nodes of a `--brokers N` cluster, (node, port), under `temp_dir`.
    #[serde(default)]
    pub(super) cluster: Vec<(String, u16)>,
    pub(super) temp_dir: Option<PathBuf>,
    /// The session was provisioned on this broker (admin URL without password when it is
    /// the default one); the next run revokes it.
    #[serde(default)]
    pub(super) provisioned_on: Option<String>,
}

pub(super) fn state_path(session: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("lab-{session}.json"))
}

/// Writes the state file atomically (a temporary file renamed over it): the lab's guard
/// reads it every 100 ms, and a file caught half-written would read as "the lab is done",
/// so that the guard left without cleaning up.
pub(super) fn write_state(state: &State) -> anyhow::Result<()> {
    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let path = state_path(&state.session);
    let temp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&temp, serde_json::to_vec(state)?).context("writing the lab state file")?;
    std::fs::rename(&temp, &path).context("writing the lab state file")
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not).
pub(super) fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z'))).unwrap_or(false)
}

/// Removes what a dead lab of `session` left. Errors if a lab of that session still runs.
pub fn cleanup_session(session: &str) -> anyhow::Result<usize> {
    let path = state_path(session);
    let state: Option<State> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(s) = &state {
        if s.pid != std::process::id() && process_alive(s.pid) {
            bail!("a lab of session {session:?} is running (pid {}); stop it, or use another --session", s.pid);
        }
        if let (Some(node), Some(port), Some(dir)) = (&s.broker_node, s.broker_port, &s.temp_dir) {
            PrivateBroker { node: node.clone(), port, dir: dir.join("rabbitmq") }.stop();
        } else if let (false, Some(dir)) = (s.cluster.is_empty(), &s.temp_dir) {
            for (i, (node, port)) in s.cluster.iter().enumerate() {
                PrivateBroker { node: node.clone(), port: *port, dir: dir.join(format!("node{}", i + 1)) }.stop();
            }
        } else if s.provisioned_on.is_some() {
            revoke_local(session);
        }
        if let Some(dir) = &s.temp_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let names = session_namespaces(session);
    delete_namespaces(&names);
    super::radio::remove_radio_dir(session);
    super::dhcp::cleanup(session);
    let _ = std::fs::remove_file(&path);
    // A lab killed between writing and renaming its state leaves the temporary file.
    let temp_prefix = format!("lab-{session}.json.");
    for e in std::fs::read_dir(STATE_DIR).into_iter().flatten().flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(&temp_prefix) && n.ends_with(".tmp")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(names.len())
}

/// `agent lab --cleanup`: every session with a state file, and the default session.
pub fn cleanup_all() -> anyhow::Result<()> {
    let mut sessions = vec![plan::DEFAULT_SESSION.to_owned()];
    if let Ok(dir) = std::fs::read_dir(STATE_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(s) = name.strip_prefix("lab-").and_then(|n| n.strip_suffix(".json")) {
                sessions.push(s.to_owned());
            }
        }
    }
    sessions.sort();
    sessions.dedup();
    for s in sessions {
        match cleanup_session(&s) {
            Ok(n) => println!("session {s}: removed {n} namespace(s)"),
            Err(e) => println!("session {s}: {e:#}"),
        }
    }
    Ok(())
}
