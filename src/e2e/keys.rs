//! Static X25519 keys: an agent's private key (its key file, `agent keygen`) and peers'
//! public keys (the peers file's `key=` items), written as 64 lowercase hex digits.
//!
//! Pure apart from [`PrivateKey::generate`] (the operating system's randomness) and
//! [`read_private_key`] (one file read at start-up). Not on the hot path.

use std::fmt;
use std::path::Path;

/// Bytes of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;

/// A peer's static public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<PublicKey, String> {
        parse_hex(s).map(PublicKey)
    }
}

/// An agent's static private key. Never printed (its `Debug` says so).
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; KEY_LEN]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public())
    }
}

impl PrivateKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> PrivateKey {
        PrivateKey(bytes)
    }

    /// A new key from the operating system's randomness.
    pub fn generate() -> Result<PrivateKey, String> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| format!("no randomness from the operating system: {e}"))?;
        Ok(PrivateKey(k))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The public key that goes with it (X25519 of the base point, clamped as RFC 7748 says).
    pub fn public(&self) -> PublicKey {
        PublicKey(curve25519_dalek::MontgomeryPoint::mul_base_clamped(self.0).to_bytes())
    }

    /// The key file's text: the key in hex, one line.
    pub fn to_file_text(&self) -> String {
        let mut s = String::with_capacity(2 * KEY_LEN + 1);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s.push('\n');
        s
    }

    /// A key file's text: 64 hex digits, `#` comments and blank lines ignored.
    pub fn parse_file(text: &str) -> Result<PrivateKey, String> {
        let mut found = None;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if found.is_some() {
                return Err("more than one key in the file".into());
            }
            found = Some(parse_hex(line)?);
        }
        found.map(PrivateKey).ok_or_else(|| "the file holds no key (agent keygen > FILE writes one)".into())
    }
}

/// Reads the private key file at `path`; refuses one that others may read.
pub fn read_private_key(path: &Path) -> Result<PrivateKey, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!("{} may be read by others (mode {:o}): chmod 600 it", path.display(), meta.mode() & 0o777));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKey::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// 64 hex digits (either case) into 32 bytes.
pub fn parse_hex(s: &str) -> Result<[u8; KEY_LEN], String> {
    let s = s.trim();
    if s.len() != 2 * KEY_LEN {
        return Err(format!("a key is {} hex digits, not {}", 2 * KEY_LEN, s.len()));
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| format!("{:?} is not a hex digit", c as char));
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_text() {
        let k = PrivateKey::generate().unwrap();
        let back = PrivateKey::parse_file(&format!("# h1\n{}", k.to_file_text())).unwrap();
        assert_eq!(back, k);
        let p = k.public();
        assert_eq!(p.to_string().parse::<PublicKey>().unwrap(), p);
        assert_eq!(p.to_string().to_uppercase().parse::<PublicKey>().unwrap(), p);
        assert!(!format!("{k:?}").contains(&k.to_file_text().trim().to_string()), "Debug never prints the private key");
    }

    #[test]
    fn the_public_key_is_rfc7748s() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private = parse_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").unwrap();
        let public = PrivateKey::from_bytes(private).public();
        assert_eq!(public.to_string(), "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    }

    #[test]
    fn bad_key_text_is_refused_with_a_reason() {
        assert!(PrivateKey::parse_file("").unwrap_err().contains("no key"));
        assert!(PrivateKey::parse_file("abcd").unwrap_err().contains("64 hex digits"));
        assert!(PrivateKey::parse_file(&"zz".repeat(32)).unwrap_err().contains("not a hex digit"));
        let one = "11".repeat(32);
        assert!(PrivateKey::parse_file(&format!("{one}\n{one}\n")).unwrap_err().contains("more than one"));
        assert!("é".repeat(32).parse::<PublicKey>().is_err());
    }
}
