//! JSON output exactly as QEMU's `qobject_to_json()` writes it.
//!
//! Three things make QEMU's output recognisable, and all three are reproduced
//! here so that blkd's replies are byte-for-byte comparable with QSD's:
//!
//! * **Key order.** A QDict is a hash table of 512 buckets; iteration goes
//!   bucket by bucket, and inside one bucket the most recently inserted key
//!   comes first. This is why QSD writes `{"return": ..., "id": ...}` but
//!   `{"id": ..., "error": ...}`, and `{"micro", "minor", "major"}`. Objects
//!   are written in that order, using the map's own order as the insertion
//!   order (callers should insert members in schema order, as QEMU's output
//!   visitor does; it only matters for keys that share a bucket).
//! * **Strings.** Everything outside printable ASCII is escaped as `\uXXXX`
//!   (upper-case hex, surrogate pairs above the BMP); code points QEMU deems
//!   invalid (noncharacters) become `\uFFFD`.
//! * **Numbers.** Integers verbatim, floating point as C's `%.17g`.
//!
//! The pretty form (`--monitor ...,pretty=on`) indents by four spaces.

use serde_json::{Map, Value};

const QDICT_BUCKET_MAX: u32 = 512;

/// QEMU's `tdb_hash()` reduced to a bucket index.
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add((b as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKET_MAX
}

/// The order in which QEMU iterates a QDict whose keys were inserted in the
/// map's order (`qdict_first()`/`qdict_next()`).
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(u32, usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (qdict_bucket(k), i, k, v))
        .collect();
    // Bucket ascending; within a bucket, latest insertion first.
    entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

/// Keys of `map` in QDict iteration order.
pub fn qdict_keys(map: &Map<String, Value>) -> Vec<&String> {
    qdict_order(map).into_iter().map(|(k, _)| k).collect()
}

/// Serializes `value` as QEMU does, without a line terminator.
pub fn to_json(value: &Value, pretty: bool) -> String {
    let mut out = String::new();
    write_value(&mut out, value, pretty, 0);
    out
}

/// One wire message: the JSON text followed by `\r\n`. QEMU's monitor turns
/// every `\n` into `\r\n`, which matters for the pretty form.
pub fn to_wire(value: &Value, pretty: bool) -> Vec<u8> {
    let mut s = to_json(value, pretty);
    if pretty {
        s = s.replace('\n', "\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn newline(out: &mut String, pretty: bool, indent: usize) {
    if pretty {
        out.push('\n');
        for _ in 0..indent {
            out.push_str("    ");
        }
    }
}

fn write_value(out: &mut String, value: &Value, pretty: bool, indent: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&format_g17(n.as_f64().unwrap_or(0.0)));
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            let sep = if pretty { "," } else { ", " };
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, pretty, indent + 1);
                write_value(out, item, pretty, indent + 1);
            }
            newline(out, pretty, indent);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            let sep = if pretty { "," } else { ", " };
            for (i, (k, v)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, pretty, indent + 1);
                write_str(out, k);
                out.push_str(": ");
                write_value(out, v, pretty, indent + 1);
            }
            newline(out, pretty, indent);
            out.push('}');
        }
    }
}

/// QEMU's `is_valid_codepoint()`: no surrogates, no noncharacters.
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    if cp > 0x10FFFF {
        return false;
    }
    if (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE {
        return false;
    }
    !(0xD800..=0xDFFF).contains(&cp)
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ => {
                let mut cp = c as u32;
                if cp != 0 && !is_valid_codepoint(cp) {
                    cp = 0xFFFD;
                }
                if cp > 0xFFFF {
                    let v = cp - 0x10000;
                    out.push_str(&format!(
                        "\\u{:04X}\\u{:04X}",
                        0xD800 + (v >> 10),
                        0xDC00 + (v & 0x3FF)
                    ));
                } else if !(0x20..0x7F).contains(&cp) {
                    out.push_str(&format!("\\u{:04X}", cp));
                } else {
                    out.push(c);
                }
            }
        }
    }
    out.push('"');
}

/// C's `printf("%.17g", x)`.
pub fn format_g17(x: f64) -> String {
    const P: i32 = 17;
    if x.is_nan() {
        return if x.is_sign_negative() {
            "-nan".into()
        } else {
            "nan".into()
        };
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf".into() } else { "inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    // Round to P significant digits first; the exponent of the rounded value
    // decides between fixed and exponential notation.
    let e_form = format!("{:.*e}", (P - 1) as usize, x);
    // `{:e}` of a finite float always has an exponent; fall back to Rust's
    // own form rather than panic if it ever did not.
    let Some((mantissa, exp)) = e_form.split_once('e') else {
        return x.to_string();
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return x.to_string();
    };
    if !(-4..P).contains(&exp) {
        let mantissa = strip_fraction_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (P - 1 - exp).max(0) as usize;
        strip_fraction_zeros(&format!("{:.*}", decimals, x)).to_string()
    }
}

fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_matches_qsd() {
        let v = json!({"id": 1, "error": {"desc": "x", "class": "GenericError"}});
        assert_eq!(
            to_json(&v, false),
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "x"}}"#
        );
        let v = json!({"return": {}, "id": "a"});
        assert_eq!(to_json(&v, false), r#"{"return": {}, "id": "a"}"#);
        let v = json!({"major": 10, "minor": 0, "micro": 2});
        assert_eq!(
            to_json(&v, false),
            r#"{"micro": 2, "minor": 0, "major": 10}"#
        );
        let v = json!({"id": "e", "type": "nbd", "node-name": "n", "shutting-down": false});
        assert_eq!(
            to_json(&v, false),
            r#"{"node-name": "n", "shutting-down": false, "type": "nbd", "id": "e"}"#
        );
        let v = json!({"event": "X", "data": {}, "timestamp": {"microseconds": 1, "seconds": 2}});
        assert_eq!(
            to_json(&v, false),
            r#"{"timestamp": {"seconds": 2, "microseconds": 1}, "event": "X", "data": {}}"#
        );
        let v = json!({"name": "b0", "recording": false, "persistent": true, "busy": true, "granularity": 65536, "count": 262144});
        assert_eq!(
            to_json(&v, false),
            r#"{"name": "b0", "recording": false, "persistent": true, "busy": true, "granularity": 65536, "count": 262144}"#
        );
    }

    #[test]
    fn strings_escape_like_qemu() {
        let v = json!("é\u{1F600}\u{0}\u{1f}\u{7f}\"\\/\n\u{FFFE}");
        assert_eq!(
            to_json(&v, false),
            r#""\u00E9\uD83D\uDE00\u0000\u001F\u007F\"\\/\n\uFFFD""#
        );
    }

    #[test]
    fn floats_are_g17() {
        let cases = [
            (0.1, "0.10000000000000001"),
            (1e-7, "9.9999999999999995e-08"),
            (100.0, "100"),
            (-0.0, "-0"),
            (1e22, "1e+22"),
            (5e-324, "4.9406564584124654e-324"),
            (2.5, "2.5"),
            (123456789.12345679, "123456789.12345679"),
            (1.1, "1.1000000000000001"),
            (1.5e300, "1.5000000000000001e+300"),
            (0.0001, "0.0001"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (12345678901234567.0, "12345678901234568"),
        ];
        for (x, s) in cases {
            assert_eq!(format_g17(x), s, "{x}");
        }
    }

    #[test]
    fn pretty_form() {
        let v = json!({"return": {}, "id": {"a": [], "c": [1, 2]}});
        let s = String::from_utf8(to_wire(&v, true)).unwrap();
        assert_eq!(
            s,
            "{\r\n    \"return\": {\r\n    },\r\n    \"id\": {\r\n        \"a\": [\r\n        ],\r\n        \"c\": [\r\n            1,\r\n            2\r\n        ]\r\n    }\r\n}\r\n"
        );
    }
}
