//! `agent completions SHELL`: the shell completion script, from the same definitions as
//! `--help`.
//!
//! Main thread, once per run; not on the hot path.

use clap::Args;

use super::command;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_parser = clap::value_parser!(clap_complete::Shell))]
    pub shell: clap_complete::Shell,
}

impl CompletionsArgs {
    /// Writes the completion script for `agent` (and its `ioppytest-agent` name) to `out`.
    pub fn write(&self, out: &mut dyn std::io::Write) {
        let mut command = command();
        clap_complete::generate(self.shell, &mut command, "agent", out);
    }
}
