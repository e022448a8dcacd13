//! Parsing of command-line (keyval) scalars, as QEMU's keyval input visitor
//! does it: `qemu_strtoi64()`/`qemu_strtou64()` with base 0, `qemu_strtosz()`
//! for `size`, `qapi_bool_parse()`, `qemu_strtod_finite()`.

fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Result of C's `strtoull`/`strtoll` digit scan: magnitude (saturated),
/// overflow flag, negative sign, and bytes consumed (0 = no conversion).
struct Scan {
    magnitude: u64,
    overflow: bool,
    negative: bool,
    end: usize,
}

/// The digit scan shared by `strtoll` and `strtoull` (glibc semantics).
fn scan(s: &[u8], base: u32) -> Scan {
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let mut negative = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        negative = s[i] == b'-';
        i += 1;
    }
    let mut base = base;
    let digit = |b: u8| -> Option<u32> { (b as char).to_digit(36) };
    if (base == 0 || base == 16)
        && i + 1 < s.len()
        && s[i] == b'0'
        && (s[i + 1] | 0x20) == b'x'
        && s.get(i + 2).and_then(|&b| digit(b)).is_some_and(|d| d < 16)
    {
        i += 2;
        base = 16;
    } else if base == 0 {
        base = if i < s.len() && s[i] == b'0' { 8 } else { 10 };
    }
    let start = i;
    let mut magnitude: u64 = 0;
    let mut overflow = false;
    while i < s.len() {
        let Some(d) = digit(s[i]).filter(|&d| d < base) else {
            break;
        };
        match magnitude
            .checked_mul(base as u64)
            .and_then(|m| m.checked_add(d as u64))
        {
            Some(m) => magnitude = m,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return Scan {
            magnitude: 0,
            overflow: false,
            negative: false,
            end: 0,
        };
    }
    Scan {
        magnitude,
        overflow,
        negative,
        end: i,
    }
}

/// `qemu_strtoi64(s, NULL, 0, &v)`: the whole string must be a number.
pub fn strtoi64(s: &str) -> Option<i64> {
    let sc = scan(s.as_bytes(), 0);
    if sc.end == 0 || sc.end != s.len() || sc.overflow {
        return None;
    }
    if sc.negative {
        if sc.magnitude > i64::MAX as u64 + 1 {
            return None;
        }
        Some((sc.magnitude as i64).wrapping_neg())
    } else {
        i64::try_from(sc.magnitude).ok()
    }
}

/// `qemu_strtou64(s, NULL, 0, &v)`: negative numbers wrap around, as with
/// `strtoull`.
pub fn strtou64(s: &str) -> Option<u64> {
    strtou64_base(s, 0)
}

fn strtou64_base(s: &str, base: u32) -> Option<u64> {
    let sc = scan(s.as_bytes(), base);
    if sc.end == 0 || sc.end != s.len() || sc.overflow {
        return None;
    }
    Some(if sc.negative {
        sc.magnitude.wrapping_neg()
    } else {
        sc.magnitude
    })
}

fn suffix_mul(c: Option<u8>) -> Option<u64> {
    const UNIT: u64 = 1024;
    Some(match c?.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => UNIT,
        b'M' => UNIT.pow(2),
        b'G' => UNIT.pow(3),
        b'T' => UNIT.pow(4),
        b'P' => UNIT.pow(5),
        b'E' => UNIT.pow(6),
        _ => return None,
    })
}

/// `qemu_strtosz(s, NULL, &v)`: a byte count with an optional binary suffix
/// (`B`, `k`, `M`, `G`, `T`, `P`, `E`, case-insensitive), hexadecimal (`0x..`,
/// no suffix), or a decimal fraction with a suffix (`1.5G`).
pub fn strtosz(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let at = |i: usize| b.get(i).copied();
    // parse_uint(nptr, &endptr, 10, &val)
    let sc = scan(b, 10);
    if sc.overflow {
        return None;
    }
    let mut endptr = sc.end;
    let parse_ok = sc.end != 0;
    if parse_ok && sc.negative {
        return None; // -ERANGE
    }
    let mut val = if parse_ok { sc.magnitude } else { 0 };
    let mut valf: u64 = 0;
    if parse_ok && val == 0 && matches!(at(endptr), Some(b'x') | Some(b'X')) {
        // Looks like hex: reparse; no fraction, no suffix.
        let hs = scan(b, 16);
        if hs.end == 0 || hs.overflow || hs.negative {
            return None;
        }
        val = hs.magnitude;
        endptr = hs.end;
        if at(endptr) == Some(b'.') || suffix_mul(at(endptr)).is_some() {
            return None;
        }
    } else if at(endptr) == Some(b'.') || (!parse_ok && s.contains('.')) {
        // A fraction. strtod() from the '.' (or from the start).
        let f = endptr;
        match strtod_prefix(&b[f..]) {
            None => endptr += 1,
            Some((fraction, len)) => {
                let tail = &b[f..f + len];
                if tail.iter().any(|&c| c == b'e' || c == b'E') || !(0.0..1.0).contains(&fraction) {
                    return None;
                }
                valf = (fraction * 18446744073709551616.0) as u64;
                endptr = f + len;
            }
        }
    } else if !parse_ok {
        return None;
    }
    let mul = match suffix_mul(at(endptr)) {
        Some(m) => {
            endptr += 1;
            m
        }
        None => 1,
    };
    if mul == 1 {
        if valf != 0 {
            return None;
        }
    } else {
        let whole = val as u128 * mul as u128;
        let frac = valf as u128 * mul as u128;
        let total = whole + (frac >> 64) + ((frac as u64) >> 63) as u128;
        if total > u64::MAX as u128 {
            return None;
        }
        val = total as u64;
    }
    if endptr != b.len() {
        return None;
    }
    Some(val)
}

/// `strtod()` on a prefix: the value and the bytes consumed, or `None` when
/// nothing converts or the result is not finite. Decimal forms only (enough
/// for what follows a '.').
fn strtod_prefix(b: &[u8]) -> Option<(f64, usize)> {
    let mut i = 0;
    while i < b.len() && is_c_space(b[i]) {
        i += 1;
    }
    let start = i;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let mut digits = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
        digits += 1;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
            digits += 1;
        }
    }
    if digits == 0 {
        return None;
    }
    if i < b.len() && (b[i] | 0x20) == b'e' {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            i = j;
        }
    }
    let text = std::str::from_utf8(&b[start..i]).ok()?;
    let v: f64 = text.parse().ok()?;
    v.is_finite().then_some((v, i))
}

/// `qemu_strtod_finite(s, NULL, &v)`.
pub fn strtod_finite(s: &str) -> Option<f64> {
    let trimmed = s.trim_start_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
    let lower = trimmed.to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if body.starts_with("inf") || body.starts_with("nan") {
        return None;
    }
    let v: f64 = trimmed.parse().ok()?;
    v.is_finite().then_some(v)
}

/// `qapi_bool_parse()`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers() {
        assert_eq!(strtoi64("10"), Some(10));
        assert_eq!(strtoi64(" 5"), Some(5));
        assert_eq!(strtoi64("0x10"), Some(16));
        assert_eq!(strtoi64("010"), Some(8));
        assert_eq!(strtoi64("-1"), Some(-1));
        assert_eq!(strtoi64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(strtoi64("9223372036854775808"), None);
        assert_eq!(strtoi64("1M"), None);
        assert_eq!(strtoi64("1e3"), None);
        assert_eq!(strtoi64(""), None);
        assert_eq!(strtoi64("0x"), None);
        assert_eq!(strtoi64("08"), None);
        assert_eq!(strtoi64("5 "), None);
        assert_eq!(strtou64("-1"), Some(u64::MAX));
        assert_eq!(strtou64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(strtou64("18446744073709551616"), None);
        assert_eq!(strtou64("99999999999999999999"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(strtosz("4k"), Some(4096));
        assert_eq!(strtosz("4K"), Some(4096));
        assert_eq!(strtosz("1M"), Some(1 << 20));
        assert_eq!(strtosz("2G"), Some(2 << 30));
        assert_eq!(strtosz("1T"), Some(1 << 40));
        assert_eq!(strtosz("512"), Some(512));
        assert_eq!(strtosz("512B"), Some(512));
        assert_eq!(strtosz("0x200"), Some(512));
        assert_eq!(strtosz("1.5k"), Some(1536));
        assert_eq!(strtosz("1.k"), Some(1024));
        assert_eq!(strtosz("1.5"), None);
        assert_eq!(strtosz("-1"), None);
        assert_eq!(strtosz("1x"), None);
        assert_eq!(strtosz("0x1k"), None);
        assert_eq!(strtosz("1.5e3k"), None);
        assert_eq!(strtosz("16E"), None);
        assert_eq!(strtosz("15E"), Some(15 << 60));
        assert_eq!(strtosz(""), None);
        assert_eq!(strtosz("k"), None);
    }

    #[test]
    fn bools() {
        for s in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(s), Some(true));
        }
        for s in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(s), Some(false));
        }
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(parse_bool(""), None);
    }
}
