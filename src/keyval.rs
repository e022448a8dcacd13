//! QEMU's keyval command-line syntax (`util/keyval.c`), as used by
//! `--blockdev`, `--export`, `--nbd-server` and `--object`.
//!
//! * `key=value,key=value`; a literal comma in a value is written `,,`;
//! * dotted keys nest: `addr.type=unix,addr.path=/p` gives
//!   `{"addr": {"type": "unix", "path": "/p"}}`;
//! * numeric segments make lists: `bitmaps.0=b0,bitmaps.1=b1` gives
//!   `{"bitmaps": ["b0", "b1"]}`;
//! * an implied first key: with `implied_key` `driver`, `null-co,node-name=n`
//!   means `driver=null-co,node-name=n` (the implied value ends at the first
//!   comma: no `,,` escape there);
//! * a trailing comma is accepted; a key given twice keeps the last value.
//!
//! Every leaf is a string; types are checked and converted afterwards by the
//! schema visitor (`qmp::Schema::visit_type` with `InputMode::Keyval`), which
//! also reports unknown members (`Parameter 'x' is unexpected`). Errors here
//! are QEMU's texts: `Expected '=' after parameter 'x'`, `Invalid parameter
//! 'x'`, `Parameter 'x' is too long`, `Parameters 'x.*' used inconsistently`,
//! `Parameter 'x.1' missing`, `Help is not available for this option`.

use serde_json::{Map, Value};

/// Longest key fragment QEMU accepts (`key_in_cur[128]`).
const MAX_FRAGMENT: usize = 127;

/// Parses `input`. `help` or `?` in key position is an error (use
/// [`parse_with_help`] for options that offer help).
pub fn parse(input: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, String> {
    let (map, help) = parse_with_help(input, implied_key)?;
    if help {
        return Err("Help is not available for this option".into());
    }
    Ok(map)
}

/// Parses `input`, also reporting whether `help` (or `?`) was asked for, as
/// `--object help` and `--object iothread,help` do.
pub fn parse_with_help(
    input: &str,
    implied_key: Option<&str>,
) -> Result<(Map<String, Value>, bool), String> {
    let mut root = Map::new();
    let mut help = false;
    let mut implied_key = implied_key;
    let mut pos = 0;
    while pos < input.len() {
        pos += parse_one(&mut root, &input[pos..], implied_key, &mut help)?;
        implied_key = None;
    }
    match listify(root, &[])? {
        Value::Object(map) => Ok((map, help)),
        _ => unreachable!("top-level keys are names, never list indexes"),
    }
}

/// `strcspn(s, "=,")`.
fn key_span(s: &[u8]) -> usize {
    s.iter()
        .position(|&c| c == b'=' || c == b',')
        .unwrap_or(s.len())
}

fn starts_with_help_option(s: &str) -> usize {
    if s.starts_with('?') {
        1
    } else if s.starts_with("help") {
        4
    } else {
        0
    }
}

/// QEMU's `parse_qapi_name(s, false)`: the length of the name at the start of
/// `s` (letters, digits, `-`, `_`, starting with a letter; or a downstream
/// `__RFQDN_` prefix), 0 if none.
fn qapi_name_len(s: &[u8]) -> usize {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        p += 1;
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
        while p < s.len() && (s[p].is_ascii_alphanumeric() || s[p] == b'-' || s[p] == b'.') {
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !s.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while p < s.len() && (s[p].is_ascii_alphanumeric() || s[p] == b'-' || s[p] == b'_') {
        p += 1;
    }
    p
}

/// QEMU's `key_to_index()`: for a fragment starting with a digit, the index
/// (saturated at `i32::MAX`) and the number of digits.
fn key_to_index(s: &[u8]) -> Option<(usize, usize)> {
    if !s.first().is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut value: u64 = 0;
    for &c in &s[..digits] {
        value = value.saturating_mul(10).saturating_add((c - b'0') as u64);
    }
    Some((value.min(i32::MAX as u64) as usize, digits))
}

/// The index of a whole key, if it is one (`key_to_index(key, NULL)`).
fn whole_key_index(key: &str) -> Option<usize> {
    match key_to_index(key.as_bytes()) {
        Some((index, len)) if len == key.len() => Some(index),
        _ => None,
    }
}

/// The dictionary at `path` below `root`.
fn dict_at<'a>(root: &'a mut Map<String, Value>, path: &[String]) -> &'a mut Map<String, Value> {
    let mut cur = root;
    for k in path {
        cur = match cur.get_mut(k) {
            Some(Value::Object(m)) => m,
            _ => unreachable!("path leads through objects"),
        };
    }
    cur
}

/// `keyval_parse_put()`: stores a string (`Some`) or makes sure a nested
/// dictionary exists (`None`). `key_so_far` names the key for errors.
fn put(
    cur: &mut Map<String, Value>,
    key_in_cur: &str,
    value: Option<String>,
    key_so_far: &str,
) -> Result<(), String> {
    match cur.get_mut(key_in_cur) {
        Some(old) => {
            if old.is_string() != value.is_some() {
                return Err(format!("Parameters '{key_so_far}.*' used inconsistently"));
            }
            if let Some(v) = value {
                // Replaced in place: the key keeps its position.
                *old = Value::String(v);
            }
        }
        None => {
            let new = match value {
                Some(v) => Value::String(v),
                None => Value::Object(Map::new()),
            };
            cur.insert(key_in_cur.to_string(), new);
        }
    }
    Ok(())
}

/// `keyval_parse_one()`: parses one `key=value` from the start of `params`
/// into `root`; returns the number of bytes consumed.
fn parse_one(
    root: &mut Map<String, Value>,
    params: &str,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<usize, String> {
    let pb = params.as_bytes();
    let mut key: &str = params;
    let mut val_end: Option<usize> = None;
    let mut len = key_span(pb);
    if len > 0 && pb.get(len) != Some(&b'=') {
        if starts_with_help_option(params) == len {
            *help = true;
            let mut s = len;
            if pb.get(s) == Some(&b',') {
                s += 1;
            }
            return Ok(s);
        }
        if let Some(ik) = implied_key {
            key = ik;
            val_end = Some(len);
            len = ik.len();
        }
    }
    let kb = key.as_bytes();
    let key_end = len;

    // Walk the key fragments; `path` leads to the dictionary the current
    // fragment applies to.
    let mut path: Vec<String> = Vec::new();
    let mut key_in_cur = String::new();
    let mut s = 0;
    loop {
        let flen = if s != 0 {
            match key_to_index(&kb[s..]) {
                Some((_, digits)) => digits,
                None => qapi_name_len(&kb[s..]),
            }
        } else {
            qapi_name_len(&kb[s..])
        };
        if flen == 0 || (s + flen < key_end && kb[s + flen] != b'.') {
            return Err(format!("Invalid parameter '{}'", &key[..key_end]));
        }
        if flen > MAX_FRAGMENT {
            let fragment = if s != 0 || s + flen != key_end {
                " fragment"
            } else {
                ""
            };
            return Err(format!(
                "Parameter{fragment} '{}' is too long",
                &key[s..s + flen]
            ));
        }
        if s != 0 {
            put(dict_at(root, &path), &key_in_cur, None, &key[..s - 1])?;
            path.push(std::mem::take(&mut key_in_cur));
        }
        key_in_cur = key[s..s + flen].to_string();
        s += flen;
        if kb.get(s) != Some(&b'.') {
            break;
        }
        s += 1;
    }

    let (value, consumed) = match val_end {
        Some(end) => {
            let mut next = end;
            if pb.get(next) == Some(&b',') {
                next += 1;
            }
            (params[..end].to_string(), next)
        }
        None => {
            if pb.get(s) != Some(&b'=') {
                return Err(format!("Expected '=' after parameter '{}'", &key[..s]));
            }
            s += 1;
            let mut val: Vec<u8> = Vec::new();
            while s < pb.len() {
                if pb[s] == b',' {
                    s += 1;
                    if pb.get(s) != Some(&b',') {
                        break;
                    }
                }
                val.push(pb[s]);
                s += 1;
            }
            // Only ASCII commas were removed, so this is still UTF-8.
            (String::from_utf8(val).expect("UTF-8 value"), s)
        }
    };
    put(
        dict_at(root, &path),
        &key_in_cur,
        Some(value),
        &key[..key_end],
    )?;
    Ok(consumed)
}

/// QEMU's QDict bucket of a key (`tdb_hash() % 512`): QEMU walks the
/// dictionary in bucket order, which decides which error is reported first
/// and which of two equal indexes (`0` and `00`) wins.
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add((b as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// Keys of `map` in QDict iteration order.
fn qdict_order(map: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<(u32, usize, &String)> = map
        .keys()
        .enumerate()
        .map(|(i, k)| (qdict_bucket(k), i, k))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keys.into_iter().map(|(_, _, k)| k.clone()).collect()
}

/// `reassemble_key()`: `a.b.` for the path `[a, b]`.
fn reassemble(path: &[String]) -> String {
    path.iter().map(|p| format!("{p}.")).collect()
}

/// `keyval_listify()`: turns dictionaries whose keys are all indexes into
/// lists, recursively.
fn listify(mut cur: Map<String, Value>, key_of_cur: &[String]) -> Result<Value, String> {
    let order = qdict_order(&cur);
    let mut has_index = false;
    let mut has_member = false;
    for k in &order {
        if whole_key_index(k).is_some() {
            has_index = true;
        } else {
            has_member = true;
        }
        if let Some(Value::Object(_)) = cur.get(k) {
            let Some(Value::Object(inner)) = cur.get_mut(k).map(Value::take) else {
                unreachable!()
            };
            let mut path = key_of_cur.to_vec();
            path.push(k.clone());
            let v = listify(inner, &path)?;
            cur.insert(k.clone(), v);
        }
    }
    if has_index && has_member {
        return Err(format!(
            "Parameters '{}*' used inconsistently",
            reassemble(key_of_cur)
        ));
    }
    if !has_index {
        return Ok(Value::Object(cur));
    }
    let nelt = cur.len() + 1;
    let mut elt: Vec<Option<Value>> = vec![None; nelt];
    let mut max_index: usize = 0;
    for k in &order {
        let index = whole_key_index(k).expect("all keys are indexes");
        max_index = max_index.max(index);
        if index >= nelt - 1 {
            continue;
        }
        elt[index] = cur.get(k).cloned();
    }
    let mut list = Vec::new();
    for (i, e) in elt.into_iter().enumerate().take(nelt.min(max_index + 1)) {
        match e {
            Some(v) => list.push(v),
            None => {
                return Err(format!(
                    "Parameter '{}{}' missing",
                    reassemble(key_of_cur),
                    i
                ))
            }
        }
    }
    Ok(Value::Array(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str, implied: Option<&str>) -> Result<Value, String> {
        parse(s, implied).map(Value::Object)
    }

    #[test]
    fn basic() {
        assert_eq!(
            p("driver=null-co,node-name=n0", None),
            Ok(json!({"driver": "null-co", "node-name": "n0"}))
        );
        assert_eq!(
            p("null-co,node-name=n0", Some("driver")),
            Ok(json!({"driver": "null-co", "node-name": "n0"}))
        );
        assert_eq!(
            p("driver=null-co,node-name=n0,", None),
            Ok(json!({"driver": "null-co", "node-name": "n0"}))
        );
        assert_eq!(p("", Some("driver")), Ok(json!({})));
        assert_eq!(p("a=", None), Ok(json!({"a": ""})));
        // A key given twice keeps its first position and its last value.
        let m = parse("a=1,b=2,a=3", None).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m["a"], "3");
    }

    #[test]
    fn nesting_and_lists() {
        assert_eq!(
            p(
                "nbd,addr.type=unix,addr.path=/tmp/x.sock,bitmaps.0=b0,bitmaps.1=b1",
                Some("type")
            ),
            Ok(
                json!({"type": "nbd", "addr": {"type": "unix", "path": "/tmp/x.sock"}, "bitmaps": ["b0", "b1"]})
            )
        );
        assert_eq!(
            p("rules.0.match=a,rules.0.policy=allow,rules.1.match=b", None),
            Ok(json!({"rules": [{"match": "a", "policy": "allow"}, {"match": "b"}]}))
        );
        assert_eq!(
            p("bitmaps.1=b,bitmaps.0=a", None),
            Ok(json!({"bitmaps": ["a", "b"]}))
        );
    }

    #[test]
    fn commas() {
        assert_eq!(
            p(
                "authz-simple,id=auth0,identity=C=GB,,O=QSD Test,,CN=qsd-client",
                Some("qom-type")
            ),
            Ok(
                json!({"qom-type": "authz-simple", "id": "auth0", "identity": "C=GB,O=QSD Test,CN=qsd-client"})
            )
        );
        // Without doubling, 'O' becomes a key of its own (the visitor then
        // reports "Parameter 'O' is unexpected").
        assert_eq!(
            p("identity=C=GB,O=x", None),
            Ok(json!({"identity": "C=GB", "O": "x"}))
        );
        assert_eq!(p("a=x,,,b=y", None), Ok(json!({"a": "x,", "b": "y"})));
        // The implied value ends at the first comma.
        assert_eq!(
            p("null-co,,x,node-name=a", Some("driver")),
            Err("Invalid parameter ''".into())
        );
    }

    #[test]
    fn errors_as_qemu() {
        let e = |s: &str| p(s, Some("driver")).unwrap_err();
        assert_eq!(
            e("null-co,node-name=a,foo"),
            "Expected '=' after parameter 'foo'"
        );
        assert_eq!(
            e("driver=null-co,null-co"),
            "Expected '=' after parameter 'null-co'"
        );
        assert_eq!(e("null-co,node-name=a,=x"), "Invalid parameter ''");
        assert_eq!(e("null-co,node-name=a,1a=x"), "Invalid parameter '1a'");
        assert_eq!(e("null-co,a.b$=x"), "Invalid parameter 'a.b$'");
        assert_eq!(e("null-co,node-name=a,a.1=x"), "Parameter 'a.0' missing");
        assert_eq!(
            e("null-co,node-name=a,bogus.0=x,bogus.2=y"),
            "Parameter 'bogus.1' missing"
        );
        assert_eq!(
            e("null-co,node-name=a,bogus.0=x,bogus.a=y"),
            "Parameters 'bogus.*' used inconsistently"
        );
        assert_eq!(
            e("null-co,cache.direct=on,cache=x"),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(
            e("null-co,cache=x,cache.direct=on"),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(e("help"), "Help is not available for this option");
        assert_eq!(e("null-co,help"), "Help is not available for this option");
        let long = "a".repeat(140);
        assert_eq!(
            e(&format!("null-co,{long}=1")),
            format!("Parameter '{long}' is too long")
        );
        assert_eq!(
            e(&format!("null-co,x.{long}=1")),
            format!("Parameter fragment '{long}' is too long")
        );
    }

    #[test]
    fn help() {
        assert_eq!(
            parse_with_help("help", Some("qom-type")),
            Ok((Map::new(), true))
        );
        let (m, h) = parse_with_help("iothread,help", Some("qom-type")).unwrap();
        assert!(h);
        assert_eq!(Value::Object(m), json!({"qom-type": "iothread"}));
        assert_eq!(parse_with_help("?", None).map(|r| r.1), Ok(true));
        // "helpme" is a value for the implied key, not help.
        assert_eq!(p("helpme", Some("driver")), Ok(json!({"driver": "helpme"})));
    }

    #[test]
    fn unusual_indexes() {
        // Huge indexes saturate and are reported as the first gap.
        assert_eq!(
            p("a.99999999999=x", None),
            Err("Parameter 'a.0' missing".into())
        );
        assert_eq!(
            p("a.0=x,a.5=y", None),
            Err("Parameter 'a.1' missing".into())
        );
        // A list below a list.
        assert_eq!(p("a.0.0=x,a.0.1=y", None), Ok(json!({"a": [["x", "y"]]})));
    }
}
