//! The peers file of strict mode: which broker user may use which addresses.
//!
//! ```text
//! # USER PREFIX[,PREFIX…]
//! lab.h1 198.18.0.1/32,fd00:7b::1/128
//! lab.h2 198.18.0.2/32, fd00:7b::2/128
//! ```
//!
//! One line per user (a user on several lines gets them all), `#` starts a comment, blank
//! lines are ignored. A prefix's host bits may be set (`198.18.0.1/24` allows the /24, as
//! an interface address would). Each user also gets its agent's deterministic link-local
//! address ([`super::link_local`] of the agent behind the user, [`super::agent_of_user`]).
//! Pure: parsing only; errors name the line.

use super::{agent_of_user, link_local, Table};
use crate::route::Prefix;

/// A line that is not `USER PREFIX[,PREFIX…]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Parses a peers file of `session` into its table.
pub fn parse(text: &str, session: Option<&str>) -> Result<Table, ParseError> {
    let mut users = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fail = |reason: String| ParseError { line: i + 1, reason };
        let (user, rest) = line.split_once(char::is_whitespace).ok_or_else(|| fail(format!("{line:?} has a user but no prefixes (USER PREFIX[,PREFIX…])")))?;
        if user.len() > 255 {
            return Err(fail("the user name is longer than 255 bytes".into()));
        }
        let mut prefixes = Vec::new();
        for item in rest.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()) {
            let p: Prefix = item.parse().map_err(|e: String| fail(e))?;
            prefixes.push(p);
        }
        if prefixes.is_empty() {
            return Err(fail(format!("user {user:?} has no prefixes")));
        }
        let ll = link_local(session, agent_of_user(session, user));
        prefixes.push(Prefix { addr: ll.into(), len: 128 });
        users.push((user.to_owned(), prefixes));
    }
    Ok(Table::new(users))
}

/// The file for `entries` (user, prefixes), as `agent provision` and `agent lab` write it.
pub fn render(entries: &[(String, Vec<Prefix>)]) -> String {
    let mut out = String::from("# tunbus peers: USER PREFIX[,PREFIX…] (each user also gets its agent's link-local address)\n");
    for (user, prefixes) in entries {
        let list: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
        out.push_str(&format!("{user} {}\n", list.join(",")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Verdict;
    use std::net::IpAddr;

    #[test]
    fn files_parse_with_comments_and_merged_lines() {
        let t = parse("# peers\n\nlab.h1 198.18.0.1/32,fd00:7b::1/128  # h1\nlab.h2 198.18.0.2/24, fd00:7b::2/64\nlab.h1 10.0.0.1/32\n", Some("lab")).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(t.check(Some(b"lab.h1"), ip("198.18.0.1")), Verdict::Allowed);
        assert_eq!(t.check(Some(b"lab.h1"), ip("10.0.0.1")), Verdict::Allowed);
        assert_eq!(t.check(Some(b"lab.h2"), ip("198.18.0.77")), Verdict::Allowed, "a /24 allows its network");
        assert_eq!(t.check(Some(b"lab.h2"), ip("198.18.0.1")), Verdict::Allowed, "198.18.0.1 is in h2's /24 too");
        assert_eq!(t.check(Some(b"lab.h1"), ip("198.18.0.2")), Verdict::Spoofed);
        let ll_h1 = link_local(Some("lab"), "h1");
        assert_eq!(t.check(Some(b"lab.h1"), IpAddr::V6(ll_h1)), Verdict::Allowed, "the agent's link-local comes with the user");
        assert_eq!(t.check(Some(b"lab.h2"), IpAddr::V6(ll_h1)), Verdict::Spoofed);
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, line, says) in [("h1\n", 1, "no prefixes"), ("# c\nh1 198.18.0.1\n", 2, "prefix length"), ("h1 x/8\n", 1, "not an IP"), ("ok 1.2.3.4/32\nh2 ,\n", 2, "no prefixes")] {
            let e = parse(text, None).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn rendered_files_parse_back() {
        let entries = vec![("s.a".to_owned(), vec!["198.18.0.1/24".parse().unwrap()]), ("s.b".to_owned(), vec!["fd00::2/64".parse().unwrap(), "198.18.0.2/24".parse().unwrap()])];
        let t = parse(&render(&entries), Some("s")).unwrap();
        assert_eq!(t.users().count(), 2);
        assert_eq!(t.prefixes(b"s.b").map(<[Prefix]>::len), Some(3));
    }
}
