//! Base62 with the alphabet `0-9A-Za-z`.

pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub(crate) fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Encodes `value` as exactly `width` base62 digits, most significant first, zero-padded.
/// `width` must be large enough for `value` (62^6 > 2^32, so 6 fits any u32).
pub(crate) fn encode_fixed(mut value: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    debug_assert_eq!(value, 0, "base62 width too small");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_fixed_width() {
        let mut out = [0u8; 6];
        encode_fixed(0, &mut out);
        assert_eq!(&out, b"000000");
        encode_fixed(61, &mut out);
        assert_eq!(&out, b"00000z");
        encode_fixed(62, &mut out);
        assert_eq!(&out, b"000010");
        encode_fixed(u32::MAX as u64, &mut out);
        assert_eq!(&out, b"4gfFC3");
    }
}
