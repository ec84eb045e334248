//! Generating, parsing and hashing keys.

use core::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::base62::{encode_fixed, is_base62, ALPHABET};

/// Every key starts with this.
pub const PREFIX: &str = "metlo.";
/// Random base62 characters in a key body: 36 × log2(62) ≈ 214 bits (≥ 192 required).
pub const RANDOM_LEN: usize = 36;
/// Base62 characters of the CRC32 checksum (62^6 > 2^32).
pub const CHECKSUM_LEN: usize = 6;
/// Total length of a key, prefix included.
pub const KEY_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
/// Body characters shown in the public identifier (`metlo.` + these).
const IDENTIFIER_LEN: usize = 8;

/// Why a string is not a Metlo key. The messages never contain the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseKeyError {
    #[error("API key must start with \"metlo.\"")]
    WrongPrefix,
    #[error("API key must be {expected} characters long")]
    WrongLength { expected: usize },
    #[error("API key contains a character outside [0-9A-Za-z]")]
    InvalidCharacter,
    #[error("API key checksum does not match")]
    BadChecksum,
}

/// A full API key. It never prints itself: `Debug` and `Display` show only the public
/// identifier, so a key cannot end up in a log line by accident. The memory is zeroed
/// on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Makes a new key from the operating system's CSPRNG (or `crypto.getRandomValues`
    /// in a Worker).
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = Vec::with_capacity(KEY_LEN);
        key.extend_from_slice(PREFIX.as_bytes());
        let mut pool = [0u8; 64];
        while key.len() < PREFIX.len() + RANDOM_LEN {
            getrandom::fill(&mut pool)?;
            // Rejection sampling keeps every character uniform: 248 = 4 × 62.
            for &b in pool.iter().filter(|&&b| b < 248) {
                if key.len() == PREFIX.len() + RANDOM_LEN {
                    break;
                }
                key.push(ALPHABET[(b % 62) as usize]);
            }
        }
        pool.zeroize();
        let mut checksum = [0u8; CHECKSUM_LEN];
        encode_fixed(crc32fast::hash(&key[PREFIX.len()..]) as u64, &mut checksum);
        key.extend_from_slice(&checksum);
        // Only ASCII alphanumerics and the prefix were pushed.
        Ok(Self(String::from_utf8(key).expect("base62 is ASCII")))
    }

    /// Checks prefix, length, alphabet and checksum, in O(1) and without allocating
    /// on failure. Nothing that fails here can be a key we issued.
    pub fn parse(input: &str) -> Result<Self, ParseKeyError> {
        Ok(ApiKeyRef::parse(input)?.to_key())
    }

    /// The full key, for the one response that hands it out.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The public identifier, `metlo.` + the first 8 body characters (≈ 48 bits,
    /// leaving > 160 secret bits).
    pub fn identifier(&self) -> String {
        self.borrowed().identifier()
    }

    /// SHA-256 of the full key: what is stored and looked up.
    pub fn hash(&self) -> KeyHash {
        self.borrowed().hash()
    }

    /// Borrowed (checked when this key was made or parsed).
    pub fn borrowed(&self) -> ApiKeyRef<'_> {
        ApiKeyRef(&self.0)
    }
}

impl Drop for ApiKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…)", self.identifier())
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.identifier())
    }
}

/// A key checked in place (as [`ApiKey::parse`] checks it) and borrowed from where it
/// was presented: verification hashes it and is done, with no copy of the secret to
/// allocate and then wipe. Prints only its identifier, like [`ApiKey`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ApiKeyRef<'a>(&'a str);

impl<'a> ApiKeyRef<'a> {
    /// Checks prefix, length, alphabet and checksum, in O(1) and without allocating.
    pub fn parse(input: &'a str) -> Result<Self, ParseKeyError> {
        let bytes = input.as_bytes();
        if !bytes.starts_with(PREFIX.as_bytes()) {
            return Err(ParseKeyError::WrongPrefix);
        }
        if bytes.len() != KEY_LEN {
            return Err(ParseKeyError::WrongLength { expected: KEY_LEN });
        }
        let body = &bytes[PREFIX.len()..];
        if !body.iter().all(|&b| is_base62(b)) {
            return Err(ParseKeyError::InvalidCharacter);
        }
        let (random, checksum) = body.split_at(RANDOM_LEN);
        let mut expected = [0u8; CHECKSUM_LEN];
        encode_fixed(crc32fast::hash(random) as u64, &mut expected);
        // The checksum is derived from the secret part: compare in constant time so the
        // comparison's timing reveals nothing about it.
        if !bool::from(expected.ct_eq(checksum)) {
            return Err(ParseKeyError::BadChecksum);
        }
        Ok(Self(input))
    }

    /// SHA-256 of the full key: what is stored and looked up.
    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The public identifier (see [`ApiKey::identifier`]).
    pub fn identifier(&self) -> String {
        self.0[..PREFIX.len() + IDENTIFIER_LEN].to_owned()
    }

    /// The full key.
    pub fn expose_secret(&self) -> &'a str {
        self.0
    }

    /// An owned copy (zeroed when dropped).
    pub fn to_key(&self) -> ApiKey {
        ApiKey(self.0.to_owned())
    }
}

impl fmt::Debug for ApiKeyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyRef({}…)", self.identifier())
    }
}

/// The SHA-256 of a key. Not a secret (it cannot be reversed), safe to log and to put
/// in a URL.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key hash must be 64 lowercase hexadecimal characters")]
pub struct KeyHashError;

impl KeyHash {
    /// Parses the 64-character lowercase hex form (the only form we produce).
    pub fn from_hex(s: &str) -> Result<Self, KeyHashError> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(KeyHashError);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyHashError)?;
        Ok(Self(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The SHA-256 of any text, well-formed key or not: the hash a key with this text
    /// would have (a leak report's `token_hash` for every token it names).
    pub fn of_text(text: &str) -> Self {
        KeyHash(Sha256::digest(text.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.to_hex())
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_keys_round_trip() {
        for _ in 0..1000 {
            let key = ApiKey::generate().unwrap();
            assert_eq!(key.expose_secret().len(), KEY_LEN);
            let parsed = ApiKey::parse(key.expose_secret()).unwrap();
            assert_eq!(parsed, key);
            assert_eq!(parsed.hash(), key.hash());
            assert!(key.identifier().starts_with("metlo."));
            assert_eq!(key.identifier().len(), 14);
        }
    }

    #[test]
    fn generated_keys_differ() {
        let a = ApiKey::generate().unwrap();
        let b = ApiKey::generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let key = ApiKey::generate().unwrap();
        let original = key.expose_secret().as_bytes().to_vec();
        let mut tried = 0;
        for pos in PREFIX.len()..KEY_LEN {
            for &c in ALPHABET.iter() {
                if c == original[pos] {
                    continue;
                }
                let mut changed = original.clone();
                changed[pos] = c;
                let changed = String::from_utf8(changed).unwrap();
                assert_eq!(
                    ApiKey::parse(&changed),
                    Err(ParseKeyError::BadChecksum),
                    "position {pos}"
                );
                tried += 1;
            }
        }
        assert_eq!(tried, (RANDOM_LEN + CHECKSUM_LEN) * 61);
    }

    #[test]
    fn typed_errors() {
        let key = ApiKey::generate().unwrap();
        let s = key.expose_secret();
        assert_eq!(ApiKey::parse(""), Err(ParseKeyError::WrongPrefix));
        assert_eq!(
            ApiKey::parse(&s.replacen("metlo.", "metl0.", 1)),
            Err(ParseKeyError::WrongPrefix)
        );
        assert_eq!(
            ApiKey::parse(&s[..KEY_LEN - 1]),
            Err(ParseKeyError::WrongLength { expected: KEY_LEN })
        );
        assert_eq!(
            ApiKey::parse(&format!("{s}a")),
            Err(ParseKeyError::WrongLength { expected: KEY_LEN })
        );
        let mut bad = s.to_owned();
        bad.replace_range(10..11, "-");
        assert_eq!(ApiKey::parse(&bad), Err(ParseKeyError::InvalidCharacter));
        // A multi-byte character of the right byte length must not panic on slicing.
        let mut uni = s[..KEY_LEN - 2].to_owned();
        uni.push('é');
        assert_eq!(ApiKey::parse(&uni), Err(ParseKeyError::InvalidCharacter));
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let key = ApiKey::generate().unwrap();
        let secret = key.expose_secret();
        for shown in [format!("{key:?}"), format!("{key}")] {
            assert!(!shown.contains(&secret[PREFIX.len() + 8..]), "{shown}");
            assert!(shown.contains(&key.identifier()));
        }
    }

    #[test]
    fn hash_is_sha256_hex_of_the_full_key() {
        let key = ApiKey::generate().unwrap();
        let expected = hex::encode(Sha256::digest(key.expose_secret().as_bytes()));
        assert_eq!(key.hash().to_hex(), expected);
        assert_eq!(KeyHash::from_hex(&expected).unwrap(), key.hash());
        assert_eq!(KeyHash::of_text(key.expose_secret()), key.hash());
        assert!(KeyHash::from_hex(&expected.to_uppercase()).is_err());
        assert!(KeyHash::from_hex(&expected[1..]).is_err());
        assert!(KeyHash::from_hex("zz").is_err());
    }

    #[test]
    fn scanner_regex_finds_keys_in_text() {
        let re = regex::Regex::new(crate::SCANNER_REGEX).unwrap();
        let key = ApiKey::generate().unwrap();
        let text = format!("export METLO_KEY={}\n", key.expose_secret());
        let found = re.find(&text).expect("regex must match a generated key");
        assert_eq!(found.as_str(), key.expose_secret());
        assert!(!re.is_match(&format!("metlo.{}", &key.expose_secret()[7..])));
        assert!(!re.is_match(&format!("{}x", key.expose_secret())));
    }

    proptest! {
        #[test]
        fn random_strings_never_panic(s in ".{0,80}") {
            let _ = ApiKey::parse(&s);
            let _ = KeyHash::from_hex(&s);
        }

        #[test]
        fn random_key_shaped_strings_are_refused(body in "[0-9A-Za-z]{42}") {
            // A random body passes the CRC32 with probability 2^-32; treat a pass as valid.
            let s = format!("metlo.{body}");
            match ApiKey::parse(&s) {
                Ok(k) => prop_assert_eq!(k.expose_secret(), s.as_str()),
                Err(e) => prop_assert_eq!(e, ParseKeyError::BadChecksum),
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = ApiKey::parse(&s);
            let _ = crate::parse_authorization(Some(&s));
        }
    }
}
