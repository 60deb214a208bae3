//! The serial side of the ioppytest wire: IEEE 802.15.4 frames from and to probes, as the
//! Python ioppytest-agent 0.2.20 (`agent/utils/serial_listener.py`, its message classes in
//! `agent/utils/messages.py`, the same as ioppytest-utils') put them on `amq.topic`.
//!
//! Owns the four routing keys (`fromAgent.<name>.802154.serial.packet.raw` and
//! `toAgent.<name>.802154.serial.packet.raw` for frames, `toAgent.<name>.802154.serial.start`
//! and `fromAgent.<name>.802154.serial.started` for the port), the frame body and the
//! start/started body. Pure: no I/O, no clock (the caller passes the timestamp). A serial
//! agent's worker calls it per frame on the ioppytest wire: [`encode_frame`] writes into a
//! reused buffer, [`decode_frame`] streams `data` into one, neither allocates otherwise.
//!
//! What the Python code does, which these bodies follow (facts from its source):
//! - a frame read from the probe becomes a `MsgPacketSniffedRaw` whose body, keys sorted
//!   (`Message.to_dict`) and dumped by kombu's `json` serializer, reads
//!   `{"_api_version": "1.2.15", "data": [...], "data_slip": [...], "interface_name":
//!   "serial", "timestamp": 1796618101}`: `data` the frame, `data_slip` the bytes as they
//!   came off the line, its opening and closing END included; both lists of integers.
//!   `timestamp` is whole seconds: the listener never sets it, and `Message.__init__`
//!   overwrites the template's float with its `timestamp` property, `int(time.time())`.
//! - properties: kombu's (`content_type` `application/json`, `content_encoding` `utf-8`,
//!   persistent): `amqp::IOPPYTEST_PROPERTIES` (built from [`super::CONTENT_TYPE`] and its
//!   neighbours).
//! - on opening the port it publishes `MsgAgentSerialStarted` `{"_api_version", "boudrate",
//!   "name", "port"}` (sic: `boudrate`, a string such as `"460800"`) on
//!   `fromAgent.<name>.802154.serial.started`. `MsgAgentSerialStart` (same fields) on
//!   `toAgent.<name>.802154.serial.start` is declared in the message classes, but nothing
//!   handles it: the old serial connector took its device from environment variables
//!   (`FINTEROP_CONNECTOR_SERIAL_PORT`, `…_BAUDRATE`), and 0.2.20 starts no listener at all.
//! - 0.2.20 has no code that writes frames to a probe: its serial consumer (up to 0.2.0,
//!   `SerialConsumer.handle_data`) was dropped. That consumer took `data` of the
//!   `MsgPacketInjectRaw` on `toAgent.<name>.802154.serial.packet.raw` and wrote it
//!   SLIP-framed with a leading END. ioppytest's packet router re-publishes each sniffed
//!   frame to its peers' `toAgent…` keys as a `MsgPacketInjectRaw`: `{"_api_version",
//!   "data", "interface_name", "timestamp"}`, no `data_slip`, `content_type` only
//!   ([`encode_inject`]). Only `data` is read on the way in.
//! - the listener publishes empty frames (`END END`) and has no size limit; we count and
//!   drop both (a 802.15.4 PSDU is at most 127 bytes: [`crate::codec::slip`]).

use super::{decode_bytes, write_decimal, write_json_string, JsonError, API_VERSION};
use crate::codec::slip;

/// `interface_name` of every serial frame body.
pub const INTERFACE_NAME: &str = "serial";
/// The Python listener's defaults: `/dev/ttyUSB0` at 460800 baud.
pub const DEFAULT_PORT: &str = "/dev/ttyUSB0";
/// See [`DEFAULT_PORT`].
pub const DEFAULT_BAUD: u32 = 460_800;

/// `fromAgent.<name>.802154.serial.packet.raw`: frames an agent read from its probe.
pub fn routing_key_from_agent(name: &str) -> String {
    format!("fromAgent.{name}.802154.serial.packet.raw")
}

/// `toAgent.<name>.802154.serial.packet.raw`: frames for an agent to write to its probe.
pub fn routing_key_to_agent(name: &str) -> String {
    format!("toAgent.{name}.802154.serial.packet.raw")
}

/// `toAgent.<name>.802154.serial.start`: a request to open the probe ([`SerialStart`]).
pub fn routing_key_start(name: &str) -> String {
    format!("toAgent.{name}.802154.serial.start")
}

/// `fromAgent.<name>.802154.serial.started`: the probe is open ([`SerialStart`] body).
pub fn routing_key_started(name: &str) -> String {
    format!("fromAgent.{name}.802154.serial.started")
}

/// A serial key, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialKey<'a> {
    /// `fromAgent.<name>.802154.serial.packet.raw`.
    FromAgent { name: &'a str },
    /// `toAgent.<name>.802154.serial.packet.raw`.
    ToAgent { name: &'a str },
    /// `toAgent.<name>.802154.serial.start`.
    Start { name: &'a str },
    /// `fromAgent.<name>.802154.serial.started`.
    Started { name: &'a str },
}

/// Parses one of the four serial keys (the inverse of the `routing_key_*` functions);
/// `None` for any other key, or an empty or dotted name.
pub fn parse_key(key: &str) -> Option<SerialKey<'_>> {
    let (from, rest) = if let Some(rest) = key.strip_prefix("fromAgent.") { (true, rest) } else { (false, key.strip_prefix("toAgent.")?) };
    let (name, topic) = rest.split_once('.')?;
    if name.is_empty() {
        return None;
    }
    match (from, topic) {
        (true, "802154.serial.packet.raw") => Some(SerialKey::FromAgent { name }),
        (false, "802154.serial.packet.raw") => Some(SerialKey::ToAgent { name }),
        (false, "802154.serial.start") => Some(SerialKey::Start { name }),
        (true, "802154.serial.started") => Some(SerialKey::Started { name }),
        _ => None,
    }
}

/// Encodes a frame body into `out` (cleared first) as the Python listener publishes it:
/// `{"_api_version": "1.2.15", "data": [...], "data_slip": [...], "interface_name": "serial",
/// "timestamp": 1795303105}`. `data_slip` is [`slip::encode`] of the frame (what the
/// listener records for a frame sent that way); `timestamp_s` is UNIX seconds.
pub fn encode_frame(frame: &[u8], timestamp_s: u64, out: &mut Vec<u8>) {
    out.clear();
    // "255, " per byte; data_slip at most twice the frame plus the two ENDs; ~110 else.
    out.reserve(frame.len().saturating_mul(15).saturating_add(140));
    out.extend_from_slice(b"{\"_api_version\": \"");
    out.extend_from_slice(API_VERSION.as_bytes());
    out.extend_from_slice(b"\", \"data\": [");
    write_list(out, frame.iter().copied());
    out.extend_from_slice(b"], \"data_slip\": [");
    // The line as slip::encode writes it: END, escaped bytes, END.
    out.extend_from_slice(b"192");
    for &b in frame {
        match b {
            slip::END => out.extend_from_slice(b", 219, 220"),
            slip::ESC => out.extend_from_slice(b", 219, 221"),
            _ => {
                out.extend_from_slice(b", ");
                write_decimal(out, u64::from(b));
            }
        }
    }
    out.extend_from_slice(b", 192], \"interface_name\": \"");
    out.extend_from_slice(INTERFACE_NAME.as_bytes());
    out.extend_from_slice(b"\", \"timestamp\": ");
    write_decimal(out, timestamp_s);
    out.push(b'}');
}

/// Encodes a frame for `toAgent.<name>.802154.serial.packet.raw` into `out` (cleared first)
/// as ioppytest's packet router forwards one (`MsgPacketInjectRaw`, keys sorted):
/// `{"_api_version": "1.2.15", "data": [...], "interface_name": "serial", "timestamp":
/// 1795303105}`.
pub fn encode_inject(frame: &[u8], timestamp_s: u64, out: &mut Vec<u8>) {
    super::encode_packet(frame, INTERFACE_NAME, timestamp_s, out);
}

/// `1, 2, 3`.
fn write_list(out: &mut Vec<u8>, bytes: impl Iterator<Item = u8>) {
    for (i, b) in bytes.enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        write_decimal(out, u64::from(b));
    }
}

/// Decodes the frame (`data`) of a frame body into `out`: keys in any order, extra keys
/// ignored (`data_slip` is not read: `data` is the frame). At most `max_frame` bytes, else
/// [`JsonError::PacketTooBig`] as soon as the list grows past it; empty is
/// [`JsonError::EmptyPacket`].
pub fn decode_frame(body: &[u8], max_frame: usize, out: &mut Vec<u8>) -> Result<(), JsonError> {
    decode_bytes(body, "data", max_frame, out)
}

/// Decodes `data_slip` of a frame body into `out` (at most `max_len` bytes): for tests and
/// tools that compare what a probe sent with what was decoded.
pub fn decode_data_slip(body: &[u8], max_len: usize, out: &mut Vec<u8>) -> Result<(), JsonError> {
    decode_bytes(body, "data_slip", max_len, out)
}

/// Body of `toAgent.<name>.802154.serial.start` and `fromAgent.<name>.802154.serial.started`
/// (`MsgAgentSerialStart`, `MsgAgentSerialStarted`). Every field may be missing or `null`;
/// `boudrate` (sic) may be a string or a number. Fields in alphabetical order, as Python
/// sorts them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SerialStart {
    /// API version of the sender.
    #[serde(default, deserialize_with = "super::lenient_string")]
    pub _api_version: String,
    /// The baud rate as text (`"460800"`), as the Python listener writes it.
    #[serde(default, deserialize_with = "super::lenient_opt_string")]
    pub boudrate: Option<String>,
    /// Agent name.
    #[serde(default, deserialize_with = "super::lenient_string")]
    pub name: String,
    /// The device, e.g. `/dev/ttyUSB0`.
    #[serde(default, deserialize_with = "super::lenient_opt_string")]
    pub port: Option<String>,
}

impl SerialStart {
    /// The baud rate, when `boudrate` holds a positive whole number.
    pub fn baud(&self) -> Option<u32> {
        self.boudrate.as_deref()?.trim().parse().ok().filter(|&b| b > 0)
    }
}

/// Encodes `fromAgent.<name>.802154.serial.started` into `out` (cleared first) as the Python
/// listener does: `{"_api_version": "1.2.15", "boudrate": "460800", "name": "probe1",
/// "port": "/dev/ttyUSB0"}`.
pub fn encode_started(name: &str, port: &str, baud: u32, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(b"{\"_api_version\": \"");
    out.extend_from_slice(API_VERSION.as_bytes());
    out.extend_from_slice(b"\", \"boudrate\": \"");
    write_decimal(out, u64::from(baud));
    out.extend_from_slice(b"\", \"name\": ");
    write_json_string(out, name);
    out.extend_from_slice(b", \"port\": ");
    write_json_string(out, port);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What ioppytest-agent 0.2.20's listener published on Python 3.11 (kombu 5.7) for a
    /// frame `41 88 c0 db 01` sent `c0 41 88 db dc db dd 01 c0` (recorded with
    /// tests/ioppytest_real/serial_listener.py; `tests/ioppytest_real.rs` checks it live).
    const PYTHON_BODY: &[u8] = br#"{"_api_version": "1.2.15", "data": [65, 136, 192, 219, 1], "data_slip": [192, 65, 136, 219, 220, 219, 221, 1, 192], "interface_name": "serial", "timestamp": 1796618101}"#;

    #[test]
    fn encodes_byte_for_byte_what_the_python_listener_publishes() {
        let mut out = Vec::new();
        encode_frame(&[0x41, 0x88, 0xc0, 0xdb, 0x01], 1_796_618_101, &mut out);
        assert_eq!(std::str::from_utf8(&out).unwrap(), std::str::from_utf8(PYTHON_BODY).unwrap());
        let mut frame = Vec::new();
        decode_frame(PYTHON_BODY, slip::MAX_PSDU, &mut frame).unwrap();
        assert_eq!(frame, [0x41, 0x88, 0xc0, 0xdb, 0x01]);
        let mut line = Vec::new();
        decode_data_slip(PYTHON_BODY, 300, &mut line).unwrap();
        let mut encoded = Vec::new();
        slip::encode(&frame, &mut encoded);
        assert_eq!(line, encoded);
    }

    #[test]
    fn decoding_tolerates_key_order_extra_keys_and_python2_dicts() {
        let mut out = Vec::new();
        // Python 2.7's dict order, and a router's extra key.
        let body =
            br#"{"interface_name": "serial", "timestamp": 1796618101.5, "data_slip": [192, 1, 192], "_api_version": "1.2.15", "data": [1], "x": {"y": null}}"#;
        decode_frame(body, 127, &mut out).unwrap();
        assert_eq!(out, [1]);
        // What ioppytest's router forwards (MsgPacketInjectRaw: no data_slip).
        encode_inject(&[255, 0], 1_796_618_101, &mut out);
        assert_eq!(out, br#"{"_api_version": "1.2.15", "data": [255, 0], "interface_name": "serial", "timestamp": 1796618101}"#);
        // An injection body in another key order.
        decode_frame(br#"{"timestamp": 1, "interface_name": "serial", "data": [255, 0]}"#, 127, &mut out).unwrap();
        assert_eq!(out, [255, 0]);
    }

    #[test]
    fn decode_limits() {
        let mut out = Vec::new();
        let mut body = Vec::new();
        let max: Vec<u8> = (0..127).collect();
        encode_frame(&max, 1, &mut body);
        decode_frame(&body, slip::MAX_PSDU, &mut out).unwrap();
        assert_eq!(out, max);
        encode_frame(&[7; 128], 1, &mut body);
        assert_eq!(decode_frame(&body, slip::MAX_PSDU, &mut out), Err(JsonError::PacketTooBig));
        assert_eq!(decode_frame(br#"{"data": []}"#, 127, &mut out), Err(JsonError::EmptyPacket));
        assert_eq!(decode_frame(br#"{"data_slip": [192, 192]}"#, 127, &mut out), Err(JsonError::MissingData));
        assert_eq!(decode_frame(br#"{"data": [256]}"#, 127, &mut out), Err(JsonError::ByteOutOfRange));
        assert_eq!(decode_frame(b"[1]", 127, &mut out), Err(JsonError::NotObject));
    }

    #[test]
    fn routing_keys_both_ways() {
        assert_eq!(routing_key_from_agent("probe1"), "fromAgent.probe1.802154.serial.packet.raw");
        assert_eq!(routing_key_to_agent("probe1"), "toAgent.probe1.802154.serial.packet.raw");
        assert_eq!(routing_key_start("probe1"), "toAgent.probe1.802154.serial.start");
        assert_eq!(routing_key_started("probe1"), "fromAgent.probe1.802154.serial.started");
        let name = "agent_TT";
        assert_eq!(parse_key(&routing_key_from_agent(name)), Some(SerialKey::FromAgent { name }));
        assert_eq!(parse_key(&routing_key_to_agent(name)), Some(SerialKey::ToAgent { name }));
        assert_eq!(parse_key(&routing_key_start(name)), Some(SerialKey::Start { name }));
        assert_eq!(parse_key(&routing_key_started(name)), Some(SerialKey::Started { name }));
        for bad in [
            "fromAgent..802154.serial.packet.raw",
            "fromAgent.a.802154.serial.start",
            "toAgent.a.802154.serial.started",
            "fromAgent.a.ip.tun.packet.raw",
            "fromAgent.a.b.802154.serial.packet.raw",
            "toAgent.a",
            "802154.serial.packet.raw",
        ] {
            assert_eq!(parse_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn started_as_python_writes_it_and_lenient_on_input() {
        let mut out = Vec::new();
        encode_started("probe1", "/dev/ttyUSB0", 460_800, &mut out);
        assert_eq!(out, br#"{"_api_version": "1.2.15", "boudrate": "460800", "name": "probe1", "port": "/dev/ttyUSB0"}"#);
        let s: SerialStart = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            s,
            SerialStart { _api_version: API_VERSION.into(), boudrate: Some("460800".into()), name: "probe1".into(), port: Some("/dev/ttyUSB0".into()) }
        );
        assert_eq!(s.baud(), Some(460_800));
        // The message template's nulls, a number, junk.
        let s: SerialStart = serde_json::from_str(r#"{"name": null, "port": null, "boudrate": null}"#).unwrap();
        assert_eq!((s.name.as_str(), s.port.as_deref(), s.baud()), ("", None, None));
        let s: SerialStart = serde_json::from_str(r#"{"boudrate": 115200, "extra": 1}"#).unwrap();
        assert_eq!(s.baud(), Some(115_200));
        let s: SerialStart = serde_json::from_str(r#"{"boudrate": "fast"}"#).unwrap();
        assert_eq!(s.baud(), None);
        assert!(serde_json::from_str::<SerialStart>(r#"{"port": [1]}"#).is_err());
    }

    proptest! {
        #[test]
        fn prop_roundtrip(frame in proptest::collection::vec(any::<u8>(), 1..=slip::DEFAULT_MAX_FRAME), ts in any::<u64>()) {
            let mut body = Vec::new();
            encode_frame(&frame, ts, &mut body);
            let mut out = Vec::new();
            decode_frame(&body, slip::DEFAULT_MAX_FRAME, &mut out).unwrap();
            prop_assert_eq!(&out, &frame);
            decode_data_slip(&body, slip::max_encoded_len(frame.len()), &mut out).unwrap();
            let mut line = Vec::new();
            slip::encode(&frame, &mut line);
            prop_assert_eq!(&out, &line);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            prop_assert_eq!(v["timestamp"].as_u64(), Some(ts));
            prop_assert_eq!(v["interface_name"].as_str(), Some(INTERFACE_NAME));
        }

        #[test]
        fn prop_decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            if decode_frame(&body, 127, &mut out).is_ok() {
                prop_assert!(!out.is_empty() && out.len() <= 127);
            }
            let _ = serde_json::from_slice::<SerialStart>(&body);
        }
    }
}
