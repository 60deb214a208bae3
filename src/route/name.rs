//! Agent names as a type: a name that is one topic word, so every key built from it (its
//! flood key, its hello and bye keys) exists. Checked once where a name comes in (the
//! command line, a config file, a hello off the bus); after that nothing can fail and no
//! code needs a fallback key. Pure.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use super::key::{is_valid_word, RoutingKey, MAX_WORD_LEN};

/// An agent's name on the bus: 1 to [`MAX_WORD_LEN`] printable ASCII characters, none of
/// `.`, `*`, `#` (one word of a topic routing key).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentName(String);

/// Why a string is not an agent name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("name {0:?} must be one topic word: 1 to 64 letters, digits, '-' or '_' (no '.', '*', '#', spaces)")]
pub struct NameError(pub String);

impl AgentName {
    pub fn new(name: &str) -> Result<AgentName, NameError> {
        // The longest key built from a name must fit a `RoutingKey` as well.
        let fits = RoutingKey::hello(name).is_some() && RoutingKey::bye(name).is_some() && RoutingKey::all(name).is_some();
        if is_valid_word(name) && name.len() <= MAX_WORD_LEN && fits {
            Ok(AgentName(name.to_owned()))
        } else {
            Err(NameError(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `tunbus.v1.all.<name>`: this agent's broadcasts and multicasts.
    pub fn flood_key(&self) -> RoutingKey {
        // invariant: `new` checked that the key can be built
        RoutingKey::all(&self.0).unwrap_or_else(|| unreachable!("checked name {:?}", self.0))
    }

    /// `tunbus.v1.ctl.hello.<name>`.
    pub fn hello_key(&self) -> RoutingKey {
        // invariant: `new` checked that the key can be built
        RoutingKey::hello(&self.0).unwrap_or_else(|| unreachable!("checked name {:?}", self.0))
    }

    /// `tunbus.v1.ctl.bye.<name>`.
    pub fn bye_key(&self) -> RoutingKey {
        // invariant: `new` checked that the key can be built
        RoutingKey::bye(&self.0).unwrap_or_else(|| unreachable!("checked name {:?}", self.0))
    }
}

impl TryFrom<String> for AgentName {
    type Error = NameError;
    fn try_from(s: String) -> Result<AgentName, NameError> {
        AgentName::new(&s)
    }
}

impl From<AgentName> for String {
    fn from(n: AgentName) -> String {
        n.0
    }
}

impl std::str::FromStr for AgentName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<AgentName, NameError> {
        AgentName::new(s)
    }
}

impl Deref for AgentName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for AgentName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for AgentName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for AgentName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_that_make_keys_and_names_that_do_not() {
        let n = AgentName::new("agent_1").expect("a word");
        assert_eq!(n.flood_key().as_str(), "tunbus.v1.all.agent_1");
        assert_eq!(n.hello_key().as_str(), "tunbus.v1.ctl.hello.agent_1");
        assert_eq!(n.bye_key().as_str(), "tunbus.v1.ctl.bye.agent_1");
        for bad in ["", "a.b", "a*", "a#", "with space", "é", &"x".repeat(65)] {
            assert!(AgentName::new(bad).is_err(), "{bad:?}");
        }
        assert!(AgentName::new(&"x".repeat(64)).is_ok());
        // Serde checks too: a hello naming an impossible agent does not parse.
        assert!(serde_json::from_str::<AgentName>("\"h.1\"").is_err());
        assert_eq!(serde_json::from_str::<AgentName>("\"h1\"").expect("valid"), "h1");
    }

    proptest! {
        /// Every name `new` accepts makes all three keys; every string it refuses is not a word.
        #[test]
        fn accepted_names_always_make_their_keys(s in "\\PC{0,80}") {
            match AgentName::new(&s) {
                Ok(n) => {
                    prop_assert!(RoutingKey::all(&n).is_some());
                    prop_assert!(RoutingKey::hello(&n).is_some());
                    prop_assert!(RoutingKey::bye(&n).is_some());
                }
                Err(_) => prop_assert!(!is_valid_word(&s) || RoutingKey::hello(&s).is_none() || RoutingKey::bye(&s).is_none()),
            }
        }
    }
}
