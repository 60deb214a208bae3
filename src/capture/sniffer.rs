//! `agent sniffer`: ioppytest's sniffer role, so that a test coordinator gets its pcap from
//! tunbus. The message shapes are those of the published `ioppytest-utils` (1.2.14,
//! `messages.py`): requests on `sniffing.<verb>.request`, answers on `sniffing.<verb>.reply`
//! with the request's `correlation_id`, JSON bodies with `ok` (and `error_message` when not).
//!
//! | request | body | answer |
//! |---|---|---|
//! | `sniffing.start.request` | `capture_id` (`filter_if`, `filter_proto`, `link_id` ignored) | `ok`; a capture runs |
//! | `sniffing.stop.request` | `{}` | `ok`; the capture's file is complete |
//! | `sniffing.getcapture.request` | `capture_id` | `ok`, `file_enc: "pcap_base64"`, `filename`, `value` |
//! | `sniffing.getlastcapture.request` | `{}` | the same, for the last capture started |
//!
//! The file is a classic pcap of link type raw IP (what ioppytest's own sniffer writes in
//! its `ipv6_tun` mode), kept in `--dir` as `<capture_id>.pcap`. What a capture holds is
//! what `agent capture` sees on the exchange: the old agents' `fromAgent.…packet.raw`
//! messages and the native agents' batches, cut into wire-sized packets.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value as Json};

use super::pcapng::{ClassicWriter, LINKTYPE_RAW};
use super::{Filter, Options as CaptureOptions, Summary};
use crate::amqp::client::{self, Client, ConnectOptions, Endpoint, Owned};
use crate::amqp::wire::Properties;
use crate::codec::ioppytest;
use crate::util::Stop;

/// What the sniffer binds.
pub const REQUESTS: &str = "sniffing.*.request";
/// The `file_enc` of a capture in an answer.
pub const FILE_ENC: &str = "pcap_base64";

/// Where and how the sniffer serves.
#[derive(Clone, Debug)]
pub struct Options {
    pub endpoints: Vec<Endpoint>,
    pub exchange: String,
    /// Where the captures are kept.
    pub dir: PathBuf,
    pub queue_max_bytes: u64,
}

/// The capture running, if any.
struct Running {
    id: String,
    stop: Stop,
    thread: JoinHandle<Result<Summary, String>>,
}

/// The sniffer's state between requests.
struct Sniffer {
    opts: Options,
    running: Option<Running>,
    last: Option<String>,
}

/// Serves until `stop`: answers each request on the control connection.
pub fn serve(opts: Options, stop: &Stop) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("--dir {}: cannot create it", opts.dir.display()))?;
    let mut c = open(&opts.endpoints, &opts.exchange, stop).map_err(crate::exit::Failure::from)?;
    let ready =
        ioppytest::ComponentReady { _api_version: ioppytest::API_VERSION.into(), component: "sniffing".into(), description: "tunbus agent sniffer".into() };
    if let Ok(body) = serde_json::to_vec(&ready) {
        c.publish_copy(&opts.exchange, ioppytest::ROUTING_KEY_COMPONENT_READY, &props(None), &body)?;
    }
    tracing::info!(exchange = %opts.exchange, dir = %opts.dir.display(), "sniffer ready: serving sniffing.start/stop/getcapture/getlastcapture");
    let mut sniffer = Sniffer { opts, running: None, last: None };
    while !stop.is_raised() {
        let Some(Owned::Delivery { routing_key, correlation_id, body, .. }) = c.wait_event(Duration::from_millis(250), stop.flag())? else { continue };
        let request: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
        let answer = sniffer.answer(&routing_key, &request);
        let mut answer = match answer {
            Ok(a) => a,
            Err(why) => json!({ "ok": false, "error_message": why, "error_code": null }),
        };
        answer["_api_version"] = Json::from(ioppytest::API_VERSION);
        let reply_key = routing_key.strip_suffix(".request").map(|verb| format!("{verb}.reply")).unwrap_or_else(|| format!("{routing_key}.reply"));
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        c.publish_copy(&sniffer.opts.exchange, &reply_key, &props(correlation_id.as_deref()), &body)?;
    }
    sniffer.stop_running();
    c.close(Duration::from_millis(300));
    Ok(())
}

fn props(correlation_id: Option<&str>) -> Properties<'_> {
    Properties { content_type: Some(ioppytest::CONTENT_TYPE), correlation_id, ..Properties::default() }
}

fn open(endpoints: &[Endpoint], exchange: &str, stop: &Stop) -> Result<Client, client::Error> {
    let opts = ConnectOptions::new("tunbus sniffer");
    let plan = client::Plan::listener(exchange, vec![REQUESTS.to_owned()], None);
    Client::connect(endpoints.to_vec(), &opts, plan, client::Retry::OncePerNode, stop.flag())
}

/// A capture id as a file name: letters, digits, `-`, `_` and `.` (not leading).
pub fn file_name(capture_id: &str) -> Option<String> {
    let ok = !capture_id.is_empty()
        && capture_id.len() <= 128
        && !capture_id.starts_with('.')
        && capture_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then(|| format!("{capture_id}.pcap"))
}

impl Sniffer {
    fn answer(&mut self, key: &str, request: &Json) -> Result<Json, String> {
        let id = |r: &Json| r.get("capture_id").and_then(Json::as_str).map(str::to_owned);
        match key {
            "sniffing.start.request" => {
                let id = id(request).unwrap_or_else(|| "capture".to_owned());
                self.start(&id)?;
                Ok(json!({ "ok": true }))
            }
            "sniffing.stop.request" => {
                self.stop_running();
                Ok(json!({ "ok": true }))
            }
            "sniffing.getcapture.request" => {
                let id = id(request).ok_or("getcapture needs a capture_id")?;
                self.capture(&id)
            }
            "sniffing.getlastcapture.request" => {
                let id = self.last.clone().ok_or("no capture was started yet")?;
                self.capture(&id)
            }
            other => Err(format!("unknown request {other}")),
        }
    }

    fn start(&mut self, id: &str) -> Result<(), String> {
        if let Some(r) = &self.running {
            return Err(format!("capture {} is running: stop it first", r.id));
        }
        let name = file_name(id).ok_or_else(|| format!("capture_id {id:?}: only letters, digits, '-', '_' and '.'"))?;
        let path = self.opts.dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut recorder = ClassicWriter::new(std::io::BufWriter::new(file), LINKTYPE_RAW).map_err(|e| e.to_string())?;
        let capture = CaptureOptions {
            endpoints: self.opts.endpoints.clone(),
            exchange: self.opts.exchange.clone(),
            filter: Filter::default(),
            duration: None,
            queue_max_bytes: self.opts.queue_max_bytes,
            keys: None,
        };
        let stop = Stop::new();
        let flag = stop.clone();
        // The tap is open before the answer: what is sent after `ok` is in the file.
        let tap = super::open_tap(&capture.endpoints, &capture.exchange, capture.queue_max_bytes, &flag)
            .map_err(|e| format!("cannot open the capture's queue: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(format!("sniff-{id}"))
            .spawn(move || super::run_on(tap, &capture, &mut recorder, &flag).map_err(|e| e.to_string()))
            .map_err(|e| e.to_string())?;
        tracing::info!(capture_id = id, file = %path.display(), "capture started");
        self.running = Some(Running { id: id.to_owned(), stop, thread });
        self.last = Some(id.to_owned());
        Ok(())
    }

    fn stop_running(&mut self) {
        let Some(r) = self.running.take() else { return };
        r.stop.raise();
        match r.thread.join() {
            Ok(Ok(summary)) => tracing::info!(capture_id = %r.id, "{}", summary.line(&format!("{}.pcap", r.id))),
            Ok(Err(e)) => tracing::warn!(capture_id = %r.id, error = %e, "capture failed"),
            Err(_) => tracing::warn!(capture_id = %r.id, "capture thread panicked"),
        }
    }

    fn capture(&self, id: &str) -> Result<Json, String> {
        if self.running.as_ref().is_some_and(|r| r.id == id) {
            return Err(format!("capture {id} is still running: stop it first"));
        }
        let name = file_name(id).ok_or_else(|| format!("capture_id {id:?} is not a capture name"))?;
        let bytes = read(&self.opts.dir.join(&name))?;
        Ok(json!({ "ok": true, "file_enc": FILE_ENC, "filename": name, "value": crate::util::base64(&bytes) }))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("no capture {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_ids_are_file_names() {
        assert_eq!(file_name("TD_COAP_CORE_01").as_deref(), Some("TD_COAP_CORE_01.pcap"));
        for bad in ["", "../etc/passwd", ".hidden", "a/b", "a b"] {
            assert_eq!(file_name(bad), None, "{bad}");
        }
    }
}
