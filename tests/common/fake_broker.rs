//! A fake AMQP broker that plays hostile or broken brokers, one scenario per connection:
//! it speaks enough of the protocol to get a client through its handshake and set-up, then
//! misbehaves as the scenario says. After its script it behaves well (answers every
//! method, sends heartbeats), so an agent under test can be seen to live on.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tunbus::amqp::wire::{self, method, Properties, Value, Writer};

/// What one connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Everything right, for as long as the client stays.
    Good,
    /// `connection.tune` with `frame_max` 8.
    TinyFrameMax,
    /// After set-up, a frame larger than the negotiated maximum.
    FrameTooLarge,
    /// After set-up, a body frame with no deliver or header before it.
    BodyBeforeHeader,
    /// After set-up, a delivery whose body is longer than its header announced.
    BodyOverrun,
    /// After set-up, bytes that are not frames.
    Garbage,
    /// After the client's protocol header, `connection.start` one byte every 3 s.
    Trickle,
}

pub struct FakeBroker {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// The scenario each connection played, in order, once its client went away or it
    /// reached the hostile part.
    pub played: Arc<Mutex<Vec<Scenario>>>,
    /// Connections that got through consume (the client is fully set up).
    pub consuming: Arc<Mutex<Vec<Scenario>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBroker {
    pub fn start(script: Vec<Scenario>) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let played = Arc::new(Mutex::new(Vec::new()));
        let consuming = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, played, consuming) = (stop.clone(), played.clone(), consuming.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let scenario = script.get(n).copied().unwrap_or(Scenario::Good);
                            n += 1;
                            let (stop, played, consuming) = (stop.clone(), played.clone(), consuming.clone());
                            conns.push(std::thread::spawn(move || {
                                serve(s, scenario, &stop, &consuming);
                                played.lock().expect("lock").push(scenario);
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        FakeBroker { port, stop, played, consuming, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn method_frame(channel: u16, id: (u16, u16), args: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut w = Writer::new();
    w.method(channel, id, args);
    w.buf
}

fn serve(mut s: TcpStream, scenario: Scenario, stop: &AtomicBool, consuming: &Mutex<Vec<Scenario>>) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut header_seen = false;
    let mut last_beat = Instant::now();
    let mut chunk = [0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if last_beat.elapsed() > Duration::from_secs(2) {
            let mut w = Writer::new();
            w.begin_frame(wire::FRAME_HEARTBEAT, 0).end_frame();
            if s.write_all(&w.buf).is_err() {
                return;
            }
            last_beat = Instant::now();
        }
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        if !header_seen {
            if buf.len() < 8 {
                continue;
            }
            buf.drain(..8);
            header_seen = true;
            let start = method_frame(0, method::CONNECTION_START, |w| {
                w.octet(0).octet(9).table(&[("product", Value::Str("fake"))]).longstr(b"PLAIN AMQPLAIN").longstr(b"en_US");
            });
            if scenario == Scenario::Trickle {
                for b in start {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(3) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                return;
            }
            if s.write_all(&start).is_err() {
                return;
            }
        }
        while let Ok(Some((f, n))) = wire::parse_frame(&buf, 1 << 22) {
            let (kind, payload) = (f.kind, f.payload.to_vec());
            buf.drain(..n);
            if kind != wire::FRAME_METHOD {
                continue; // content of publishes, heartbeats
            }
            let Ok((m, mut a)) = wire::method_of(&payload) else { return };
            let reply = match m {
                method::CONNECTION_START_OK => {
                    let frame_max = if scenario == Scenario::TinyFrameMax { 8 } else { 131_072 };
                    Some(method_frame(0, method::CONNECTION_TUNE, |w| {
                        w.short(2047).long(frame_max).short(0);
                    }))
                }
                method::CONNECTION_OPEN => Some(method_frame(0, method::CONNECTION_OPEN_OK, |w| {
                    w.shortstr(b"");
                })),
                method::CHANNEL_OPEN => Some(method_frame(1, method::CHANNEL_OPEN_OK, |w| {
                    w.longstr(b"");
                })),
                method::EXCHANGE_DECLARE => Some(method_frame(1, method::EXCHANGE_DECLARE_OK, |_| {})),
                method::QUEUE_DECLARE => {
                    let _ = a.short();
                    let name = a.shortstr().map(<[u8]>::to_vec).unwrap_or_default();
                    let name = if name.is_empty() { b"amq.gen-fake".to_vec() } else { name };
                    Some(method_frame(1, method::QUEUE_DECLARE_OK, |w| {
                        w.shortstr(&name).long(0).long(0);
                    }))
                }
                method::QUEUE_BIND => {
                    // reserved, queue, exchange, routing key, then the no-wait bit: as
                    // RabbitMQ does, a bind sent without waiting gets no answer.
                    let _ = a.short();
                    let _ = (a.shortstr(), a.shortstr(), a.shortstr());
                    let no_wait = a.octet().is_ok_and(|bits| bits & 1 == 1);
                    (!no_wait).then(|| method_frame(1, method::QUEUE_BIND_OK, |_| {}))
                }
                method::BASIC_QOS => Some(method_frame(1, method::BASIC_QOS_OK, |_| {})),
                method::BASIC_CONSUME => {
                    let mut out = method_frame(1, method::BASIC_CONSUME_OK, |w| {
                        w.shortstr(b"ctag");
                    });
                    consuming.lock().expect("lock").push(scenario);
                    out.extend(hostile(scenario));
                    Some(out)
                }
                method::CONNECTION_CLOSE => {
                    let _ = s.write_all(&method_frame(0, method::CONNECTION_CLOSE_OK, |_| {}));
                    return;
                }
                method::CHANNEL_CLOSE => Some(method_frame(1, method::CHANNEL_CLOSE_OK, |_| {})),
                _ => None, // acks, publishes, tune-ok, close-ok
            };
            if let Some(r) = reply {
                if s.write_all(&r).is_err() {
                    return;
                }
            }
        }
    }
}

/// What a scenario sends once the client is set up.
fn hostile(scenario: Scenario) -> Vec<u8> {
    let mut w = Writer::new();
    match scenario {
        Scenario::FrameTooLarge => {
            w.buf.extend_from_slice(&wire::frame_header(wire::FRAME_BODY, 1, 1_000_000));
            w.buf.extend_from_slice(&[0u8; 4096]);
        }
        Scenario::BodyBeforeHeader => {
            w.begin_frame(wire::FRAME_BODY, 1);
            w.buf.extend_from_slice(b"a body out of nowhere");
            w.end_frame();
        }
        Scenario::BodyOverrun => {
            w.method(1, method::BASIC_DELIVER, |w| {
                w.shortstr(b"ctag").longlong(1).bit(false).shortstr(b"").shortstr(b"k");
            });
            w.content_header(1, 3, &Properties::default());
            w.begin_frame(wire::FRAME_BODY, 1);
            w.buf.extend_from_slice(b"ten bytes!");
            w.end_frame();
        }
        Scenario::Garbage => {
            // A plausible frame header, then bytes that are not its end.
            w.buf.extend_from_slice(&wire::frame_header(wire::FRAME_METHOD, 1, 4));
            w.buf.extend_from_slice(b"\x00\x3c\x00\x50\xffnot AMQP at all\x00\xfe");
        }
        Scenario::Good | Scenario::TinyFrameMax | Scenario::Trickle => {}
    }
    w.buf
}
