//! `agent lab --topology FILE`: which lab hosts are linked, and how each link behaves.
//! Pure: the file is parsed and checked here, and turned into each host's emulation.
//!
//! ```yaml
//! hosts: 3                  # h1, h2, h3
//! links:
//!   - between: [h1, h2]
//!     emulate: delay 10ms loss 1%
//!   - between: [h2, h3]     # a plain link
//! ```
//! A link's `emulate` (tc-netem words, `emulate::spec`) applies in each direction, as netem
//! on both ends of a cable: `delay 10ms` makes a 20 ms round trip. Hosts without a link
//! cannot reach each other: each drops what it would send to the other (counted as
//! `emulated`). Broadcast and multicast are not filtered.

use std::net::IpAddr;

use serde::Deserialize;

use crate::emulate::{Emulation, Spec};

/// Most hosts of a topology lab (every ordered pair is pinged).
pub const MAX_HOSTS: usize = 64;

/// The file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    hosts: Option<usize>,
    #[serde(default)]
    links: Vec<LinkEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkEntry {
    between: [String; 2],
    #[serde(default)]
    emulate: Option<String>,
}

/// One link between hosts `a` and `b` (indices from 0), and its emulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    pub spec: Option<Spec>,
}

/// A checked topology.
#[derive(Clone, Debug, PartialEq)]
pub struct LabTopology {
    pub hosts: usize,
    pub links: Vec<Link>,
}

/// Host name → index: `h1` is 0.
fn index_of(name: &str, hosts: usize) -> Option<usize> {
    let i: usize = name.strip_prefix('h')?.parse().ok()?;
    (1..=hosts).contains(&i).then(|| i - 1)
}

impl LabTopology {
    /// Parses and checks a topology file's text; `hosts` is `--hosts`, when given (the
    /// file's `hosts:` may then be left out, and must agree when it is not).
    pub fn parse(text: &str, hosts: Option<usize>) -> Result<LabTopology, String> {
        let file: File = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let n = match (file.hosts, hosts) {
            (Some(f), Some(h)) if f != h => return Err(format!("the file has hosts: {f}, the command line --hosts {h}: give one, or the same")),
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => return Err("how many hosts? add `hosts: N` to the file, or give --hosts N".into()),
        };
        if !(2..=MAX_HOSTS).contains(&n) {
            return Err(format!("hosts: {n} (a topology has 2 to {MAX_HOSTS} hosts)"));
        }
        let mut links: Vec<Link> = Vec::new();
        for entry in file.links {
            let [x, y] = &entry.between;
            let a = index_of(x, n).ok_or_else(|| format!("link {x}–{y}: {x:?} is not a host (h1 … h{n})"))?;
            let b = index_of(y, n).ok_or_else(|| format!("link {x}–{y}: {y:?} is not a host (h1 … h{n})"))?;
            if a == b {
                return Err(format!("link {x}–{y}: a host cannot be linked to itself"));
            }
            if links.iter().any(|l| (l.a, l.b) == (a.min(b), a.max(b))) {
                return Err(format!("link {x}–{y} is given twice"));
            }
            let spec = entry.emulate.as_deref().map(str::parse::<Spec>).transpose().map_err(|e| format!("link {x}–{y}: {e}"))?;
            links.push(Link { a: a.min(b), b: a.max(b), spec });
        }
        Ok(LabTopology { hosts: n, links })
    }

    /// The link between hosts `a` and `b`, if they are linked.
    pub fn link(&self, a: usize, b: usize) -> Option<&Link> {
        self.links.iter().find(|l| (l.a, l.b) == (a.min(b), a.max(b)))
    }

    /// Host `i`'s emulation: its links' specs towards its peers, and a link that drops
    /// everything towards the hosts it has no link with. `names[j]` and `addrs[j]` are
    /// host j's name and addresses (known from the plan, before any hello).
    pub fn emulation_of(&self, i: usize, names: &[String], seed: u64) -> Emulation {
        let mut to = Vec::new();
        for (j, name) in names.iter().enumerate().filter(|(j, _)| *j != i) {
            match self.link(i, j) {
                Some(Link { spec: Some(spec), .. }) => to.push((name.clone(), spec.clone())),
                Some(_) => {}
                None => to.push((name.clone(), Spec::unlinked())),
            }
        }
        Emulation { all: None, to, seed, known: Vec::new() }
    }

    /// The addresses each `--emulate-to` peer has, from the plan.
    pub fn addresses(names: &[String], addrs: &[Vec<IpAddr>]) -> Vec<(String, Vec<IpAddr>)> {
        names.iter().cloned().zip(addrs.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = "hosts: 3\nlinks:\n  - between: [h1, h2]\n    emulate: delay 10ms\n  - between: [h3, h2]\n";

    #[test]
    fn parses_and_turns_into_emulation() {
        let t = LabTopology::parse(THREE, None).unwrap();
        assert_eq!(LabTopology::parse(THREE, Some(3)).unwrap(), t);
        assert_eq!(LabTopology::parse("links:\n  - between: [h1, h2]\n", Some(5)).unwrap().hosts, 5, "--hosts when the file has none");
        assert_eq!(t.links.len(), 2);
        assert_eq!(t.link(1, 0).and_then(|l| l.spec.clone()), Some("delay 10ms".parse().unwrap()));
        assert!(t.link(1, 2).is_some_and(|l| l.spec.is_none()));
        assert!(t.link(0, 2).is_none());
        let names: Vec<String> = ["h1", "h2", "h3"].map(String::from).to_vec();
        let h1 = t.emulation_of(0, &names, 7);
        assert_eq!(h1.to, vec![("h2".to_owned(), "delay 10ms".parse().unwrap()), ("h3".to_owned(), Spec::unlinked())]);
        assert_eq!(h1.seed, 7);
        let h2 = t.emulation_of(1, &names, 7);
        assert_eq!(h2.to, vec![("h1".to_owned(), "delay 10ms".parse().unwrap())], "h2–h3 is a plain link");
    }

    #[test]
    fn mistakes_name_the_link() {
        for (text, says) in [
            ("hosts: 3\nlinks:\n  - between: [h1, h4]\n", "\"h4\" is not a host"),
            ("hosts: 3\nlinks:\n  - between: [h1, h1]\n", "itself"),
            ("hosts: 3\nlinks:\n  - between: [h1, h2]\n  - between: [h2, h1]\n", "twice"),
            ("hosts: 3\nlinks:\n  - between: [h1, h2]\n    emulate: delay fast\n", "link h1–h2"),
            ("hosts: 1\n", "2 to"),
            ("hosts: 3\nlinkz: []\n", "unknown field"),
            ("links: []\n", "how many hosts"),
        ] {
            let e = LabTopology::parse(text, None).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        let e = LabTopology::parse("hosts: 3\n", Some(6)).unwrap_err();
        assert!(e.contains("--hosts 6: give one, or the same"), "{e}");
    }
}
