//! The test configuration of an ioppytest session, pure: which nodes share a link.
//!
//! Accepted format (ioppytest's configuration YAML, e.g. `DUMMY_CFG.yaml`): one document,
//! optionally tagged `--- !configuration`, with a `topology` list whose entries have a
//! `link_id` and a `nodes` list of agent names. Other keys (`nodes`, `addressing`,
//! `description`, …) are ignored. Node names are matched exactly against agent names.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// The testing tool's own agent: it receives every node's packets.
pub const TESTING_TOOL: &str = "agent_TT";

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Link {
    #[serde(default)]
    pub link_id: String,
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct Configuration {
    #[serde(default)]
    configuration_id: Option<String>,
    topology: Vec<Link>,
}

/// Links of a session, and for each node the set it floods to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    pub id: Option<String>,
    pub links: Vec<Link>,
    peers: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("not YAML: {0}")]
    Yaml(String),
    #[error("no `topology` list of links with `nodes`: {0}")]
    Shape(String),
    #[error("the topology has no links")]
    Empty,
}

impl Topology {
    pub fn parse(text: &str) -> Result<Topology, TopologyError> {
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| TopologyError::Yaml(e.to_string()))?;
        // `--- !configuration` tags the whole document; look through the tag.
        let value = match value {
            serde_yaml_ng::Value::Tagged(t) => t.value,
            v => v,
        };
        let cfg: Configuration = serde_yaml_ng::from_value(value).map_err(|e| TopologyError::Shape(e.to_string()))?;
        if cfg.topology.is_empty() {
            return Err(TopologyError::Empty);
        }
        Ok(Topology::from_links(cfg.configuration_id, cfg.topology))
    }

    pub fn from_links(id: Option<String>, links: Vec<Link>) -> Topology {
        let mut peers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for link in &links {
            for a in &link.nodes {
                let set = peers.entry(a.clone()).or_default();
                set.extend(link.nodes.iter().filter(|b| *b != a).cloned());
            }
        }
        Topology { id, links, peers }
    }

    /// Where a packet from `node` goes: its link peers, and the testing tool (unless it
    /// is the sender). Empty for a node that is on no link.
    pub fn flood_targets(&self, node: &str) -> Vec<String> {
        let Some(peers) = self.peers.get(node) else { return Vec::new() };
        let mut out: Vec<String> = peers.iter().cloned().collect();
        if node != TESTING_TOOL && !peers.contains(TESTING_TOOL) {
            out.push(TESTING_TOOL.to_owned());
        }
        out
    }

    pub fn nodes(&self) -> impl Iterator<Item = &String> {
        self.peers.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_configuration_parses() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/ioppytest/DUMMY_CFG.yaml")).expect("vector");
        let t = Topology::parse(&text).expect("parses");
        assert_eq!(t.id.as_deref(), Some("DUMMY_CFG_01"));
        assert_eq!(t.links.len(), 1);
        assert_eq!(t.flood_targets("agent1"), ["agent2", "agent_TT"]);
        assert_eq!(t.flood_targets("agent2"), ["agent1", "agent_TT"]);
        assert!(t.flood_targets("stranger").is_empty());
    }

    #[test]
    fn several_links_and_the_testing_tool() {
        let t = Topology::parse("topology:\n  - link_id: a\n    nodes: [n1, n2]\n  - link_id: b\n    nodes: [n2, n3, agent_TT]\n").unwrap();
        assert_eq!(t.flood_targets("n2"), ["agent_TT", "n1", "n3"]);
        assert_eq!(t.flood_targets("n1"), ["n2", "agent_TT"]);
        assert_eq!(t.flood_targets("agent_TT"), ["n2", "n3"]);
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(matches!(Topology::parse("{"), Err(TopologyError::Yaml(_))));
        assert!(matches!(Topology::parse("nodes: [a]"), Err(TopologyError::Shape(_))));
        assert!(matches!(Topology::parse("topology: []"), Err(TopologyError::Empty)));
        assert!(matches!(Topology::parse("topology:\n  - link_id: x\n"), Err(TopologyError::Shape(_))));
        assert!(Topology::parse("").is_err());
    }
}
