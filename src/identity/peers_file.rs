//! The peers file of strict mode: which broker user may use which addresses.
//!
//! ```text
//! # USER PREFIX[,PREFIX…]
//! lab.h1 198.18.0.1/32,fd00:7b::1/128
//! lab.h2 198.18.0.2/32, fd00:7b::2/128
//! ```
//!
//! One line per user (a user on several lines gets them all), `#` starts a comment, blank
//! lines are ignored. With end-to-end encryption (`--e2e`) a line also gives the user's
//! agent's public key: `lab.h1 198.18.0.1/32 key=<64 hex digits>` ([`keys`]). A prefix's host bits may be set (`198.18.0.1/24` allows the /24, as
//! an interface address would). Each user also gets its agent's deterministic link-local
//! address ([`super::link_local`] of the agent behind the user, [`super::agent_of_user`])
//! and, for L2 sessions, its agent's deterministic MAC ([`super::mac`]).
//!
//! L2 sessions: an entry may be a MAC (`02:aa:bb:cc:dd:ee`) or a MAC prefix
//! (`02:aa:bb:00:00:00/24`: every MAC whose first 24 bits are those, the hosts behind a
//! gateway's bridge), held as [`super::mac_prefix`].
//! Pure: parsing only; errors name the line.

use super::{agent_of_user, link_local, mac, mac_prefix, Table};
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
            if item.starts_with(KEY_ITEM) {
                continue; // the user's public key: `keys`
            }
            let p: Prefix = match parse_mac_item(item) {
                Some(Ok(p)) => p,
                Some(Err(e)) => return Err(fail(e)),
                None => item.parse().map_err(|e: String| fail(e))?,
            };
            prefixes.push(p);
        }
        if prefixes.is_empty() {
            return Err(fail(format!("user {user:?} has no prefixes")));
        }
        let ll = link_local(session, agent_of_user(session, user));
        prefixes.push(Prefix { addr: ll.into(), len: 128 });
        prefixes.push(mac_prefix(mac(session, agent_of_user(session, user)), 48));
        users.push((user.to_owned(), prefixes));
    }
    Ok(Table::new(users))
}

/// A MAC or MAC prefix entry (`02:aa:bb:cc:dd:ee[/BITS]`); `None` when the item is not
/// written as a MAC (six `:`-separated pairs of hex digits).
fn parse_mac_item(item: &str) -> Option<Result<Prefix, String>> {
    let (mac_text, bits) = match item.split_once('/') {
        Some((m, b)) => (m, Some(b)),
        None => (item, None),
    };
    if mac_text.len() != 17 || mac_text.contains("::") || mac_text.bytes().filter(|&b| b == b':').count() != 5 {
        return None;
    }
    let m: crate::packet::ethernet::Mac = match mac_text.parse() {
        Ok(m) => m,
        Err(e) => return Some(Err(e)),
    };
    let bits = match bits.map(str::parse::<u8>) {
        None => 48,
        Some(Ok(b)) if b <= 48 => b,
        Some(_) => return Some(Err(format!("{item:?}: a MAC prefix has 0 to 48 bits"))),
    };
    Some(Ok(mac_prefix(m, bits)))
}

/// How a line gives its user's public key.
pub const KEY_ITEM: &str = "key=";

/// The public keys of a peers file's users (`key=<64 hex digits>` items), in file order. A
/// user with two different keys is an error; users without one are absent.
pub fn keys(text: &str) -> Result<Vec<(String, [u8; 32])>, ParseError> {
    let mut out: Vec<(String, [u8; 32])> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let Some((user, rest)) = line.split_once(char::is_whitespace) else { continue };
        for item in rest.split(|c: char| c == ',' || c.is_whitespace()) {
            let Some(hex) = item.strip_prefix(KEY_ITEM) else { continue };
            let fail = |reason: String| ParseError { line: i + 1, reason };
            let key = crate::e2e::keys::parse_hex(hex).map_err(|e| fail(format!("user {user:?}: {e}")))?;
            match out.iter().find(|(u, _)| u == user) {
                Some((_, k)) if *k != key => return Err(fail(format!("user {user:?} has two different keys"))),
                Some(_) => {}
                None => out.push((user.to_owned(), key)),
            }
        }
    }
    Ok(out)
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
    fn macs_and_mac_prefixes_for_l2_sessions() {
        use crate::identity::{mac_address, Verdict};
        use crate::packet::ethernet::Mac;
        let t = parse("plant.gw 02:aa:bb:00:00:00/24, 198.18.0.9/32\nplant.h2 02:00:00:00:00:02\nplant.h3 fd00:12:2::3:4567/128\n", Some("plant")).unwrap();
        let behind = mac_address(Mac([2, 0xaa, 0xbb, 1, 2, 3]));
        assert_eq!(t.check(Some(b"plant.gw"), behind), Verdict::Allowed);
        assert_eq!(t.check(Some(b"plant.h2"), behind), Verdict::Spoofed);
        assert_eq!(t.check(Some(b"plant.h2"), mac_address(Mac([2, 0, 0, 0, 0, 2]))), Verdict::Allowed);
        // Each user's agent's own MAC comes with it.
        assert_eq!(t.check(Some(b"plant.h3"), mac_address(crate::identity::mac(Some("plant"), "h3"))), Verdict::Allowed);
        assert_eq!(t.check(Some(b"plant.h2"), mac_address(crate::identity::mac(Some("plant"), "h3"))), Verdict::Spoofed);
        assert!(parse("u 02:aa:bb:00:00:00/49\n", None).is_err());
        assert!(parse("u 02:aa:bb:00:00:zz\n", None).is_err());
    }

    #[test]
    fn keys_ride_on_the_lines_and_are_checked() {
        let k1 = "11".repeat(32);
        let k2 = "ab".repeat(32);
        let text = format!("lab.h1 198.18.0.1/32 key={k1}\nlab.h2 198.18.0.2/32,key={k2}  # h2\nlab.h3 198.18.0.3/32\nlab.h1 10.0.0.1/32 key={k1}\n");
        let t = parse(&text, Some("lab")).unwrap();
        assert_eq!(t.check(Some(b"lab.h2"), "198.18.0.2".parse().unwrap()), Verdict::Allowed, "a key item is no prefix");
        let keys = keys(&text).unwrap();
        assert_eq!(keys, vec![("lab.h1".to_owned(), [0x11; 32]), ("lab.h2".to_owned(), [0xab; 32])]);
        let two = format!("lab.h1 198.18.0.1/32 key={k1}\nlab.h1 198.18.0.1/32 key={k2}\n");
        assert!(super::keys(&two).unwrap_err().reason.contains("two different keys"));
        let bad = super::keys("lab.h1 198.18.0.1/32 key=abc\n").unwrap_err();
        assert_eq!(bad.line, 1);
        assert!(bad.reason.contains("64 hex digits"), "{bad}");
    }

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
        for (text, line, says) in [
            ("h1\n", 1, "no prefixes"),
            ("# c\nh1 198.18.0.1\n", 2, "prefix length"),
            ("h1 x/8\n", 1, "not an IP"),
            ("ok 1.2.3.4/32\nh2 ,\n", 2, "no prefixes"),
        ] {
            let e = parse(text, None).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn rendered_files_parse_back() {
        let entries = vec![
            ("s.a".to_owned(), vec!["198.18.0.1/24".parse().unwrap()]),
            ("s.b".to_owned(), vec!["fd00::2/64".parse().unwrap(), "198.18.0.2/24".parse().unwrap()]),
        ];
        let t = parse(&render(&entries), Some("s")).unwrap();
        assert_eq!(t.users().count(), 2);
        // Its two prefixes, its agent's link-local address and its agent's MAC.
        assert_eq!(t.prefixes(b"s.b").map(<[Prefix]>::len), Some(4));
    }
}
