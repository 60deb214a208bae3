//! Broker URLs, as RabbitMQ's URI specification writes them: `amqp[s]://[USER[:PASS]@]HOST
//! [:PORT][/VHOST][?KEY=VALUE&…]`, user, password and vhost percent-encoded.
//!
//! Pure: parsing and printing only, no I/O. The password never leaves this module in
//! clear text except through [`BrokerUrl::password`] (for the login itself): `Display` and
//! every error show `***` in its place, so a URL can go into any log line, report or error.
//!
//! Query parameters honoured (RabbitMQ's URI query parameters): `heartbeat` (seconds, 0
//! turns heartbeats off), `connection_timeout` (milliseconds), `channel_max`, `frame_max`,
//! `auth_mechanism` (`plain`, `external`), and for `amqps://` `cacertfile`, `certfile`,
//! `keyfile`, `verify` (`verify_peer`, `verify_none`), `server_name_indication` (a host
//! name, or `disable`). Anything else is an error that names the parameter: a mistyped key
//! silently ignored is how a TLS setting goes missing. An absent or empty vhost is `/`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The broker URL when none is given: RabbitMQ's default user on this machine (RabbitMQ
/// lets `guest` log in from localhost only).
pub const DEFAULT_URL: &str = "amqp://guest:guest@localhost:5672/%2f";

/// How the client proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// User name and password.
    Plain,
    /// The TLS client certificate (RabbitMQ's `rabbitmq_auth_mechanism_ssl`).
    External,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::External => "EXTERNAL",
        }
    }
}

/// Whether the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    Peer,
    None,
}

/// What the TLS handshake names the server as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerNameIndication {
    Name(String),
    Disable,
}

/// The query part of a broker URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub heartbeat: Option<Duration>,
    pub connection_timeout: Option<Duration>,
    pub channel_max: Option<u16>,
    pub frame_max: Option<u32>,
    pub auth_mechanism: Option<Mechanism>,
    pub cacertfile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub verify: Option<Verify>,
    pub server_name_indication: Option<ServerNameIndication>,
}

/// One parsed broker URL.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    password: Option<String>,
    pub vhost: String,
    pub query: Query,
    /// The query as given (printed back in `Display`).
    query_text: String,
}

/// Why a URL is not usable. Carries the URL with its password masked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("broker URL {url} {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

impl BrokerUrl {
    /// The login password, if the URL has one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// `host:port` (IPv6 in brackets), for connecting and for messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// This URL with another user and password (provisioning writes agents' URLs so).
    pub fn with_credentials(&self, username: &str, password: &str) -> BrokerUrl {
        BrokerUrl { username: Some(username.to_owned()), password: Some(password.to_owned()), ..self.clone() }
    }

    /// This URL with another vhost.
    pub fn with_vhost(&self, vhost: &str) -> BrokerUrl {
        BrokerUrl { vhost: vhost.to_owned(), ..self.clone() }
    }

    /// The URL in full, password included: only for writing URL files an operator asked for.
    pub fn to_secret_string(&self) -> String {
        self.render(true)
    }

    fn render(&self, with_password: bool) -> String {
        let mut s = String::from(if self.tls { "amqps://" } else { "amqp://" });
        if let Some(u) = &self.username {
            s.push_str(&percent_encode(u));
            if let Some(p) = &self.password {
                s.push(':');
                s.push_str(&if with_password { percent_encode(p) } else { "***".to_owned() });
            }
            s.push('@');
        }
        s.push_str(&self.authority());
        s.push('/');
        s.push_str(&percent_encode(&self.vhost));
        if !self.query_text.is_empty() {
            s.push('?');
            s.push_str(&self.query_text);
        }
        s
    }
}

impl fmt::Display for BrokerUrl {
    /// The URL with its password masked: `amqps://h1:***@broker:5671/lab`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<BrokerUrl, UrlError> {
        parse(s)
    }
}

/// Masks what may be a password in `text`, for messages about input that did not parse:
/// in each URL of `text` (from its `amqp://` or `amqps://` to the next one, or the whole of
/// `text` when it has none; another `scheme://`, as a raw password may hold, starts no URL),
/// everything from the first `:` after the scheme to the **last** `@`. So a
/// password is masked whatever it holds unencoded (`/ ? # @ : [ ] % ,` and spaces included);
/// a host and port followed by a stray `@` are masked too, which errs on the safe side.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let starts = url_starts(text);
    if starts.is_empty() {
        return mask_one(text, 0);
    }
    out.push_str(&text[..starts[0]]);
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        let one = &text[start..end];
        out.push_str(&mask_one(one, one.find("://").map_or(0, |s| s + 3)));
    }
    out
}

/// Where each `amqp://` or `amqps://` of `text` begins (the scheme's first letter). No other
/// `scheme://` starts a URL: in a text that is not one (`user:pass@host`) it may be part of a
/// password written raw (`u://secret@h` is user `u`, password `//secret`).
fn url_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("://") {
        let sep = from + i;
        // The scheme starts after the last character that cannot be in one (which may take
        // several bytes: step over all of them).
        let scheme =
            text[..sep].char_indices().rev().find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))).map_or(0, |(j, c)| j + c.len_utf8());
        let amqp = matches!(text[scheme..sep].to_ascii_lowercase().as_str(), "amqp" | "amqps");
        if amqp && starts.last().is_none_or(|&last| scheme > last) {
            starts.push(scheme);
        }
        from = sep + 3;
    }
    starts
}

/// The bytes of one URL (`authority` starts after its `scheme://`) that may hold a password.
fn secret_span(one: &str, authority: usize) -> Option<std::ops::Range<usize>> {
    let at = one.rfind('@').filter(|&a| a >= authority)?;
    let colon = one[authority..at].find(':')? + authority;
    Some(colon + 1..at)
}

fn mask_one(one: &str, authority: usize) -> String {
    match secret_span(one, authority) {
        Some(span) => format!("{}***{}", &one[..span.start], &one[span.end..]),
        None => one.to_owned(),
    }
}

/// Parses a comma-separated list of URLs (`AMQP_URL`, URL files): the nodes of one cluster.
/// A comma splits the list only where a new `amqp://` or `amqps://` follows it, so a comma in
/// a password stays in the password.
pub fn parse_list(text: &str) -> Result<Vec<BrokerUrl>, UrlError> {
    let urls: Vec<BrokerUrl> = split_list(text).into_iter().map(str::trim).filter(|s| !s.is_empty()).map(parse).collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err(UrlError { url: format!("{:?}", redact(text)), reason: "is empty".into() });
    }
    Ok(urls)
}

/// The items of a comma-separated list of URLs: split at the commas that a scheme follows
/// (past spaces and further commas: empty items are left out later), or the end.
fn split_list(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut start = 0;
    for (i, _) in text.match_indices(',') {
        let next = text[i + 1..].trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if next.is_empty() || next.starts_with("amqp://") || next.starts_with("amqps://") {
            items.push(&text[start..i]);
            start = i + 1;
        }
    }
    items.push(&text[start..]);
    items
}

/// Parses one URL.
pub fn parse(text: &str) -> Result<BrokerUrl, UrlError> {
    let fail = |reason: String| UrlError { url: redact(text), reason };
    let (tls, rest) = if let Some(r) = text.strip_prefix("amqps://") {
        (true, r)
    } else if let Some(r) = text.strip_prefix("amqp://") {
        (false, r)
    } else {
        return Err(fail("does not start with amqp:// or amqps://".into()));
    };
    // The userinfo ends at the last '@'. A '/' or '?' before it means a reserved character
    // written raw in the user name or password (or a raw '@' in the vhost or query): the
    // URL would split in the wrong place, and part of the password would show as a host,
    // port or vhost. Refused, with the fix.
    if let Some(at) = rest.rfind('@') {
        if rest[..at].contains(['/', '?']) {
            return Err(fail(
                "has a '/' or '?' before its last '@': percent-encode them in the user name and password (/ is %2F, ? is %3F, # is %23, @ is %40, % is %25), and '@' in the vhost or query as %40".into(),
            ));
        }
    }
    let (before_query, query_text) = match rest.split_once('?') {
        Some((a, q)) => (a, q),
        None => (rest, ""),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (before_query, None),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            let user = decode(user).ok_or_else(|| fail("has a bad %-escape in the user name".into()))?;
            let pass = match pass {
                Some(p) => Some(decode(p).ok_or_else(|| fail("has a bad %-escape in the password".into()))?),
                None => None,
            };
            (Some(user), pass)
        }
    };
    let (host, port_text) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(|| fail("has an IPv6 address without its closing ']'".into()))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| fail("has text after the IPv6 address".into()))?),
        };
        (h.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (hostport.to_owned(), None),
        }
    };
    let host = decode(&host).ok_or_else(|| fail("has a bad %-escape in the host".into()))?;
    if host.is_empty() {
        return Err(fail("has no host".into()));
    }
    let port = match port_text {
        None | Some("") => {
            if tls {
                5671
            } else {
                5672
            }
        }
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| fail(format!("has port {p:?}, not a number from 1 to 65535")))?,
    };
    let vhost = match path {
        None | Some("") => "/".to_owned(),
        Some(p) => decode(p).ok_or_else(|| fail("has a bad %-escape in the vhost".into()))?,
    };
    let query = parse_query(query_text, tls).map_err(fail)?;
    Ok(BrokerUrl { tls, host, port, username, password, vhost, query, query_text: query_text.to_owned() })
}

fn parse_query(text: &str, tls: bool) -> Result<Query, String> {
    let mut q = Query::default();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(raw).ok_or_else(|| format!("has a bad %-escape in query parameter {key}"))?;
        let number = |max: u64| -> Result<u64, String> {
            value.parse::<u64>().ok().filter(|&n| n <= max).ok_or_else(|| format!("has {key}={value:?}, not a number from 0 to {max}"))
        };
        let tls_only = || if tls { Ok(()) } else { Err(format!("has {key}, which only an amqps:// URL can use")) };
        match key {
            "heartbeat" => q.heartbeat = Some(Duration::from_secs(number(u64::from(u16::MAX))?)),
            "connection_timeout" => q.connection_timeout = Some(Duration::from_millis(number(3_600_000)?.max(1))),
            "channel_max" => q.channel_max = Some(number(u64::from(u16::MAX))? as u16),
            "frame_max" => q.frame_max = Some(number(u64::from(u32::MAX))? as u32),
            "auth_mechanism" => {
                q.auth_mechanism = Some(match value.to_ascii_lowercase().as_str() {
                    "plain" => Mechanism::Plain,
                    "external" => Mechanism::External,
                    _ => return Err(format!("has auth_mechanism={value:?}; tunbus knows plain and external")),
                })
            }
            "cacertfile" => {
                tls_only()?;
                q.cacertfile = Some(PathBuf::from(value));
            }
            "certfile" => {
                tls_only()?;
                q.certfile = Some(PathBuf::from(value));
            }
            "keyfile" => {
                tls_only()?;
                q.keyfile = Some(PathBuf::from(value));
            }
            "verify" => {
                tls_only()?;
                q.verify = Some(match value.as_str() {
                    "verify_peer" => Verify::Peer,
                    "verify_none" => Verify::None,
                    _ => return Err(format!("has verify={value:?}; use verify_peer or verify_none")),
                })
            }
            "server_name_indication" => {
                tls_only()?;
                q.server_name_indication = Some(match value.as_str() {
                    "disable" => ServerNameIndication::Disable,
                    "" => return Err("has an empty server_name_indication".into()),
                    name => ServerNameIndication::Name(name.to_owned()),
                })
            }
            "fail_if_no_peer_cert" | "password" => {} // server-side option / never in a query: ignored as RabbitMQ's clients do
            other => {
                return Err(format!(
                    "has unknown query parameter {other:?} (known: heartbeat, connection_timeout, channel_max, frame_max, auth_mechanism, cacertfile, certfile, keyfile, verify, server_name_indication)"
                ))
            }
        }
    }
    Ok(q)
}

/// Percent-decoding; `None` on a bad escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encoding of everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_url_parses_and_prints_without_its_password() {
        let u = parse("amqps://h1:s%40cret@broker.example:5671/lab?heartbeat=10&connection_timeout=2500").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port, u.vhost.as_str()), ("broker.example", 5671, "lab"));
        assert_eq!(u.username.as_deref(), Some("h1"));
        assert_eq!(u.password(), Some("s@cret"));
        assert_eq!(u.query.heartbeat, Some(Duration::from_secs(10)));
        assert_eq!(u.query.connection_timeout, Some(Duration::from_millis(2500)));
        let shown = u.to_string();
        assert_eq!(shown, "amqps://h1:***@broker.example:5671/lab?heartbeat=10&connection_timeout=2500");
        assert!(!format!("{u:?}").contains("cret"));
        assert_eq!(parse(&u.to_secret_string()).unwrap(), u);
    }

    #[test]
    fn defaults_follow_the_spec() {
        let u = parse("amqp://localhost").unwrap();
        assert_eq!((u.port, u.vhost.as_str(), u.username.as_deref()), (5672, "/", None));
        assert_eq!(parse("amqps://h/").unwrap().port, 5671);
        assert_eq!(parse("amqp://guest:guest@localhost:5672/%2f").unwrap().vhost, "/");
        assert_eq!(parse("amqp://u@h/a%2Fb").unwrap().vhost, "a/b");
        let v6 = parse("amqp://[fd00::1]:5673/x").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("fd00::1", 5673));
        assert_eq!(v6.authority(), "[fd00::1]:5673");
        assert_eq!(parse("amqp://[::1]/").unwrap().port, 5672);
    }

    #[test]
    fn tls_query_parameters() {
        let u = parse("amqps://b/?cacertfile=/etc/ca.pem&certfile=c.pem&keyfile=k.pem&verify=verify_none&server_name_indication=node1&auth_mechanism=EXTERNAL")
            .unwrap();
        assert_eq!(u.query.cacertfile, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(u.query.verify, Some(Verify::None));
        assert_eq!(u.query.server_name_indication, Some(ServerNameIndication::Name("node1".into())));
        assert_eq!(u.query.auth_mechanism, Some(Mechanism::External));
        assert_eq!(parse("amqps://b/?server_name_indication=disable").unwrap().query.server_name_indication, Some(ServerNameIndication::Disable));
    }

    #[test]
    fn bad_urls_say_why_and_never_show_the_password() {
        for (url, why) in [
            ("http://u:topsecret@h/", "amqp://"),
            ("amqp://u:topsecret@h:0/", "port"),
            ("amqp://u:topsecret@h:99999/", "port"),
            ("amqp://u:topsecret@/", "no host"),
            ("amqp://u:topsecret@h/?hearbeat=1", "unknown query parameter \"hearbeat\""),
            ("amqp://u:topsecret@h/?heartbeat=x", "heartbeat"),
            ("amqp://u:topsecret@h/?cacertfile=a", "amqps://"),
            ("amqps://u:topsecret@h/?verify=maybe", "verify_peer"),
            ("amqp://u:topsecret@h/%zz", "vhost"),
            ("amqp://u:topsecret@[fd00::1/", "']'"),
        ] {
            let e = parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("topsecret"), "{url}: {e}");
        }
    }

    #[test]
    fn reserved_characters_in_passwords_are_refused_with_the_fix_and_never_shown() {
        for url in ["amqp://user:QZX/JQZ@127.0.0.1:1/", "amqp://user:QZX?JQZ@127.0.0.1/", "amqps://u:QZX/J?JQZ@h:5671/lab?heartbeat=5"] {
            let e = parse(url).unwrap_err().to_string();
            assert!(e.contains("%2F") && !e.contains("QZX") && !e.contains("JQZ"), "{url}: {e}");
        }
        // Raw '#', '@', ':', '[', ']' and ',' need no encoding: the userinfo ends at the last '@'.
        let u = parse("amqp://u:p#@:[],x@h/lab").unwrap();
        assert_eq!((u.password(), u.host.as_str(), u.vhost.as_str()), (Some("p#@:[],x"), "h", "lab"));
        let l = parse_list("amqp://u:pa,ss@h1/lab,amqp://v:w@h2/lab").unwrap();
        assert_eq!(l.iter().map(|u| u.password().unwrap_or_default()).collect::<Vec<_>>(), ["pa,ss", "w"]);
        assert_eq!(redact("u:p/w@h"), "u:***@h");
        assert_eq!(redact("amqp://u:p w/x?y@h/v"), "amqp://u:***@h/v");
    }

    #[test]
    fn lists_and_redaction() {
        let l = parse_list("amqp://a:p@n1/lab, amqp://a:p@n2/lab,").unwrap();
        assert_eq!(l.iter().map(|u| u.host.as_str()).collect::<Vec<_>>(), ["n1", "n2"]);
        assert!(parse_list(" , ").is_err());
        assert_eq!(redact("x amqp://u:pw@h:1/v y amqps://h/ z"), "x amqp://u:***@h:1/v y amqps://h/ z");
        assert_eq!(redact("amqp://u:pw@h,amqp://v:pw2@h2"), "amqp://u:***@h,amqp://v:***@h2");
        assert_eq!(redact("no url"), "no url");
    }

    proptest! {
        #[test]
        fn never_panics_and_round_trips(user in "[a-z%:@/ ]{0,8}", pass in "[ -~]{0,12}", host in "[a-z0-9.-]{1,12}", port in 1u16.., vhost in "[ -~]{0,8}") {
            let u = BrokerUrl {
                tls: false,
                host,
                port,
                username: Some(user),
                password: Some(format!("\u{1F511}{pass}")),
                vhost: if vhost.is_empty() { "/".into() } else { vhost },
                query: Query::default(),
                query_text: String::new(),
            };
            let back = parse(&u.to_secret_string()).unwrap();
            prop_assert_eq!(&back, &u);
            let key_emoji = percent_encode("\u{1F511}");
            prop_assert!(!u.to_string().contains(&key_emoji), "the password shows in {}", u);
        }

        /// Passwords as generators make them, with every reserved character, written raw
        /// or percent-encoded, alone or in a list: whether the parser takes the URL or not,
        /// no piece of the password shows in what it prints (`Display`, errors, `redact`).
        #[test]
        fn no_password_is_ever_printed(
            secret in proptest::collection::vec("[QXZJ]{3}", 1..4),
            glue in proptest::collection::vec("[/?#@:\\[\\]%, !$&'()*+;=~.-]{0,3}", 4),
            user in "[a-z]{1,6}",
            host in "[a-z][a-z0-9.-]{0,10}",
            port in proptest::option::of(1u16..),
            vhost in "[a-z%/]{0,6}",
            query in prop_oneof![Just(""), Just("?heartbeat=5"), Just("?hearbeat=5"), Just("?heartbeat=x")],
            tls in any::<bool>(),
            raw in any::<bool>(),
            second in any::<bool>(),
        ) {
            let mut password = glue[0].clone();
            for (i, piece) in secret.iter().enumerate() {
                password.push_str(piece);
                password.push_str(&glue[(i + 1) % glue.len()]);
            }
            let written = if raw { password.clone() } else { percent_encode(&password) };
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let url = format!("amqp{}://{user}:{written}@{host}{port}/{vhost}{query}", if tls { "s" } else { "" });
            let shown = |text: &str| secret.iter().find(|piece| text.contains(piece.as_str())).cloned();
            match parse(&url) {
                Ok(u) => {
                    prop_assert_eq!(shown(&u.to_string()), None, "{} shows in {}", password, u);
                    prop_assert_eq!(shown(&format!("{u:?}")), None);
                    if !raw {
                        prop_assert_eq!(u.password(), Some(password.as_str()));
                    }
                }
                Err(e) => prop_assert_eq!(shown(&e.to_string()), None, "{} shows in {}", password, e),
            }
            prop_assert_eq!(shown(&redact(&url)), None, "redact({})", url);
            let list = if second { format!("amqp://a:b@n1/lab, {url}") } else { format!("{url},amqp://a:b@n2/lab") };
            match parse_list(&list) {
                Ok(all) => {
                    for u in all {
                        prop_assert_eq!(shown(&u.to_string()), None, "{}", u);
                    }
                }
                Err(e) => prop_assert_eq!(shown(&e.to_string()), None, "{} shows in {}", password, e),
            }
            for text in [format!("$AMQP_URL={url}"), format!("{user}:{written}@{host}")] {
                prop_assert_eq!(shown(&redact(&text)), None, "redact({})", text);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,60}") {
            let _ = parse(&s);
            let _ = parse(&format!("amqp://{s}"));
            let _ = redact(&s);
        }
    }

    #[test]
    fn a_scheme_after_a_multibyte_character_is_found_on_a_character_boundary() {
        // Found by `arbitrary_text_never_panics`: the byte after 'Ⱥ' is inside it.
        // (Not an AMQP URL: masked from its first ':' on, as any text without one.)
        assert_eq!(redact("%Ⱥ://u:secret@h"), "%Ⱥ:***@h");
        assert_eq!(redact("é amqp://u:secret@h"), "é amqp://u:***@h");
    }
}
