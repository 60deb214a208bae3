//! The lab's guard: a second `agent` process that outlives a lab killed without warning
//! (SIGKILL, a second Ctrl-C, a crash) and removes what it left, at once rather than at
//! the next run: its namespaces, its private broker nodes, their folder, a provisioned
//! session (everything its state file names, see [`super::cleanup_session`]).
//!
//! Started by the lab right after it wrote its state file and before it created anything;
//! in its own process group, so the Ctrl-C meant for the lab does not reach it. It polls
//! its parent: when the lab ends cleanly the state file goes first and the guard just
//! exits; when the guard is orphaned while the state file still names the lab, it cleans.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// How often the guard looks at its parent.
const POLL: Duration = Duration::from_millis(100);

/// Starts the guard of this process's lab of `session`.
pub fn spawn(session: &str) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the agent binary for the lab's guard")?;
    Command::new(exe)
        .args(["lab", "--session", session, "--guard"])
        .arg(std::process::id().to_string())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the lab's guard")?;
    Ok(())
}

/// Runs the guard of lab process `lab_pid`, session `session`, until that lab is gone.
pub fn run(lab_pid: u32, session: &str) -> anyhow::Result<()> {
    let state_path = super::state_path(session);
    loop {
        if !names(&state_path, lab_pid) {
            return Ok(()); // the lab tore itself down (or another run took the session over)
        }
        if std::os::unix::process::parent_id() != lab_pid {
            break; // orphaned: the lab died
        }
        std::thread::sleep(POLL);
    }
    if !names(&state_path, lab_pid) {
        return Ok(());
    }
    let removed = super::cleanup_session(session)?;
    eprintln!("agent lab (pid {lab_pid}) died: its guard removed {removed} namespace(s) and its private broker, if any");
    Ok(())
}

/// Whether the state file at `path` still belongs to lab `pid`.
fn names(path: &Path, pid: u32) -> bool {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<super::State>(&b).ok()).is_some_and(|s| s.pid == pid)
}
