//! The ioppytest JSON form (`--wire ioppytest`): one IP packet per message, as the Python
//! `ioppytest-agent` and its packet router speak it on `amq.topic`.
//!
//! Owns the packet body (`{"_api_version", "data": [bytes as integers], "interface_name",
//! "timestamp"}`), the `ip.tun.started` / `ip.tun.start` control body and the topic names;
//! [`addressing`], the old agent's addresses in that body and its flags; [`serial`], the
//! serial side (802.15.4 probes: frames, `data_slip`, `802154.serial.*` keys).
//! Pure: no I/O, no clock. The per-queue worker threads call it per packet in compatibility
//! mode; decoding streams `data` straight into a reused buffer (no `serde_json::Value`),
//! encoding writes into a reused buffer, byte-identical to Python's `json.dumps`.

use core::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

pub mod addressing;
pub mod serial;

use super::v1::MAX_PACKET_LEN;

/// `_api_version` written in every body (the one ioppytest-agent 0.2.20 sends).
pub const API_VERSION: &str = "1.2.15";
/// Bodies larger than this are rejected before parsing.
pub const MAX_BODY_LEN: usize = 1 << 20;
/// Exchange the ioppytest agents and router use.
pub const EXCHANGE: &str = "amq.topic";
/// `content_type` property of every ioppytest message (receivers there accept only this).
pub const CONTENT_TYPE: &str = "application/json";
/// `content_encoding` property set by the Python agent.
pub const CONTENT_ENCODING: &str = "utf-8";
/// `delivery_mode` property set by the Python agent (persistent). These properties, as
/// AMQP writes them, are `amqp::IOPPYTEST_PROPERTIES` (the codec knows no AMQP).
pub const DELIVERY_MODE: u8 = 2;
/// The Python agent sends an empty `headers` table with every message.
pub const EMPTY_HEADERS: bool = true;
/// Routing key of the "component ready" announcement.
pub const ROUTING_KEY_COMPONENT_READY: &str = "testingtool.component.ready";

/// Why a body is not a valid ioppytest packet message. Counted and dropped by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The body is larger than `MAX_BODY_LEN`.
    #[error("body too big")]
    TooBig,
    /// Not UTF-8 JSON, or trailing bytes after the value.
    #[error("body is not JSON")]
    NotJson,
    /// Valid JSON, but not an object.
    #[error("body is not a JSON object")]
    NotObject,
    /// The object has no `data` key.
    #[error("no data key")]
    MissingData,
    /// `data` is not a list.
    #[error("data is not a list")]
    DataNotList,
    /// An element of `data` is not an integer 0..=255.
    #[error("data element is not a byte")]
    ByteOutOfRange,
    /// `data` has more than `MAX_PACKET_LEN` elements.
    #[error("packet too big")]
    PacketTooBig,
    /// `data` is an empty list.
    #[error("empty packet")]
    EmptyPacket,
}

/// Decodes a packet body: the bytes of `data` are appended to `out` (cleared first).
///
/// Keys may come in any order; unknown keys are skipped without being built. When `data`
/// appears twice the last one wins (as with Python's `json.loads`). On error `out` holds
/// an unspecified prefix.
pub fn decode_packet(body: &[u8], out: &mut Vec<u8>) -> Result<(), JsonError> {
    decode_bytes(body, "data", MAX_PACKET_LEN, out)
}

/// Decodes the integer list under `key` of a JSON object (as [`decode_packet`] does for
/// `data`) into `out`: at most `max_len` bytes, else [`JsonError::PacketTooBig`] (found as
/// soon as the list grows past it). A missing `key` is [`JsonError::MissingData`], an
/// empty list [`JsonError::EmptyPacket`].
pub fn decode_bytes(body: &[u8], key: &str, max_len: usize, out: &mut Vec<u8>) -> Result<(), JsonError> {
    out.clear();
    if body.len() > MAX_BODY_LEN {
        return Err(JsonError::TooBig);
    }
    let mut reason = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let found =
        BodySeed { key, max_len, out: &mut *out, reason: &mut reason }.deserialize(&mut de).and_then(|found| de.end().map(|()| found)).map_err(|e| match e
            .classify()
        {
            serde_json::error::Category::Data => reason.unwrap_or(JsonError::NotJson),
            _ => JsonError::NotJson,
        })?;
    if !found {
        return Err(JsonError::MissingData);
    }
    if out.is_empty() {
        return Err(JsonError::EmptyPacket);
    }
    Ok(())
}

/// Top-level object; yields whether its `key` was seen. `reason` says which
/// [`JsonError`] a serde data error stands for.
struct BodySeed<'o> {
    key: &'o str,
    max_len: usize,
    out: &'o mut Vec<u8>,
    reason: &'o mut Option<JsonError>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        *self.reason = Some(JsonError::NotObject);
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut found = false;
        *self.reason = None;
        while let Some(is_data) = map.next_key_seed(IsKey(self.key))? {
            if is_data {
                found = true;
                self.out.clear();
                map.next_value_seed(DataSeed { max_len: self.max_len, out: &mut *self.out, reason: &mut *self.reason })?;
                *self.reason = None;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Map key: is it this one (`"data"`)? Compares without allocating.
struct IsKey<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for IsKey<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for IsKey<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// The `data` list: each element goes straight into `out`.
struct DataSeed<'o> {
    max_len: usize,
    out: &'o mut Vec<u8>,
    reason: &'o mut Option<JsonError>,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        *self.reason = Some(JsonError::DataNotList);
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of integers 0..=255")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            *self.reason = Some(JsonError::ByteOutOfRange);
            let Some(byte) = seq.next_element::<u8>()? else {
                return Ok(());
            };
            if self.out.len() >= self.max_len {
                *self.reason = Some(JsonError::PacketTooBig);
                return Err(de::Error::custom("packet too big"));
            }
            self.out.push(byte);
        }
    }
}

/// Encodes a packet body into `out` (cleared first), exactly as the Python agent does:
/// `{"_api_version": "1.2.15", "data": [69, 0, ...], "interface_name": "tun0", "timestamp": 1795303105}`.
pub fn encode_packet(packet: &[u8], interface_name: &str, timestamp_s: u64, out: &mut Vec<u8>) {
    out.clear();
    // Each byte takes at most 5 characters ("255, "); the rest is a little over 100.
    out.reserve(packet.len().saturating_mul(5).saturating_add(interface_name.len().saturating_mul(6)).saturating_add(112));
    out.extend_from_slice(b"{\"_api_version\": \"");
    out.extend_from_slice(API_VERSION.as_bytes());
    out.extend_from_slice(b"\", \"data\": [");
    for (i, &b) in packet.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        write_decimal(out, u64::from(b));
    }
    out.extend_from_slice(b"], \"interface_name\": ");
    write_json_string(out, interface_name);
    out.extend_from_slice(b", \"timestamp\": ");
    write_decimal(out, timestamp_s);
    out.push(b'}');
}

fn write_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A JSON string as Python's `json.dumps` writes it (`ensure_ascii=True`).
fn write_json_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for &u in c.encode_utf16(&mut units).iter() {
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(HEX[usize::from((u >> shift) & 0xf)]);
                    }
                }
            }
        }
    }
    out.push(b'"');
}

/// Body of `fromAgent.<name>.ip.tun.started` and `toAgent.<name>.ip.tun.start`.
///
/// Every field may be missing or `null` on input. The address fields also accept JSON
/// numbers (ioppytest configurations write `ipv6_host: 1`), kept as their decimal text.
/// Fields are in alphabetical order, so serialising follows the Python agent's key order.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TunStarted {
    /// API version of the sender, e.g. `"1.2.15"`.
    #[serde(default, deserialize_with = "lenient_string")]
    pub _api_version: String,
    /// IPv4 address of the TUN, e.g. `"10.2.0.1"`.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub ipv4_address: Option<String>,
    /// IPv4 host part, usually `null`.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub ipv4_host: Option<String>,
    /// IPv4 netmask, e.g. `"255.255.255.0"`.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub ipv4_netmask: Option<String>,
    /// IPv4 network, e.g. `"10.2.0.0"`.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub ipv4_network: Option<String>,
    /// IPv6 interface identifier, e.g. `"1"` (the address is `<prefix>::<host>`).
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub ipv6_host: Option<String>,
    /// Whether the agent disabled IPv6 forwarding on the TUN.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub ipv6_no_forwarding: bool,
    /// IPv6 prefix, e.g. `"bbbb"` (a /64).
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub ipv6_prefix: Option<String>,
    /// Agent name, e.g. `"agent_1"`.
    #[serde(default, deserialize_with = "lenient_string")]
    pub name: String,
    /// Host to re-route packets to, when the agent re-routes.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub re_route_packets_host: Option<String>,
    /// Interface to re-route packets through.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub re_route_packets_if: Option<String>,
    /// Prefix whose packets are re-routed.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub re_route_packets_prefix: Option<String>,
}

/// Body of `testingtool.component.ready`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ComponentReady {
    /// API version of the sender.
    #[serde(default, deserialize_with = "lenient_string")]
    pub _api_version: String,
    /// Component name, e.g. `"agent_1"`.
    #[serde(default, deserialize_with = "lenient_string")]
    pub component: String,
    /// Free text.
    #[serde(default, deserialize_with = "lenient_string")]
    pub description: String,
}

/// A string, number or bool as text; `None` for `null`.
fn lenient_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string, a number or null")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Like `lenient_opt_string`, `null` becomes the empty string.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    lenient_opt_string(d).map(Option::unwrap_or_default)
}

/// A bool; `null` is `false`.
fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(<Option<bool> as serde::Deserialize>::deserialize(d)?.unwrap_or(false))
}

/// What an old agent published, by the key it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromAgent<'a> {
    /// `fromAgent.<name>.ip.tun.packet.raw`.
    Packet { name: &'a str },
    /// `fromAgent.<name>.ip.tun.started`.
    Started { name: &'a str },
}

/// Parses a `fromAgent.…` key (the inverse of [`routing_key_from_agent`] and
/// [`routing_key_tun_started`]); `None` for any other key or an empty or dotted name.
pub fn parse_from_agent(key: &str) -> Option<FromAgent<'_>> {
    let (name, topic) = key.strip_prefix("fromAgent.")?.split_once('.')?;
    if name.is_empty() {
        return None;
    }
    match topic {
        "ip.tun.packet.raw" => Some(FromAgent::Packet { name }),
        "ip.tun.started" => Some(FromAgent::Started { name }),
        _ => None,
    }
}

/// `fromAgent.<name>.ip.tun.packet.raw`: packets an agent read from its TUN.
pub fn routing_key_from_agent(name: &str) -> String {
    format!("fromAgent.{name}.ip.tun.packet.raw")
}

/// `toAgent.<name>.ip.tun.packet.raw`: packets for an agent to write into its TUN.
pub fn routing_key_to_agent(name: &str) -> String {
    format!("toAgent.{name}.ip.tun.packet.raw")
}

/// `fromAgent.<name>.ip.tun.started`: the agent's TUN is up ([`TunStarted`] body).
pub fn routing_key_tun_started(name: &str) -> String {
    format!("fromAgent.{name}.ip.tun.started")
}

/// `toAgent.<name>.ip.tun.start`: request to bring the TUN up ([`TunStarted`] body).
pub fn routing_key_tun_start(name: &str) -> String {
    format!("toAgent.{name}.ip.tun.start")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `../shared/` sits beside the project root on every machine, CI's too.
    const VECTOR_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/ioppytest");

    fn vector(name: &str) -> Vec<u8> {
        std::fs::read(format!("{VECTOR_DIR}/{name}")).expect("test vector readable")
    }

    /// RFC 1071 checksum over an IPv4 header; 0 when the header's checksum is right.
    fn ipv4_header_checksum(h: &[u8]) -> u16 {
        let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn captured_icmp_echo_decodes_and_reencodes() {
        let body = vector("packet-ipv4-icmp-echo.json");
        let mut pkt = Vec::new();
        decode_packet(&body, &mut pkt).unwrap();
        assert_eq!(pkt.len(), 84);
        assert_eq!(pkt[0], 0x45);
        assert_eq!(u16::from_be_bytes([pkt[2], pkt[3]]), 84, "IPv4 total length");
        assert_eq!(ipv4_header_checksum(&pkt[..20]), 0, "IPv4 header checksum");
        assert_eq!(pkt[9], 1, "ICMP");
        assert_eq!(&pkt[12..16], &[10, 2, 0, 1]);
        assert_eq!(&pkt[16..20], &[10, 2, 0, 2]);
        assert_eq!(pkt[20], 8, "echo request");

        let mut out = Vec::new();
        encode_packet(&pkt, "tun0", 1795303105, &mut out);
        // Byte-identical to what the Python agent sent.
        assert_eq!(out, body.trim_ascii_end());
        let orig: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let ours: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(orig, ours);
        let keys: Vec<&String> = ours.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["_api_version", "data", "interface_name", "timestamp"]);
        assert!(ours["data"].as_array().unwrap().iter().all(|v| v.is_u64()));
    }

    #[test]
    fn key_order_and_extra_keys() {
        let body = br#" {"timestamp": 1, "extra": {"nested": [1, "x", null]}, "interface_name": "tun0",
                        "data": [96, 0, 255], "_api_version": "9"} "#;
        let mut out = vec![1, 2, 3];
        decode_packet(body, &mut out).unwrap();
        assert_eq!(out, [96, 0, 255]);
        // only data matters
        decode_packet(br#"{"data":[1]}"#, &mut out).unwrap();
        assert_eq!(out, [1]);
        // escaped key spelling
        decode_packet(br#"{"d\u0061ta":[2]}"#, &mut out).unwrap();
        assert_eq!(out, [2]);
        // last data wins
        decode_packet(br#"{"data":[1,2,3],"data":[4]}"#, &mut out).unwrap();
        assert_eq!(out, [4]);
    }

    #[test]
    fn decode_errors() {
        use JsonError::*;
        let mut out = Vec::new();
        let cases: &[(&[u8], JsonError)] = &[
            (b"", NotJson),
            (b"{", NotJson),
            (b"\xff", NotJson),
            (br#"{"data":[1]} x"#, NotJson),
            (br#"{"data":[1,]}"#, NotJson),
            (br#"{"data":[1"#, NotJson),
            (b"[1,2]", NotObject),
            (b"42", NotObject),
            (b"null", NotObject),
            (br#""data""#, NotObject),
            (b"{}", MissingData),
            (br#"{"Data":[1]}"#, MissingData),
            (br#"{"data":null}"#, DataNotList),
            (br#"{"data":"RQA="}"#, DataNotList),
            (br#"{"data":{"0":1}}"#, DataNotList),
            (br#"{"data":[256]}"#, ByteOutOfRange),
            (br#"{"data":[-1]}"#, ByteOutOfRange),
            (br#"{"data":[1.5]}"#, ByteOutOfRange),
            (br#"{"data":["1"]}"#, ByteOutOfRange),
            (br#"{"data":[[1]]}"#, ByteOutOfRange),
            (br#"{"data":[1e2]}"#, ByteOutOfRange),
            (br#"{"data":[]}"#, EmptyPacket),
        ];
        for &(body, want) in cases {
            assert_eq!(decode_packet(body, &mut out), Err(want), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn size_limits() {
        let mut out = Vec::new();
        let max = vec![0u8; MAX_PACKET_LEN];
        let mut body = Vec::new();
        encode_packet(&max, "tun0", 0, &mut body);
        assert!(body.len() <= MAX_BODY_LEN);
        decode_packet(&body, &mut out).unwrap();
        assert_eq!(out.len(), MAX_PACKET_LEN);

        encode_packet(&vec![0u8; MAX_PACKET_LEN + 1], "tun0", 0, &mut body);
        assert_eq!(decode_packet(&body, &mut out), Err(JsonError::PacketTooBig));

        let mut big = b"{\"data\":[1],\"pad\":\"".to_vec();
        big.resize(MAX_BODY_LEN, b'a');
        big.extend_from_slice(b"\"}");
        assert_eq!(decode_packet(&big, &mut out), Err(JsonError::TooBig));
    }

    #[test]
    fn interface_name_is_escaped_like_python() {
        let mut out = Vec::new();
        encode_packet(&[1], "a\"b\\c\n\u{1}é😀", 0, &mut out);
        let s = std::str::from_utf8(&out).unwrap();
        assert!(s.is_ascii());
        assert!(s.contains(r#""interface_name": "a\"b\\c\n\u0001\u00e9\ud83d\ude00""#), "{s}");
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        assert_eq!(v["interface_name"], "a\"b\\c\n\u{1}é😀");
        assert_eq!(v["timestamp"], 0);
    }

    #[test]
    fn tun_started_vector() {
        let body = vector("tun-started.json");
        let t: TunStarted = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            t,
            TunStarted {
                _api_version: "1.2.15".into(),
                name: "agent_1".into(),
                ipv4_address: Some("10.2.0.1".into()),
                ipv4_network: Some("10.2.0.0".into()),
                ipv4_netmask: Some("255.255.255.0".into()),
                ipv4_host: None,
                ipv6_prefix: Some("bbbb".into()),
                ipv6_host: Some("1".into()),
                ipv6_no_forwarding: false,
                re_route_packets_host: None,
                re_route_packets_if: None,
                re_route_packets_prefix: None,
            }
        );
        // Serialising gives the same JSON value, keys in the same order.
        let ours = serde_json::to_string(&t).unwrap();
        let a: serde_json::Value = serde_json::from_str(&ours).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(a, b);
        let key_order = |s: &str| -> Vec<usize> {
            [
                "_api_version",
                "ipv4_address",
                "ipv4_host",
                "ipv4_netmask",
                "ipv4_network",
                "ipv6_host",
                "ipv6_no_forwarding",
                "ipv6_prefix",
                "name",
                "re_route_packets_host",
                "re_route_packets_if",
                "re_route_packets_prefix",
            ]
            .iter()
            .map(|k| s.find(&format!("\"{k}\"")).unwrap())
            .collect()
        };
        let body_str = std::str::from_utf8(&body).unwrap();
        let (mine, theirs) = (key_order(&ours), key_order(body_str));
        assert!(mine.windows(2).all(|w| w[0] < w[1]) && theirs.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn tun_started_lenient() {
        let t: TunStarted = serde_json::from_str(
            r#"{"name": "agent_2", "ipv6_host": 2, "ipv6_prefix": "bbbb",
            "ipv6_no_forwarding": null, "unknown": [1]}"#,
        )
        .unwrap();
        assert_eq!(t.name, "agent_2");
        assert_eq!(t.ipv6_host.as_deref(), Some("2"));
        assert!(!t.ipv6_no_forwarding);
        assert_eq!(t.ipv4_address, None);
        assert_eq!(serde_json::from_str::<TunStarted>("{}").unwrap(), TunStarted::default());
        assert!(serde_json::from_str::<TunStarted>(r#"{"name": [1]}"#).is_err());
    }

    #[test]
    fn component_ready_roundtrip() {
        let c = ComponentReady { _api_version: API_VERSION.into(), component: "agent_1".into(), description: "up".into() };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, r#"{"_api_version":"1.2.15","component":"agent_1","description":"up"}"#);
        assert_eq!(serde_json::from_str::<ComponentReady>(&s).unwrap(), c);
    }

    #[test]
    fn routing_keys() {
        assert_eq!(routing_key_from_agent("agent_1"), "fromAgent.agent_1.ip.tun.packet.raw");
        assert_eq!(routing_key_to_agent("agent_TT"), "toAgent.agent_TT.ip.tun.packet.raw");
        assert_eq!(routing_key_tun_started("agent_1"), "fromAgent.agent_1.ip.tun.started");
        assert_eq!(routing_key_tun_start("agent_1"), "toAgent.agent_1.ip.tun.start");
        assert_eq!(parse_from_agent(&routing_key_from_agent("agent_1")), Some(FromAgent::Packet { name: "agent_1" }));
        assert_eq!(parse_from_agent(&routing_key_tun_started("agent_1")), Some(FromAgent::Started { name: "agent_1" }));
        for bad in ["fromAgent..ip.tun.started", "toAgent.a.ip.tun.packet.raw", "fromAgent.a.ip.tun.start", "fromAgent.a", "fromAgent.a.b.ip.tun.started"] {
            assert_eq!(parse_from_agent(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn prop_roundtrip(
            pkt in proptest::collection::vec(any::<u8>(), 1..2000),
            name in "\\PC{0,20}",
            ts in any::<u64>(),
        ) {
            let mut body = Vec::new();
            encode_packet(&pkt, &name, ts, &mut body);
            let mut out = Vec::new();
            decode_packet(&body, &mut out).unwrap();
            prop_assert_eq!(&out, &pkt);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            prop_assert_eq!(v["interface_name"].as_str(), Some(name.as_str()));
            prop_assert_eq!(v["timestamp"].as_u64(), Some(ts));
            prop_assert_eq!(v["_api_version"].as_str(), Some(API_VERSION));
        }

        #[test]
        fn prop_decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            let _ = decode_packet(&body, &mut out);
        }

        #[test]
        fn prop_decode_never_panics_on_jsonish(body in r#"[\{\}\[\]":, 0-9a-z\\.\-eE]{0,64}"#) {
            let mut out = Vec::new();
            if decode_packet(body.as_bytes(), &mut out).is_ok() {
                prop_assert!(!out.is_empty());
            }
        }

        #[test]
        fn prop_decode_mutated_vector(i in any::<proptest::sample::Index>(), b in any::<u8>()) {
            let mut body = vector("packet-ipv4-icmp-echo.json");
            let i = i.index(body.len());
            body[i] = b;
            let mut out = Vec::new();
            let _ = decode_packet(&body, &mut out);
        }
    }
}
