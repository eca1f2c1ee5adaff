//! API key material: generation, hashing, constant-time comparison.
//!
//! Secrets are random (30 bytes from the OS generator), so a single SHA-256 is the right hash:
//! a slow password hash protects guessable secrets and would cost milliseconds per request.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A SHA-256 digest of a secret.
pub type SecretHash = [u8; 32];

/// A new access key: 20 upper-case characters, the original's look.
pub fn new_access_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    // 256 is not a multiple of 36; the bias of `% 36` is under 1% per character, and the
    // access key is an identifier, not the secret.
    bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// A new secret key: 30 random bytes, 40 characters of URL-safe base64.
pub fn new_secret_key() -> String {
    let mut bytes = [0u8; 30];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The digest of a secret.
pub fn hash(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// The digest as stored: lower-case hex.
pub fn hash_hex(secret: &str) -> String {
    to_hex(&hash(secret))
}

/// Whether a secret matches a stored digest, in constant time.
pub fn verify(secret: &str, stored: &SecretHash) -> bool {
    hash(secret).ct_eq(stored).into()
}

/// Parses a stored hex digest.
pub fn parse_hex(text: &str) -> Option<SecretHash> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (idx, chunk) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[idx] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_verify_against_their_hash_only() {
        let secret = new_secret_key();
        assert_eq!(secret.len(), 40);
        let stored = parse_hex(&hash_hex(&secret)).unwrap();
        assert!(verify(&secret, &stored));
        assert!(!verify("wrong", &stored));
        assert_ne!(new_access_key(), new_access_key());
        assert_eq!(new_access_key().len(), 20);
        assert!(parse_hex("zz").is_none());
    }
}
