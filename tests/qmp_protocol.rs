//! QMP wire protocol, negotiation and input errors: blkd against
//! qemu-storage-daemon on the same inputs, plus blkd's multi-client monitor.

mod common;

use common::{Daemon, Impl, Qmp};
use serde_json::{json, Value};

/// Sends raw input and reads `replies` lines back.
fn exchange(qmp: &mut Qmp, input: &[u8], replies: usize) -> Vec<Value> {
    qmp.send_raw(input);
    (0..replies).map(|_| qmp.reply()).collect()
}

/// Inputs before negotiation, and after it, with the number of replies each
/// one produces (from observed-qmp.md).
const BEFORE: &[(&str, usize)] = &[
    ("{\"execute\": \"query-version\"}\n", 1),
    (
        "{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"foo\"]}}\n",
        1,
    ),
];

const AFTER: &[(&str, usize)] = &[
    ("{\"execute\": \"qmp_capabilities\"}\n", 1),
    ("{\"execute\": \"no-such-command\"}\n", 1),
    ("{\"execute\": \"query-version\", \"id\": \"abc\"}\n", 1),
    ("{\"execute\": \"nope\", \"id\": {\"a\": [1, null]}}\n", 1),
    ("{\"execute\": \"query-version\", \"arguments\": {}}\n", 1),
    ("{\"execute\": \"blockdev-del\"}\n", 1),
    (
        "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": 1}}\n",
        1,
    ),
    (
        "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": \"x\", \"x\": 1}}\n",
        1,
    ),
    (
        "{\"execute\": \"block-export-del\", \"arguments\": {\"id\": \"e\", \"mode\": 1}}\n",
        1,
    ),
    (
        "{\"execute\": \"block-export-del\", \"arguments\": {\"id\": \"e\", \"mode\": \"soft\"}}\n",
        1,
    ),
    ("[1, 2]\n", 1),
    ("\"str\"\n", 1),
    ("42\n", 1),
    ("{}\n", 1),
    ("{\"arguments\": {}}\n", 1),
    ("{\"execute\": 1}\n", 1),
    ("{\"execute\": \"query-version\", \"arguments\": []}\n", 1),
    ("{\"execute\": \"query-version\", \"foo\": 1}\n", 1),
    (
        "{\"execute\": \"query-version\", \"execute\": \"quit\"}\n",
        1,
    ),
    ("{\"execute\": }\n", 1),
    ("{\"execute\": \"query-version\",}\n", 1),
    ("hello\n", 1),
    ("{'execute': 'query-version'}\n", 1),
    ("{\"execute\": \"query-version\"}}\n", 2),
    (
        "{\"execute\": \"query-version\"}{\"execute\": \"query-version\"}\n",
        2,
    ),
    ("\"abc\n", 1),
    (
        "{\"execute\": \"query-version\", \"exec-oob\": \"query-version\"}\n",
        1,
    ),
];

/// Replies with the version fields masked, since blkd reports its own package.
fn normalize(mut v: Value) -> Value {
    if let Some(r) = v.get_mut("return") {
        if r.get("package").is_some() {
            r["package"] = json!("<package>");
        }
    }
    v
}

fn transcript(which: Impl) -> Vec<Value> {
    let d = Daemon::start(which, &[]);
    let mut qmp = Qmp::connect_raw(&d.path("qmp.sock"));
    assert_eq!(qmp.greeting["QMP"]["capabilities"], json!(["oob"]));
    assert_eq!(qmp.greeting["QMP"]["version"]["qemu"]["major"], 10);
    let mut out = Vec::new();
    for (input, n) in BEFORE {
        out.extend(exchange(&mut qmp, input.as_bytes(), *n));
    }
    out.extend(exchange(
        &mut qmp,
        b"{\"execute\": \"qmp_capabilities\"}\n",
        1,
    ));
    for (input, n) in AFTER {
        out.extend(exchange(&mut qmp, input.as_bytes(), *n));
    }
    // An object split across writes, with no newline at all.
    qmp.send_raw(b"{\"execute\": \"query-");
    std::thread::sleep(std::time::Duration::from_millis(50));
    out.extend(exchange(&mut qmp, b"version\"}", 1));
    out.into_iter().map(normalize).collect()
}

#[test]
fn protocol_replies_match_qsd() {
    let ours = transcript(Impl::Blkd);
    let theirs = transcript(Impl::Qsd);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "reply {i} differs");
    }
    assert_eq!(ours.len(), theirs.len());
    // And the texts are the documented ones, not merely equal.
    let descs: Vec<&str> = ours
        .iter()
        .filter_map(|v| v["error"]["desc"].as_str())
        .collect();
    for expected in [
        "Expecting capabilities negotiation with 'qmp_capabilities'",
        "Capabilities negotiation is already complete, command ignored",
        "The command no-such-command has not been found",
        "Parameter 'node-name' is missing",
        "Invalid parameter type for 'node-name', expected: string",
        "Parameter 'x' is unexpected",
        "Parameter 'mode' does not accept value 'soft'",
        "QMP input must be a JSON object",
        "QMP input lacks member 'execute'",
        "QMP input member 'execute' must be a string",
        "QMP input member 'arguments' must be an object",
        "QMP input member 'foo' is unexpected",
        "JSON parse error, duplicate key",
        "JSON parse error, expecting value",
        "JSON parse error, invalid keyword 'hello'",
    ] {
        assert!(
            descs.contains(&expected),
            "missing error {expected:?} in {descs:?}"
        );
    }
    let with_id: Vec<&Value> = ours.iter().filter(|v| v.get("id").is_some()).collect();
    assert_eq!(with_id[0]["id"], json!("abc"));
    assert_eq!(with_id[1]["id"], json!({"a": [1, null]}));
}

#[test]
fn deep_nesting_is_refused_and_the_monitor_recovers() {
    let d = Daemon::start(Impl::Blkd, &[]);
    let mut qmp = d.qmp();
    let deep = format!("{}{}\n", "[".repeat(1100), "]".repeat(1100));
    qmp.send_raw(deep.as_bytes());
    let first = qmp.reply();
    assert_eq!(first["error"]["desc"], "JSON nesting depth limit exceeded");
    // Whatever else the stray brackets produce, the next command works.
    qmp.send_raw(b"{\"execute\": \"query-version\", \"id\": \"after\"}\n");
    loop {
        let v = qmp.reply();
        if v["id"] == "after" {
            assert!(v.get("return").is_some());
            break;
        }
    }
}

#[test]
fn oversized_and_garbage_input_does_not_disturb_other_clients() {
    let d = Daemon::start(Impl::Blkd, &[]);
    let mut good = d.qmp();
    let mut bad = d.qmp();
    // Garbage bytes, a NUL, invalid UTF-8 and an endless string.
    bad.send_raw(b"\x00\xff\xfe garbage }}}} ]]] {\"execute\"");
    let mut big = b"{\"execute\": \"query-version\", \"arguments\": {\"x\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 8 << 20));
    // The daemon may close on us: ignore write errors.
    let _ = std::io::Write::write_all(&mut bad.writer, &big);
    let v = good.ok("query-version", json!({}));
    assert_eq!(v["qemu"]["major"], 10);
    good.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0"}),
    );
    assert_eq!(
        good.ok("query-named-block-nodes", json!({}))[0]["node-name"],
        "n0"
    );
}

#[test]
fn several_clients_at_once_all_get_events() {
    let d = Daemon::start(Impl::Blkd, &[]);
    let mut a = d.qmp();
    let mut b = d.qmp();
    let mut unnegotiated = Qmp::connect_raw(&d.path("qmp.sock"));
    let sock = d.path("nbd.sock");
    a.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    b.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0"}),
    );
    a.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
    );
    let exports = b.ok("query-block-exports", json!({}));
    assert_eq!(
        exports,
        json!([{"node-name": "n0", "shutting-down": false, "type": "nbd", "id": "e0"}])
    );
    b.ok("block-export-del", json!({"id": "e0"}));
    for client in [&mut a, &mut b] {
        let ev = client.event("BLOCK_EXPORT_DELETED");
        assert_eq!(ev["data"], json!({"id": "e0"}));
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
    // A client that never negotiated gets no events: its next line is the
    // reply to its own command.
    let r = exchange(
        &mut unnegotiated,
        b"{\"execute\": \"qmp_capabilities\"}\n",
        1,
    );
    assert_eq!(r[0], json!({"return": {}}));
}

#[test]
fn query_commands_and_schema_describe_what_blkd_implements() {
    let d = Daemon::start(Impl::Blkd, &[]);
    let mut qmp = d.qmp();
    let cmds = qmp.ok("query-commands", json!({}));
    let names: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for required in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-qmp-schema",
        "quit",
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "block_resize",
        "object-add",
        "object-del",
        "query-iothreads",
        "nbd-server-start",
        "nbd-server-stop",
        "block-export-add",
        "block-export-del",
        "query-block-exports",
    ] {
        assert!(names.contains(&required), "query-commands lacks {required}");
    }
    let schema = qmp.ok("query-qmp-schema", json!({}));
    let entries = schema.as_array().unwrap();
    let commands: Vec<&Value> = entries
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .collect();
    assert_eq!(
        commands.len(),
        names.len(),
        "schema and query-commands disagree"
    );
    // Every command's arg-type resolves to an object type in the schema.
    let export_add = commands
        .iter()
        .find(|c| c["name"] == "block-export-add")
        .unwrap();
    let arg_type = export_add["arg-type"].as_str().unwrap();
    let arg = entries.iter().find(|e| e["name"] == arg_type).unwrap();
    assert_eq!(arg["meta-type"], "object");
    assert_eq!(arg["tag"], "type");
    let cases: Vec<&str> = arg["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["case"].as_str().unwrap())
        .collect();
    assert!(cases.contains(&"nbd") && cases.contains(&"vhost-user-blk"));
    assert!(entries
        .iter()
        .any(|e| e["meta-type"] == "event" && e["name"] == "BLOCK_EXPORT_DELETED"));
}

#[test]
fn quit_replies_then_exits_and_removes_the_socket() {
    let mut d = Daemon::start(Impl::Blkd, &[]);
    let mut qmp = d.qmp();
    assert_eq!(qmp.cmd("quit", json!({})), json!({"return": {}}));
    let status = d.wait_exit(std::time::Duration::from_secs(10));
    assert!(status.success());
    assert!(!d.path("qmp.sock").exists());
}
