//! `agent keygen`: a static X25519 key for end-to-end encryption (`connect --e2e`), as
//! `wg genkey`/`wg pubkey` do: the private key on standard output, the public key on
//! standard error; `--public` turns a private key on standard input into its public key.
//!
//! Main thread, once per run; not on the hot path.

use std::io::{Read, Write};

use clap::Args;

use crate::e2e::keys::PrivateKey;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Read a private key on standard input; print its public key on standard output.
    #[arg(long)]
    pub public: bool,
}

impl KeygenArgs {
    /// Does it, on the process's standard streams.
    pub fn run(&self) -> anyhow::Result<()> {
        if self.public {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            let key = PrivateKey::parse_file(&text).map_err(|e| anyhow::anyhow!("standard input: {e}"))?;
            println!("{}", key.public());
            return Ok(());
        }
        let key = PrivateKey::generate().map_err(anyhow::Error::msg)?;
        std::io::stdout().write_all(key.to_file_text().as_bytes())?;
        std::io::stdout().flush()?;
        eprintln!("public key: {}", key.public());
        Ok(())
    }
}
