//! What a provisioned session is, computed without touching the broker: its vhost and
//! exchange, one user per agent with a password, and each user's permissions. Pure.
//!
//! RabbitMQ's permissions are regular expressions over resource names (configure, write,
//! read) and, on topic exchanges, over routing keys (topic write: the keys a user may
//! publish with; topic read: the keys it may bind with). For agent `h1` of session `S`:
//!
//! | permission | matches |
//! |---|---|
//! | configure | its own queues `tunbus.S.h1.*`, server-named `amq.gen-*` queues |
//! | write | the session exchange `tunbus.S`, its own queues (binding needs write on the queue), `amq.gen-*` |
//! | read | the session exchange (binding needs read on it), its own queues (consuming), `amq.gen-*` |
//! | topic write | unicast keys to any address, its own flood, hello and bye keys, the probe |
//! | topic read | the unicast keys of its own addresses, the shared flood and presence keys |
//!
//! So a provisioned agent cannot bind another agent's address keys or `tunbus.v1.#`,
//! cannot publish another agent's hello, and cannot touch another session's vhost.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::route;
use crate::route::Prefix;

/// One agent of a session: its name and interface prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSpec {
    pub name: String,
    pub prefixes: Vec<Prefix>,
}

impl std::str::FromStr for AgentSpec {
    type Err = String;
    /// `NAME=PREFIX[,PREFIX…]`, e.g. `h1=198.18.0.1/24,fd00:7b::1/64`.
    fn from_str(s: &str) -> Result<AgentSpec, String> {
        let (name, list) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=PREFIX[,PREFIX…]"))?;
        let name = name.trim();
        if !route::is_valid_word(name) {
            return Err(format!("agent name {name:?} must be one topic word (letters, digits, '-', '_')"));
        }
        let prefixes = list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::parse).collect::<Result<Vec<Prefix>, String>>()?;
        if prefixes.is_empty() {
            return Err(format!("agent {name:?} has no prefixes"));
        }
        Ok(AgentSpec { name: name.to_owned(), prefixes })
    }
}

/// Parses an agents file: one `NAME=PREFIX[,PREFIX…]` (or `NAME PREFIX,…`) per line, `#`
/// comments.
pub fn parse_agents_file(text: &str) -> Result<Vec<AgentSpec>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let spec = if line.contains('=') { line.to_owned() } else { line.replacen(char::is_whitespace, "=", 1) };
        out.push(spec.parse::<AgentSpec>().map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(out)
}

/// The permissions of one user in the session's vhost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
    pub topic_write: String,
    pub topic_read: String,
}

/// One user of the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPlan {
    pub agent: String,
    pub user: String,
    pub password: String,
    pub permissions: Permissions,
    /// The addresses the user may send from (host prefixes), for the peers file.
    pub addresses: Vec<Prefix>,
    /// A capture user (`--observer`): reads the whole session, sends nothing, no agent.
    pub observer: bool,
}

/// Everything a session is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionPlan {
    pub session: String,
    pub vhost: String,
    pub exchange: String,
    /// The tag every user of the session carries, so that `--revoke` finds them.
    pub tag: String,
    pub users: Vec<UserPlan>,
}

/// The broker user of agent `agent` in `session`.
pub fn user_name(session: &str, agent: &str) -> String {
    format!("{session}.{agent}")
}

/// The tag of a session's users.
pub fn session_tag(session: &str) -> String {
    format!("tunbus-{session}")
}

/// `s` with every regular-expression metacharacter escaped.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The permissions of agent `agent` of `session` owning `addresses`.
pub fn permissions(session: &str, agent: &str, addresses: &[IpAddr]) -> Permissions {
    let exchange = regex_escape(&route::session_exchange(session));
    let own_queues = format!("{}\\.{}\\.[^.]+", regex_escape(&format!("tunbus.{session}")), regex_escape(agent));
    let gen = "amq\\.gen-.*";
    let a = regex_escape(agent);
    let words: Vec<String> = addresses.iter().map(|ip| regex_escape(route::address_word(*ip).as_str())).collect();
    let mut topic_read = String::from("^tunbus\\.v1\\.(");
    let _ = write!(topic_read, "({})\\.([0-9]+|\\*)", words.join("|"));
    let _ = write!(
        topic_read,
        "|all\\.\\*|ctl\\.probe|ctl\\.hello\\.[^.]+|ctl\\.bye\\.[^.]+|ctl\\.hello\\.\\*|ctl\\.bye\\.\\*|ctl\\.route\\.\\*|ctl\\.route\\.[^.]+|ctl\\.ping\\.{a}|ctl\\.e2e\\.{a}|ctl\\.pong\\.[A-Za-z0-9_-]+)$"
    );
    Permissions {
        configure: format!("^({own_queues}|{gen})$"),
        write: format!("^({exchange}|{own_queues}|{gen})$"),
        read: format!("^({exchange}|{own_queues}|{gen})$"),
        topic_write: format!(
            "^tunbus\\.v1\\.([0-9a-f-]+\\.[0-9]{{1,2}}|all\\.{a}|ctl\\.hello\\.{a}|ctl\\.bye\\.{a}|ctl\\.route\\.{a}|ctl\\.probe|ctl\\.ping\\.[^.]+|ctl\\.e2e\\.[^.]+|ctl\\.pong\\.[^.]+)$"
        ),
        topic_read,
    }
}

/// The permissions of a capture user (`agent capture`, `agent sniffer`) of `session`: a
/// server-named queue of its own, bound to every key of the session's exchange; it may
/// publish the presence probe and nothing else.
pub fn observer_permissions(session: &str) -> Permissions {
    let exchange = regex_escape(&route::session_exchange(session));
    let gen = "amq\\.gen-.*";
    Permissions {
        configure: format!("^{gen}$"),
        write: format!("^({exchange}|{gen})$"),
        read: format!("^({exchange}|{gen})$"),
        topic_write: "^tunbus\\.v1\\.ctl\\.probe$".to_owned(),
        topic_read: "^(tunbus\\.v1\\..*|fromAgent\\..*)$".to_owned(),
    }
}

/// Adds a capture user named `name` to `plan`.
pub fn add_observer(plan: &mut SessionPlan, name: &str, password: String) -> Result<(), String> {
    if !route::is_valid_word(name) {
        return Err(format!("observer {name:?} must be one topic word"));
    }
    if plan.users.iter().any(|u| u.agent == name) {
        return Err(format!("{name:?} is given twice"));
    }
    let permissions = observer_permissions(&plan.session);
    plan.users.push(UserPlan { agent: name.to_owned(), user: user_name(&plan.session, name), password, permissions, addresses: Vec::new(), observer: true });
    Ok(())
}

/// The plan for `agents` in `session`; `password` makes each user's password (a random
/// generator in the command, a fixed one in tests).
pub fn plan(session: &str, agents: &[AgentSpec], mut password: impl FnMut() -> String) -> Result<SessionPlan, String> {
    if !route::is_valid_word(session) {
        return Err(format!("session {session:?} must be one topic word (letters, digits, '-', '_')"));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut users = Vec::new();
    for a in agents {
        if !seen.insert(a.name.clone()) {
            return Err(format!("agent {:?} is given twice", a.name));
        }
        let ll = crate::identity::link_local(Some(session), &a.name);
        let mut addrs: Vec<IpAddr> = a.prefixes.iter().map(|p| p.addr).collect();
        addrs.push(IpAddr::V6(ll));
        let addresses = a.prefixes.iter().map(|p| Prefix { addr: p.addr, len: if p.addr.is_ipv4() { 32 } else { 128 } }).collect();
        users.push(UserPlan {
            agent: a.name.clone(),
            user: user_name(session, &a.name),
            password: password(),
            permissions: permissions(session, &a.name, &addrs),
            addresses,
            observer: false,
        });
    }
    Ok(SessionPlan { session: session.to_owned(), vhost: session.to_owned(), exchange: route::session_exchange(session), tag: session_tag(session), users })
}

impl SessionPlan {
    /// The peers file of the session (strict mode for every agent).
    pub fn peers_file(&self) -> String {
        let entries: Vec<(String, Vec<Prefix>)> = self.users.iter().filter(|u| !u.observer).map(|u| (u.user.clone(), u.addresses.clone())).collect();
        crate::identity::peers_file::render(&entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ matches permissions with Erlang's `re` (PCRE): anchored, full match. A
    /// small backtracking matcher for the subset these patterns use is enough to check
    /// them here: literals, escapes, `.`, `[...]`, `[^...]`, `*`, `+`, `{m,n}`, groups
    /// with `|`, `^` and `$`.
    mod re {
        #[derive(Debug, Clone)]
        enum Node {
            Char(char),
            Any,
            Class(Vec<(char, char)>, bool),
            Group(Vec<Vec<Node>>),
            Repeat(Box<Node>, usize, usize),
        }

        fn parse_seq(p: &[char], i: &mut usize) -> Vec<Vec<Node>> {
            let mut alts = vec![Vec::new()];
            while *i < p.len() {
                let c = p[*i];
                *i += 1;
                let node = match c {
                    '(' => Node::Group(parse_seq(p, i)),
                    ')' => break,
                    '|' => {
                        alts.push(Vec::new());
                        continue;
                    }
                    '^' | '$' => continue,
                    '.' => Node::Any,
                    '\\' => {
                        *i += 1;
                        Node::Char(p[*i - 1])
                    }
                    '[' => {
                        let neg = p[*i] == '^';
                        if neg {
                            *i += 1;
                        }
                        let mut ranges = Vec::new();
                        while p[*i] != ']' {
                            let a = p[*i];
                            if p[*i + 1] == '-' && p[*i + 2] != ']' {
                                ranges.push((a, p[*i + 2]));
                                *i += 3;
                            } else {
                                ranges.push((a, a));
                                *i += 1;
                            }
                        }
                        *i += 1;
                        Node::Class(ranges, neg)
                    }
                    other => Node::Char(other),
                };
                let node = match p.get(*i) {
                    Some('*') => {
                        *i += 1;
                        Node::Repeat(Box::new(node), 0, usize::MAX)
                    }
                    Some('+') => {
                        *i += 1;
                        Node::Repeat(Box::new(node), 1, usize::MAX)
                    }
                    Some('{') => {
                        let end = p[*i..].iter().position(|&c| c == '}').unwrap() + *i;
                        let spec: String = p[*i + 1..end].iter().collect();
                        let (m, n) = spec.split_once(',').unwrap();
                        *i = end + 1;
                        Node::Repeat(Box::new(node), m.parse().unwrap(), n.parse().unwrap())
                    }
                    _ => node,
                };
                alts.last_mut().unwrap().push(node);
            }
            alts
        }

        fn m(nodes: &[Node], s: &[char], k: &mut dyn FnMut(&[char]) -> bool) -> bool {
            let Some((first, rest)) = nodes.split_first() else { return k(s) };
            match first {
                Node::Char(c) => s.first() == Some(c) && m(rest, &s[1..], k),
                Node::Any => !s.is_empty() && m(rest, &s[1..], k),
                Node::Class(r, neg) => s.first().is_some_and(|c| r.iter().any(|(a, b)| a <= c && c <= b) != *neg) && m(rest, &s[1..], k),
                Node::Group(alts) => alts.iter().any(|alt| m(alt, s, &mut |t: &[char]| m(rest, t, k))),
                Node::Repeat(n, min, max) => rep(n, *min, *max, 0, rest, s, k),
            }
        }

        fn rep(n: &Node, min: usize, max: usize, done: usize, rest: &[Node], s: &[char], k: &mut dyn FnMut(&[char]) -> bool) -> bool {
            if done < max && m(std::slice::from_ref(n), s, &mut |t: &[char]| t.len() < s.len() && rep(n, min, max, done + 1, rest, t, k)) {
                return true;
            }
            done >= min && m(rest, s, k)
        }

        pub fn full_match(pattern: &str, s: &str) -> bool {
            let p: Vec<char> = pattern.chars().collect();
            let nodes = parse_seq(&p, &mut 0);
            let s: Vec<char> = s.chars().collect();
            nodes.iter().any(|alt| m(alt, &s, &mut |t: &[char]| t.is_empty()))
        }
    }

    fn plan_h1() -> SessionPlan {
        let agents = vec!["h1=198.18.0.1/24,fd00:7b::1/64".parse().unwrap(), "h2=198.18.0.2/24".parse().unwrap()];
        plan("lab", &agents, || "pw".into()).unwrap()
    }

    #[test]
    fn specs_and_files_parse() {
        let a: AgentSpec = "h1=198.18.0.1/24, fd00:7b::1/64".parse().unwrap();
        assert_eq!(a.prefixes.len(), 2);
        assert!("h1".parse::<AgentSpec>().is_err());
        assert!("a.b=198.18.0.1/24".parse::<AgentSpec>().is_err());
        assert!("h1=".parse::<AgentSpec>().is_err());
        let f = parse_agents_file("# agents\nh1=198.18.0.1/24\nh2 198.18.0.2/24,fd00::2/64\n").unwrap();
        assert_eq!(f.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["h1", "h2"]);
        assert!(parse_agents_file("h1=nonsense\n").unwrap_err().contains("line 1"));
        assert!(plan("lab", &[a.clone(), a], || "pw".into()).is_err(), "twice");
    }

    #[test]
    fn resource_permissions_cover_own_queues_only() {
        let p = &plan_h1().users[0].permissions;
        let ok = |re: &str, s: &str| re::full_match(re, s);
        for q in ["tunbus.lab.h1.0", "tunbus.lab.h1.ctl", "amq.gen-Xyz"] {
            assert!(ok(&p.configure, q), "configure {q}");
        }
        for q in ["tunbus.lab.h2.0", "tunbus.lab.h1", "tunbus.lab", "tunbus.other.h1.0", "tunbus.lab.h1.0.x"] {
            assert!(!ok(&p.configure, q), "configure must refuse {q}");
        }
        assert!(ok(&p.write, "tunbus.lab") && ok(&p.read, "tunbus.lab"));
        assert!(!ok(&p.write, "tunbus.other") && !ok(&p.write, "amq.topic") && !ok(&p.read, "tunbus.lab.h2.0"));
    }

    #[test]
    fn topic_permissions_allow_what_an_agent_does_and_nothing_more() {
        let plan = plan_h1();
        let p = &plan.users[0].permissions;
        let ok = |re: &str, s: &str| re::full_match(re, s);
        let ll = route::address_word(IpAddr::V6(crate::identity::link_local(Some("lab"), "h1")));
        // Publishing: unicast to anyone, own flood and presence, probes.
        for k in [
            "tunbus.v1.198-18-0-2.7",
            "tunbus.v1.fd00-7b--2.15",
            "tunbus.v1.all.h1",
            "tunbus.v1.ctl.hello.h1",
            "tunbus.v1.ctl.bye.h1",
            "tunbus.v1.ctl.route.h1",
            "tunbus.v1.ctl.probe",
            "tunbus.v1.ctl.ping.h2",
            "tunbus.v1.ctl.pong.p1a2b",
            "tunbus.v1.ctl.e2e.h2",
        ] {
            assert!(ok(&p.topic_write, k), "publish {k}");
        }
        for k in ["tunbus.v1.ctl.hello.h2", "tunbus.v1.all.h2", "tunbus.v1.ctl.bye.h2", "tunbus.v1.ctl.route.h2", "tunbus.v1.all.h1x", "other.key"] {
            assert!(!ok(&p.topic_write, k), "publish must refuse {k}");
        }
        // Binding: own addresses, every shard or one; shared keys.
        for k in [
            "tunbus.v1.198-18-0-1.*",
            "tunbus.v1.198-18-0-1.3",
            "tunbus.v1.fd00-7b--1.*",
            &format!("tunbus.v1.{ll}.*"),
            "tunbus.v1.all.*",
            "tunbus.v1.ctl.probe",
            "tunbus.v1.ctl.hello.*",
            "tunbus.v1.ctl.route.*",
            "tunbus.v1.ctl.hello.h2",
            "tunbus.v1.ctl.ping.h1",
            "tunbus.v1.ctl.pong.p1a2b",
            "tunbus.v1.ctl.e2e.h1",
        ] {
            assert!(ok(&p.topic_read, k), "bind {k}");
        }
        // Nobody else's pings (it could answer them as h2), nor every pinger's answers.
        for k in [
            "tunbus.v1.#",
            "tunbus.v1.198-18-0-2.*",
            "tunbus.v1.198-18-0-2.3",
            "tunbus.v1.*.*",
            "#",
            "tunbus.v1.198-18-0-1.#",
            "tunbus.v1.all.h2",
            "tunbus.v1.ctl.ping.h2",
            "tunbus.v1.ctl.ping.*",
            "tunbus.v1.ctl.pong.*",
            "tunbus.v1.ctl.pong.#",
            "tunbus.v1.ctl.e2e.h2",
            "tunbus.v1.ctl.e2e.*",
        ] {
            assert!(!ok(&p.topic_read, k), "bind must refuse {k}");
        }
    }

    #[test]
    fn the_peers_file_lists_host_addresses() {
        let plan = plan_h1();
        let text = plan.peers_file();
        assert!(text.contains("lab.h1 198.18.0.1/32,fd00:7b::1/128"), "{text}");
        let t = crate::identity::peers_file::parse(&text, Some("lab")).unwrap();
        use crate::identity::Verdict;
        assert_eq!(t.check(Some(b"lab.h1"), "198.18.0.1".parse().unwrap()), Verdict::Allowed);
        assert_eq!(t.check(Some(b"lab.h1"), "198.18.0.2".parse().unwrap()), Verdict::Spoofed, "host addresses, not the /24");
    }

    #[test]
    fn an_observer_binds_everything_and_publishes_only_the_probe() {
        let mut plan = plan_h1();
        add_observer(&mut plan, "cap", "pw".into()).unwrap();
        assert!(add_observer(&mut plan, "h1", "pw".into()).unwrap_err().contains("twice"));
        assert!(add_observer(&mut plan, "a.b", "pw".into()).is_err());
        let o = plan.users.last().unwrap();
        assert_eq!((o.user.as_str(), o.observer), ("lab.cap", true));
        let (p, ok) = (&o.permissions, |re: &str, s: &str| re::full_match(re, s));
        assert!(ok(&p.configure, "amq.gen-Xyz") && !ok(&p.configure, "tunbus.lab.h1.0"));
        assert!(ok(&p.read, "tunbus.lab") && ok(&p.write, "amq.gen-Xyz") && !ok(&p.read, "tunbus.lab.h1.0"));
        assert!(ok(&p.topic_read, "tunbus.v1.#") && ok(&p.topic_read, "fromAgent.#") && !ok(&p.topic_read, "#"));
        assert!(ok(&p.topic_write, "tunbus.v1.ctl.probe"));
        for k in ["tunbus.v1.198-18-0-2.7", "tunbus.v1.all.cap", "tunbus.v1.ctl.hello.cap", "tunbus.v1.ctl.hello.h1"] {
            assert!(!ok(&p.topic_write, k), "an observer must not publish {k}");
        }
        assert!(!plan.peers_file().contains("lab.cap"), "an observer sends nothing: not a peer");
    }

    #[test]
    fn escaping_keeps_metacharacters_literal() {
        assert_eq!(regex_escape("a.b+c"), "a\\.b\\+c");
        assert!(re::full_match(&format!("^{}$", regex_escape("x(1)")), "x(1)"));
        assert!(!re::full_match(&format!("^{}$", regex_escape("a.b")), "axb"));
    }
}
