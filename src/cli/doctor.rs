//! `agent doctor`: connect's flags (and `--config` file and variables: it checks the start
//! they describe), and the management API to read the broker's clock from.
//!
//! Main thread, once per run; not on the hot path.

use clap::Args;

use super::ConnectArgs;

#[derive(Debug, Args)]
#[command(after_help = DOCTOR_AFTER_HELP)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The broker's management API, to read its clock from its Date header [default:
    /// http://<broker host>:15672].
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
}

const DOCTOR_AFTER_HELP: &str = "Checks, in order: the TUN device, the capabilities, the configuration, the namespace and the \
interface name, the broker's address, TLS and its certificate, the login, the vhost, the permissions of this agent's keys \
(declared, bound and published as the agent does, on a throw-away queue), the MTU, and the clock against the broker's. \
One line per check, with the fix for each failure; the exit code is the one `agent connect` would end with \
(agent --help lists them).\n\nExample: sudo -E agent doctor --config /etc/tunbus/h1.toml";

impl DoctorArgs {
    /// What the doctor checks: the configuration connect would build, and the URLs as given.
    pub fn inputs(self) -> crate::doctor::Inputs {
        let broker = &self.connect.bus.broker;
        let urls = broker.urls().map_err(anyhow::Error::from);
        let tls = broker.tls();
        let (netns, userspace) = (self.connect.netns.clone(), self.connect.userspace);
        crate::doctor::Inputs { config: self.connect.into_config(), urls, tls, netns, userspace, api: self.api }
    }
}
