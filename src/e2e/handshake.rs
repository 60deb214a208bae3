//! The handshake between two agents: Noise IK (`Noise_IK_25519_ChaChaPoly_BLAKE2s`, the
//! pattern and primitives WireGuard uses) carried out by `snow`, in two messages over the
//! bus, and the payloads and envelope that go with it. Pure: no clock (timestamps come in
//! as arguments), no I/O; control plane (a few messages per peer per two minutes).
//!
//! ```text
//! envelope: 0 2 magic "TH"   2 1 version 1   3 1 type (1 initiation, 2 response)
//!           4 4 sender's index (big-endian)   8 4 receiver's index (0 in an initiation)
//!           12 … the Noise message
//! payload (encrypted inside the Noise message, both ways):
//!           0 8 the sender's wall clock, ns (big-endian): an initiation older than the
//!               last accepted one from that peer is a replay
//!           8 4 the sender's group key id   12 32 its group key (its floods)
//! ```
//!
//! IK because the initiator knows the responder's static key beforehand (the peers file):
//! one round trip, the initiator's identity hidden from the broker, the first message
//! already authenticated to the responder. After the second message both sides hold two
//! keys ([`SessionKeys`]), one per direction, and the batches are sealed with them beneath
//! our own framing (`e2e::seal`): Noise's transport messages stop at 64 KiB, our batches
//! do not.

use super::keys::{PrivateKey, PublicKey, KEY_LEN};

/// The Noise protocol name.
pub const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
pub const MAGIC: [u8; 2] = *b"TH";
pub const VERSION: u8 = 1;
pub const ENVELOPE_LEN: usize = 12;
pub const PAYLOAD_LEN: usize = 8 + 4 + KEY_LEN;
/// Longest handshake message we read (an initiation is 12 + 140 bytes).
pub const MAX_MESSAGE: usize = 512;

/// The two message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Initiation = 1,
    Response = 2,
}

/// Why a handshake message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a handshake message (too short, too long, magic or version)")]
    Malformed,
    #[error("the Noise message does not check out (forged, or for another key)")]
    Forged,
    #[error("the payload is not a handshake payload")]
    BadPayload,
}

/// What each side tells the other inside the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The sender's wall clock, ns since the UNIX epoch.
    pub timestamp_ns: u64,
    /// The sender's group key (its floods are sealed with it) and its id.
    pub group_id: u32,
    pub group_key: [u8; KEY_LEN],
}

impl Payload {
    fn to_bytes(self) -> [u8; PAYLOAD_LEN] {
        let mut p = [0u8; PAYLOAD_LEN];
        p[0..8].copy_from_slice(&self.timestamp_ns.to_be_bytes());
        p[8..12].copy_from_slice(&self.group_id.to_be_bytes());
        p[12..].copy_from_slice(&self.group_key);
        p
    }

    fn parse(b: &[u8]) -> Result<Payload, Error> {
        if b.len() != PAYLOAD_LEN {
            return Err(Error::BadPayload);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&b[12..]);
        Ok(Payload { timestamp_ns: u64::from_be_bytes(ts), group_id: u32::from_be_bytes([b[8], b[9], b[10], b[11]]), group_key: key })
    }
}

/// A session's two keys, one per direction.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    pub send: [u8; KEY_LEN],
    pub recv: [u8; KEY_LEN],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(…)")
    }
}

/// The envelope of a handshake message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub kind: Type,
    pub sender: u32,
    pub receiver: u32,
}

/// Reads the envelope of `body`; the Noise message follows it.
pub fn envelope(body: &[u8]) -> Result<Envelope, Error> {
    if body.len() < ENVELOPE_LEN || body.len() > MAX_MESSAGE || body[0..2] != MAGIC || body[2] != VERSION {
        return Err(Error::Malformed);
    }
    let kind = match body[3] {
        1 => Type::Initiation,
        2 => Type::Response,
        _ => return Err(Error::Malformed),
    };
    let sender = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
    let receiver = u32::from_be_bytes([body[8], body[9], body[10], body[11]]);
    Ok(Envelope { kind, sender, receiver })
}

fn envelope_bytes(e: Envelope) -> [u8; ENVELOPE_LEN] {
    let mut b = [0u8; ENVELOPE_LEN];
    b[0..2].copy_from_slice(&MAGIC);
    b[2] = VERSION;
    b[3] = e.kind as u8;
    b[4..8].copy_from_slice(&e.sender.to_be_bytes());
    b[8..12].copy_from_slice(&e.receiver.to_be_bytes());
    b
}

fn params() -> snow::params::NoiseParams {
    // invariant: a constant pattern name that snow knows (a unit test builds it)
    PATTERN.parse().expect("a valid Noise pattern")
}

/// An initiation sent, waiting for its response.
pub struct Initiation {
    state: snow::HandshakeState,
    /// Our index for the session it will make.
    pub index: u32,
}

/// Starts a handshake with the holder of `remote`: the initiation message to send, and
/// the state its response completes. `prologue` binds the session (both sides use the same).
pub fn initiate(local: &PrivateKey, remote: &PublicKey, prologue: &[u8], index: u32, payload: Payload) -> Result<(Initiation, Vec<u8>), Error> {
    let mut state = snow::Builder::new(params())
        .local_private_key(local.as_bytes())
        .and_then(|b| b.remote_public_key(&remote.0))
        .and_then(|b| b.prologue(prologue))
        .and_then(|b| b.build_initiator())
        .map_err(|_| Error::Forged)?;
    let mut msg = vec![0u8; MAX_MESSAGE];
    msg[..ENVELOPE_LEN].copy_from_slice(&envelope_bytes(Envelope { kind: Type::Initiation, sender: index, receiver: 0 }));
    let n = state.write_message(&payload.to_bytes(), &mut msg[ENVELOPE_LEN..]).map_err(|_| Error::Forged)?;
    msg.truncate(ENVELOPE_LEN + n);
    Ok((Initiation { state, index }, msg))
}

/// What a responder learns from an initiation and answers.
pub struct Responded {
    /// The initiator's static key (the caller checks it is the one it expects).
    pub remote: PublicKey,
    /// The initiator's index for the session.
    pub their_index: u32,
    pub payload: Payload,
    pub keys: SessionKeys,
    /// The response to send.
    pub message: Vec<u8>,
}

/// Answers the initiation `body` with our `index` and `payload`.
pub fn respond(local: &PrivateKey, prologue: &[u8], body: &[u8], index: u32, payload: Payload) -> Result<Responded, Error> {
    let env = envelope(body)?;
    if env.kind != Type::Initiation {
        return Err(Error::Malformed);
    }
    let mut state = snow::Builder::new(params())
        .local_private_key(local.as_bytes())
        .and_then(|b| b.prologue(prologue))
        .and_then(|b| b.build_responder())
        .map_err(|_| Error::Forged)?;
    let mut buf = [0u8; MAX_MESSAGE];
    let n = state.read_message(&body[ENVELOPE_LEN..], &mut buf).map_err(|_| Error::Forged)?;
    let their = Payload::parse(&buf[..n])?;
    let remote = state.get_remote_static().and_then(|s| <[u8; KEY_LEN]>::try_from(s).ok()).map(PublicKey).ok_or(Error::Forged)?;
    let mut msg = vec![0u8; MAX_MESSAGE];
    msg[..ENVELOPE_LEN].copy_from_slice(&envelope_bytes(Envelope { kind: Type::Response, sender: index, receiver: env.sender }));
    let n = state.write_message(&payload.to_bytes(), &mut msg[ENVELOPE_LEN..]).map_err(|_| Error::Forged)?;
    msg.truncate(ENVELOPE_LEN + n);
    if !state.is_handshake_finished() {
        return Err(Error::Forged);
    }
    let (i_to_r, r_to_i) = state.dangerously_get_raw_split();
    Ok(Responded { remote, their_index: env.sender, payload: their, keys: SessionKeys { send: r_to_i, recv: i_to_r }, message: msg })
}

/// Completes `init` with the response `body`: the responder's index, its payload, the keys.
pub fn finish(mut init: Initiation, body: &[u8]) -> Result<(u32, Payload, SessionKeys), Error> {
    let env = envelope(body)?;
    if env.kind != Type::Response || env.receiver != init.index {
        return Err(Error::Malformed);
    }
    let mut buf = [0u8; MAX_MESSAGE];
    let n = init.state.read_message(&body[ENVELOPE_LEN..], &mut buf).map_err(|_| Error::Forged)?;
    let their = Payload::parse(&buf[..n])?;
    if !init.state.is_handshake_finished() {
        return Err(Error::Forged);
    }
    let (i_to_r, r_to_i) = init.state.dangerously_get_raw_split();
    Ok((env.sender, their, SessionKeys { send: i_to_r, recv: r_to_i }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(ts: u64, id: u32) -> Payload {
        Payload { timestamp_ns: ts, group_id: id, group_key: [id as u8; KEY_LEN] }
    }

    fn pair() -> (PrivateKey, PrivateKey) {
        (PrivateKey::generate().unwrap(), PrivateKey::generate().unwrap())
    }

    #[test]
    fn both_sides_end_with_mirrored_keys_and_each_others_payload() {
        let (a, b) = pair();
        let (init, m1) = initiate(&a, &b.public(), b"p", 11, payload(5, 1)).unwrap();
        assert_eq!(m1.len(), ENVELOPE_LEN + 32 + 48 + PAYLOAD_LEN + 16);
        let r = respond(&b, b"p", &m1, 22, payload(6, 2)).unwrap();
        assert_eq!(r.remote, a.public(), "the responder learns who initiated");
        assert_eq!((r.their_index, r.payload), (11, payload(5, 1)));
        let (their, p, keys) = finish(init, &r.message).unwrap();
        assert_eq!((their, p), (22, payload(6, 2)));
        assert_eq!(keys.send, r.keys.recv);
        assert_eq!(keys.recv, r.keys.send);
        assert_ne!(keys.send, keys.recv);
        assert!(!m1.windows(KEY_LEN).any(|w| w == [1u8; KEY_LEN]), "the group key is not readable in the initiation");
    }

    #[test]
    fn an_initiation_for_another_key_or_session_is_refused() {
        let (a, b) = pair();
        let c = PrivateKey::generate().unwrap();
        let (_, m1) = initiate(&a, &b.public(), b"p", 1, payload(5, 1)).unwrap();
        assert_eq!(respond(&c, b"p", &m1, 2, payload(6, 2)).err(), Some(Error::Forged), "not the responder's key");
        assert_eq!(respond(&b, b"other session", &m1, 2, payload(6, 2)).err(), Some(Error::Forged), "another prologue");
    }

    #[test]
    fn altered_truncated_or_misrouted_messages_are_refused() {
        let (a, b) = pair();
        let (init, m1) = initiate(&a, &b.public(), b"p", 1, payload(5, 1)).unwrap();
        for i in ENVELOPE_LEN..m1.len() {
            let mut bad = m1.clone();
            bad[i] ^= 0x80;
            assert!(respond(&b, b"p", &bad, 2, payload(6, 2)).is_err(), "byte {i}");
        }
        for n in 0..m1.len() {
            assert!(respond(&b, b"p", &m1[..n], 2, payload(6, 2)).is_err(), "truncated to {n}");
        }
        let r = respond(&b, b"p", &m1, 2, payload(6, 2)).unwrap();
        assert_eq!(respond(&b, b"p", &r.message, 3, payload(6, 2)).err(), Some(Error::Malformed), "a response is no initiation");
        let mut wrong = r.message.clone();
        wrong[8..12].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(finish(init, &wrong).err(), Some(Error::Malformed), "a response to another initiation");
    }

    #[test]
    fn a_response_from_someone_else_does_not_finish() {
        let (a, b) = pair();
        let (init, _) = initiate(&a, &b.public(), b"p", 1, payload(5, 1)).unwrap();
        // A third party answers an initiation of its own making, to our index.
        let c = PrivateKey::generate().unwrap();
        let (_, m_c) = initiate(&c, &b.public(), b"p", 1, payload(5, 1)).unwrap();
        let r = respond(&b, b"p", &m_c, 2, payload(6, 2)).unwrap();
        assert_eq!(finish(init, &r.message).err(), Some(Error::Forged));
    }

    #[test]
    fn envelopes_are_checked() {
        assert_eq!(envelope(b"TH\x01"), Err(Error::Malformed));
        assert_eq!(envelope(&[b'T', b'H', 1, 3, 0, 0, 0, 0, 0, 0, 0, 0]), Err(Error::Malformed));
        assert_eq!(envelope(&[b'T', b'H', 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]), Err(Error::Malformed));
        assert_eq!(envelope(&vec![0u8; MAX_MESSAGE + 1]), Err(Error::Malformed));
        assert_eq!(envelope(&[b'T', b'H', 1, 1, 0, 0, 0, 7, 0, 0, 0, 0]), Ok(Envelope { kind: Type::Initiation, sender: 7, receiver: 0 }));
    }
}
