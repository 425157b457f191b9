//! Parsing one token count: a whole non-negative number, written as an integer (`177`) or as a float with a zero
//! fraction (`177.0`, as the SmartMoE artifact writes them; `1.77e2` is accepted too).

/// The largest count accepted: 2^53, above which counts stop being exact as `f64` (and are not plausible).
pub(crate) const MAX_COUNT: u64 = 1 << 53;

/// The largest rank index accepted (65,535): more source ranks than that is not a plausible trace, and the
/// limit keeps a corrupt rank field from allocating absurd matrices.
pub(crate) const MAX_RANK: u64 = (1 << 16) - 1;

/// Parses `token` (already trimmed) as a count; the error says why it is not one.
pub(crate) fn parse_count(token: &[u8]) -> Result<u64, &'static str> {
    if token.is_empty() {
        return Err("empty");
    }
    let mut value: u64 = 0;
    let mut i = 0;
    while i < token.len() && token[i].is_ascii_digit() {
        value = match value.checked_mul(10).and_then(|v| v.checked_add(u64::from(token[i] - b'0'))) {
            Some(v) => v,
            None => return Err("too large"),
        };
        i += 1;
    }
    if i > 0 && i == token.len() {
        return if value <= MAX_COUNT { Ok(value) } else { Err("too large") };
    }
    if i > 0 && token[i] == b'.' && token[i + 1..].iter().all(|b| b.is_ascii_digit()) {
        if token[i + 1..].iter().all(|&b| b == b'0') {
            return if value <= MAX_COUNT { Ok(value) } else { Err("too large") };
        }
        return Err("not a whole number");
    }
    parse_slow(token)
}

/// The general case: anything Rust's float parser reads (exponents), then checked to be a count.
fn parse_slow(token: &[u8]) -> Result<u64, &'static str> {
    let Ok(text) = std::str::from_utf8(token) else {
        return Err("not a number");
    };
    // Rust's parser accepts `inf`/`nan`/`infinity`; only digits, signs, a point and an exponent are numbers here.
    if !text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E')) {
        return Err("not a number");
    }
    let Ok(x) = text.parse::<f64>() else {
        return Err("not a number");
    };
    if !x.is_finite() {
        return Err("too large");
    }
    if x < 0.0 {
        return Err("negative");
    }
    if x.fract() != 0.0 {
        return Err("not a whole number");
    }
    if x > MAX_COUNT as f64 {
        return Err("too large");
    }
    Ok(x as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_integers_and_whole_floats() {
        assert_eq!(parse_count(b"0"), Ok(0));
        assert_eq!(parse_count(b"177"), Ok(177));
        assert_eq!(parse_count(b"177.0"), Ok(177));
        assert_eq!(parse_count(b"177."), Ok(177));
        assert_eq!(parse_count(b"1.77e2"), Ok(177));
        assert_eq!(parse_count(b"-0"), Ok(0));
    }

    #[test]
    fn rejects_the_rest() {
        assert_eq!(parse_count(b""), Err("empty"));
        assert_eq!(parse_count(b"1.5"), Err("not a whole number"));
        assert_eq!(parse_count(b"-3"), Err("negative"));
        assert_eq!(parse_count(b"-3.0"), Err("negative"));
        assert_eq!(parse_count(b"abc"), Err("not a number"));
        assert_eq!(parse_count(b"nan"), Err("not a number"));
        assert_eq!(parse_count(b"inf"), Err("not a number"));
        assert_eq!(parse_count(b"12x"), Err("not a number"));
        assert_eq!(parse_count(b"99999999999999999999999"), Err("too large"));
        assert_eq!(parse_count(b"1e300"), Err("too large"));
        assert_eq!(parse_count(b"."), Err("not a number"));
    }
}
