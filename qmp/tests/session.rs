//! The QMP session against qemu-storage-daemon 10.0.2's observed replies
//! (observed-qmp.md, "QMP protocol-level errors", and direct runs), byte for
//! byte.

use std::sync::Arc;

use qmp::{Command, QmpError, Schema, Session, SessionItem};
use serde_json::{json, Value};

fn session() -> Session {
    let schema =
        Schema::from_source(include_str!("../../src/qapi/schema.json")).expect("blkd schema loads");
    Session::new(Arc::new(schema))
}

fn negotiated() -> Session {
    let mut s = session();
    assert_eq!(
        out(&mut s, b"{\"execute\": \"qmp_capabilities\"}\n"),
        ["{\"return\": {}}"]
    );
    s
}

/// Feeds input; each item as a string: sent lines verbatim (without the
/// `\r\n`), commands as `CMD name args`.
fn out(s: &mut Session, input: &[u8]) -> Vec<String> {
    s.feed(input)
        .into_iter()
        .map(|item| match item {
            SessionItem::Send(bytes) => {
                let text = String::from_utf8(bytes).unwrap();
                text.strip_suffix("\r\n").expect("CRLF").to_string()
            }
            SessionItem::Command(Command { name, args, .. }) => {
                format!("CMD {name} {}", Value::Object(args))
            }
        })
        .collect()
}

fn generic(desc: &str) -> String {
    format!(
        "{{\"error\": {{\"class\": \"GenericError\", \"desc\": {}}}}}",
        qmp::output::to_json(&json!(desc), false)
    )
}

#[test]
fn greeting() {
    let version = json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"});
    assert_eq!(
        Session::greeting(&version),
        b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"}, \"capabilities\": [\"oob\"]}}\r\n"
    );
}

#[test]
fn negotiation() {
    let mut s = session();
    assert!(!s.negotiated());
    let expecting = "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}";
    assert_eq!(
        out(&mut s, b"{\"execute\": \"query-version\"}\n"),
        [expecting]
    );
    assert_eq!(out(&mut s, b"{\"execute\": \"no-such\", \"id\": 1}\n"),
               ["{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}"]);
    // Input errors are not rewritten.
    assert_eq!(
        out(&mut s, b"[1]\n"),
        [generic("QMP input must be a JSON object")]
    );
    assert_eq!(out(&mut s, b"{\"exec-oob\": \"qmp_capabilities\", \"id\": 5}\n"),
               ["{\"id\": 5, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'exec-oob' is unexpected\"}}"]);
    assert_eq!(
        out(
            &mut s,
            b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"foo\"]}}\n"
        ),
        [generic("Parameter 'null' does not accept value 'foo'")]
    );
    assert_eq!(
        out(
            &mut s,
            b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"bogus\": 1}}\n"
        ),
        [generic("Parameter 'bogus' is unexpected")]
    );
    assert!(!s.negotiated());
    assert_eq!(
        out(
            &mut s,
            b"{\"execute\": \"qmp_capabilities\", \"id\": \"c\"}\n"
        ),
        ["{\"return\": {}, \"id\": \"c\"}"]
    );
    assert!(s.negotiated());
    assert!(!s.oob_enabled());
    assert_eq!(out(&mut s, b"{\"execute\": \"qmp_capabilities\"}\n"),
               ["{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}"]);
    // Arguments are still checked first.
    assert_eq!(
        out(
            &mut s,
            b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"foo\"]}}\n"
        ),
        [generic("Parameter 'null' does not accept value 'foo'")]
    );
}

#[test]
fn protocol_error_table() {
    let mut s = negotiated();
    let cases: &[(&[u8], &[&str])] = &[
        (b"{\"execute\": \"no-such-command\"}\n",
         &["{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command no-such-command has not been found\"}}"]),
        (b"{\"execute\": \"nope\", \"id\": {\"a\": [1, null]}}\n",
         &["{\"id\": {\"a\": [1, null]}, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}"]),
        (b"{\"execute\": \"blockdev-del\"}\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'node-name' is missing\"}}"]),
        (b"{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": 1}}\n",
         &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"Invalid parameter type for 'node-name', expected: string\"}}"]),
        (b"[1, 2]\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}"]),
        (b"\"str\"\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}"]),
        (b"42\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}"]),
        (b"{}\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input lacks member 'execute'\"}}"]),
        (b"{\"arguments\": {}}\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input lacks member 'execute'\"}}"]),
        (b"{\"execute\": 1}\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'execute' must be a string\"}}"]),
        (b"{\"execute\": \"query-version\", \"arguments\": []}\n",
         &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'arguments' must be an object\"}}"]),
        (b"{\"execute\": \"query-version\", \"foo\": 1, \"id\": 5}\n",
         &["{\"id\": 5, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'foo' is unexpected\"}}"]),
        (b"{\"execute\": \"query-version\", \"execute\": \"quit\"}\n",
         &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, duplicate key\"}}"]),
        (b"{\"execute\": }\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}"]),
        (b"{\"execute\": \"query-version\",}\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}"]),
        (b"hello\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword 'hello'\"}}"]),
        (b"{'execute': 'query-version'}\n", &["CMD query-version {}"]),
        (b"{\"execute\": \"query-version\"}}\n",
         &["CMD query-version {}", "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}"]),
        (b"{\"execute\": \"query-version\"}{\"execute\": \"query-version\"}\n", &["CMD query-version {}", "CMD query-version {}"]),
        (b"\n  \r\n\t\n", &[]),
        (b"\"abc\n", &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\\"abc\\n'\"}}"]),
        (b"{\"execute\": \"\xff\"}\n",
         &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\\"\\uFFFD'\"}}",
           "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}"]),
        (b"\x00{\"execute\": \"query-version\"}\n",
         &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray ''\"}}", "CMD query-version {}"]),
        (b"{\"execute\": \"query-version\", \"exec-oob\": \"query-version\"}\n",
         &["{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'exec-oob' is unexpected\"}}"]),
        (b"{\"execute\": \"query-version\", \"arguments\": {}, \"id\": \"abc\"}\n", &["CMD query-version {}"]),
    ];
    for (input, expected) in cases {
        assert_eq!(
            out(&mut s, input),
            *expected,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn split_and_packed_input() {
    let mut s = negotiated();
    let input =
        b"{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": \"n0\"}, \"id\": 7}";
    let mut items = Vec::new();
    for chunk in input.chunks(3) {
        items.extend(s.feed(chunk));
    }
    assert_eq!(items.len(), 1);
    let SessionItem::Command(cmd) = &items[0] else {
        panic!("{items:?}")
    };
    assert_eq!(cmd.name, "blockdev-del");
    assert_eq!(cmd.args, *json!({"node-name": "n0"}).as_object().unwrap());
    assert_eq!(cmd.id, Some(json!(7)));
    assert!(!cmd.oob);
    assert!(s.idle());
    s.feed(b"{\"execute\":");
    assert!(!s.idle());
}

#[test]
fn nesting_limit() {
    let mut s = negotiated();
    let mut input = vec![b'['; 2000];
    input.extend(vec![b']'; 2000]);
    input.push(b'\n');
    let got = out(&mut s, &input);
    assert_eq!(got.len(), 2 + 1025);
    assert_eq!(got[0], generic("JSON nesting depth limit exceeded"));
    assert_eq!(got[1], generic("QMP input must be a JSON object"));
    assert!(got[2..]
        .iter()
        .all(|l| *l == generic("JSON parse error, expecting value")));
    // Still usable.
    assert_eq!(
        out(&mut s, b"{\"execute\": \"query-version\"}"),
        ["CMD query-version {}"]
    );
}

#[test]
fn deep_arguments_do_not_overflow_the_stack() {
    // 1020 nested BlockdevRef levels: valid, and validated on a big stack.
    let mut s = negotiated();
    let depth = 1020;
    let mut input = String::from("{\"execute\": \"blockdev-add\", \"arguments\": ");
    input.push_str(&"{\"driver\": \"raw\", \"file\": ".repeat(depth));
    input.push_str("\"x\"");
    input.push_str(&"}".repeat(depth));
    input.push('}');
    let items = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || s.feed(input.as_bytes()).len())
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(items, 1);
}

#[test]
fn oob() {
    let mut s = session();
    assert_eq!(
        out(
            &mut s,
            b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}"
        ),
        ["{\"return\": {}}"]
    );
    assert!(s.oob_enabled());
    assert_eq!(out(&mut s, b"{\"exec-oob\": \"query-version\", \"id\": 1}"),
               ["{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"The command query-version does not support OOB\"}}"]);
    assert_eq!(out(&mut s, b"{\"exec-oob\": \"nope\", \"id\": 2}"),
               ["{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}"]);
    assert_eq!(out(&mut s, b"{\"exec-oob\": \"query-version\", \"execute\": \"query-version\", \"id\": 3}"),
               ["{\"id\": 3, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'execute' clashes with 'exec-oob'\"}}"]);
}

#[test]
fn replies_and_events() {
    assert_eq!(qmp::reply(&None, Ok(json!({}))), b"{\"return\": {}}\r\n");
    assert_eq!(
        qmp::reply(&Some(json!("abc")), Ok(json!([]))),
        b"{\"return\": [], \"id\": \"abc\"}\r\n"
    );
    assert_eq!(
        qmp::reply(&Some(json!(1)), Err(QmpError::generic("Export 'nope' is not found"))),
        b"{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"Export 'nope' is not found\"}}\r\n"
    );
    assert_eq!(
        qmp::reply(&None, Err(QmpError::command_not_found("x"))),
        b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command x has not been found\"}}\r\n"
    );
    // Returned objects are written in QEMU's key order.
    assert_eq!(
        qmp::reply(&None, Ok(json!([{"id": "e0", "type": "nbd", "node-name": "n0", "shutting-down": false}]))),
        b"{\"return\": [{\"node-name\": \"n0\", \"shutting-down\": false, \"type\": \"nbd\", \"id\": \"e0\"}]}\r\n"
    );
    let ev = String::from_utf8(qmp::event(
        "BLOCK_EXPORT_DELETED",
        Some(json!({"id": "e0"})),
    ))
    .unwrap();
    assert!(ev.starts_with("{\"timestamp\": {\"seconds\": "), "{ev}");
    assert!(
        ev.ends_with(", \"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {\"id\": \"e0\"}}\r\n"),
        "{ev}"
    );
    let bare = String::from_utf8(qmp::event("X", None)).unwrap();
    assert!(bare.ends_with("}, \"event\": \"X\"}\r\n"), "{bare}");
}

#[test]
fn pretty() {
    let mut s = session();
    s.set_pretty(true);
    let sent = s.feed(b"[1]");
    assert_eq!(
        sent,
        [SessionItem::Send(
            b"{\r\n    \"error\": {\r\n        \"class\": \"GenericError\",\r\n        \"desc\": \"QMP input must be a JSON object\"\r\n    }\r\n}\r\n"
                .to_vec()
        )]
    );
}
