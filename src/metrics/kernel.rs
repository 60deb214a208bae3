//! What the kernel counts for our TUN that we cannot see ourselves: packets it dropped
//! because the TUN queue was full (`tx_dropped`: the route sent a packet to the interface
//! while its queue worker was busy and the queue of 500 packets was full). Read from
//! `/proc/net/dev` of the interface's namespace, a file opened once from a thread inside
//! that namespace (the file keeps the namespace it was opened in), and stored as the
//! `tun_queue_full` drops of a sending-side counter block of its own, so every report and the metrics
//! endpoint include it. Control plane: once a second, and before the final report.

use std::fs::File;
use std::io::{Read, Seek};

use super::{DropReason, TxCounters};

/// The kernel's transmit drops of one interface.
pub struct KernelDrops {
    dev: File,
    ifname: String,
    buf: String,
}

impl KernelDrops {
    /// Opens the statistics of `ifname` in `netns` (`None`: this namespace).
    pub fn open(netns: Option<&str>, ifname: &str) -> std::io::Result<KernelDrops> {
        let dev = crate::sys::in_netns(netns, || File::open("/proc/thread-self/net/dev"))?;
        Ok(KernelDrops { dev, ifname: ifname.to_owned(), buf: String::new() })
    }

    /// Reads the current count into `counters` (as `tun_queue_full`); `false` when the
    /// interface is not listed (gone) or the file cannot be read.
    pub fn refresh(&mut self, counters: &TxCounters) -> bool {
        self.buf.clear();
        if self.dev.rewind().is_err() || self.dev.read_to_string(&mut self.buf).is_err() {
            return false;
        }
        match tx_dropped(&self.buf, &self.ifname) {
            Some(n) => {
                counters.set_drop(DropReason::TunQueueFull, n);
                true
            }
            None => false,
        }
    }
}

/// The transmit `drop` column of `ifname` in the text of `/proc/net/dev`.
pub fn tx_dropped(dev: &str, ifname: &str) -> Option<u64> {
    dev.lines().find_map(|line| {
        let (name, fields) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop …
        fields.split_whitespace().nth(11)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
   tb0: 1048576    4096    0    2    0     0          0         0  2097152    8192    0  731    0     0       0          0
";

    #[test]
    fn the_transmit_drop_column_of_the_named_interface() {
        assert_eq!(tx_dropped(DEV, "tb0"), Some(731));
        assert_eq!(tx_dropped(DEV, "lo"), Some(0));
        assert_eq!(tx_dropped(DEV, "tb1"), None);
        assert_eq!(tx_dropped("garbage\n:::\n", "tb0"), None);
    }

    #[test]
    fn this_namespace_lists_loopback() {
        let mut k = KernelDrops::open(None, "lo").expect("/proc/thread-self/net/dev");
        let c = TxCounters::default();
        assert!(k.refresh(&c));
        assert!(k.refresh(&c), "the file reads again");
    }
}
