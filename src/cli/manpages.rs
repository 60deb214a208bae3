//! `agent manpages DIR` (hidden, for packaging): the man pages, from the same definitions
//! as `--help`.
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;

use clap::Args;

use super::command;

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// Folder to write `agent.1`, `agent-connect.1`, … into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

impl ManpagesArgs {
    /// Writes one page for `agent` and one for each visible subcommand, from the same
    /// definitions as `--help` (so they cannot drift).
    pub fn write(&self) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(&self.dir)?;
        let root = command().name("agent");
        let mut written = Vec::new();
        let mut page = |cmd: clap::Command, name: &str| -> std::io::Result<()> {
            let path = self.dir.join(format!("{name}.1"));
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            std::fs::write(&path, out)?;
            written.push(path);
            Ok(())
        };
        for sub in root.get_subcommands().filter(|c| !c.is_hide_set()) {
            let name = format!("agent-{}", sub.get_name());
            page(sub.clone().name(name.clone()).bin_name(format!("agent {}", sub.get_name())), &name)?;
        }
        page(root, "agent")?;
        Ok(written)
    }
}
