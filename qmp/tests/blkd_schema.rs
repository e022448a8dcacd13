//! blkd's schema (`src/qapi/schema.json`) against the texts qemu-storage-daemon
//! 10.0.2 was seen to produce (observed-qmp.md, observed-cli.md, and runs of
//! the daemon for the cases noted).

use qmp::{InputMode, Schema};
use serde_json::{json, Value};

fn schema() -> Schema {
    Schema::from_source(include_str!("../../src/qapi/schema.json")).expect("blkd schema loads")
}

/// QMP arguments: the error text.
fn qmp_err(s: &Schema, cmd: &str, args: Value) -> String {
    s.validate_command_args(cmd, args.as_object().unwrap().clone())
        .expect_err("should fail")
}

fn qmp_ok(s: &Schema, cmd: &str, args: Value) -> Value {
    Value::Object(
        s.validate_command_args(cmd, args.as_object().unwrap().clone())
            .expect("should pass"),
    )
}

/// Command-line (keyval) input: every leaf a string, as the keyval parser
/// produces it.
fn kv(s: &Schema, ty: &str, v: Value) -> Result<Value, String> {
    s.visit_type(ty, v, InputMode::Keyval)
}

fn json(s: &Schema, ty: &str, v: Value) -> Result<Value, String> {
    s.visit_type(ty, v, InputMode::Json)
}

#[test]
fn export_errors_qmp() {
    let s = schema();
    let vhost = |extra: Value| {
        let mut a = json!({"type": "vhost-user-blk", "id": "v0", "node-name": "n0",
                           "addr": {"type": "unix", "path": "/tmp/v.sock"}});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    assert_eq!(
        qmp_err(&s, "block-export-add", vhost(json!({"num-queues": 65536}))),
        "Parameter 'num-queues' expects uint16_t"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", vhost(json!({"num-queues": -1}))),
        "Parameter 'num-queues' expects uint16_t"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", vhost(json!({"num-queues": "2"}))),
        "Parameter 'num-queues' expects uint64"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", vhost(json!({"num-queues": 1.5}))),
        "Parameter 'num-queues' expects uint64"
    );
    assert_eq!(
        qmp_err(
            &s,
            "block-export-add",
            vhost(json!({"logical-block-size": "4k"}))
        ),
        "Parameter 'logical-block-size' expects uint64"
    );
    assert_eq!(
        qmp_err(
            &s,
            "block-export-add",
            vhost(json!({"addr": {"type": "unix", "path": "/x", "bogus": 1}}))
        ),
        "Parameter 'addr.bogus' is unexpected"
    );
    // Accepted by the visitor (semantic checks are the daemon's).
    let ok = qmp_ok(
        &s,
        "block-export-add",
        vhost(json!({"num-queues": 65535, "logical-block-size": -512})),
    );
    assert_eq!(ok["num-queues"], json!(65535));
    assert_eq!(ok["logical-block-size"], json!(18446744073709551104u64));

    let nbd = json!({"type": "nbd", "id": "e0", "node-name": "n0"});
    let with = |k: &str, v: Value| {
        let mut a = nbd.clone();
        a[k] = v;
        a
    };
    assert_eq!(
        qmp_err(
            &s,
            "block-export-add",
            json!({"type": "nope", "id": "e", "node-name": "n"})
        ),
        "Parameter 'type' does not accept value 'nope'"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", json!({"id": "e", "node-name": "n"})),
        "Parameter 'type' is missing"
    );
    assert_eq!(
        qmp_err(
            &s,
            "block-export-add",
            json!({"type": "nbd", "node-name": "n"})
        ),
        "Parameter 'id' is missing"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", with("id", json!(1))),
        "Invalid parameter type for 'id', expected: string"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", with("writable", json!("yes"))),
        "Invalid parameter type for 'writable', expected: boolean"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", with("bitmaps", json!("b0"))),
        "Invalid parameter type for 'bitmaps', expected: array"
    );
    assert_eq!(
        qmp_err(&s, "block-export-add", with("bitmaps", json!([1]))),
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
    );
    assert_eq!(
        qmp_err(
            &s,
            "block-export-add",
            with("bitmaps", json!([{"node": 1}]))
        ),
        "Invalid parameter type for 'bitmaps[0].node', expected: string"
    );
    assert_eq!(
        qmp_err(
            &s,
            "block-export-add",
            with("bitmaps", json!(["a", {"node": "a"}]))
        ),
        "Parameter 'bitmaps[1].name' is missing"
    );
    // A member of the other union branch.
    assert_eq!(
        qmp_err(&s, "block-export-add", with("num-queues", json!(2))),
        "Parameter 'num-queues' is unexpected"
    );

    assert_eq!(
        qmp_err(&s, "block-export-del", json!({"id": "e", "mode": "soft"})),
        "Parameter 'mode' does not accept value 'soft'"
    );
    assert_eq!(
        qmp_err(&s, "block-export-del", json!({"id": "e", "mode": 1})),
        "Invalid parameter type for 'mode', expected: string"
    );
}

#[test]
fn nbd_server_errors_qmp() {
    let s = schema();
    assert_eq!(
        qmp_err(
            &s,
            "nbd-server-start",
            json!({"addr": {"type": "unix", "path": "/x"}})
        ),
        "Parameter 'addr.data' is missing"
    );
    assert_eq!(
        qmp_err(
            &s,
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "h", "port": 10850}}})
        ),
        "Invalid parameter type for 'addr.data.port', expected: string"
    );
    assert_eq!(
        qmp_err(
            &s,
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "h", "port": "1", "to": 70000}}})
        ),
        "Parameter 'to' expects uint16_t"
    );
    assert_eq!(
        qmp_err(
            &s,
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/x"}}, "max-connections": -1})
        ),
        "Parameter 'max-connections' expects uint32_t"
    );
    // Base members are checked before addr.
    assert_eq!(
        qmp_err(&s, "nbd-server-start", json!({"max-connections": -1})),
        "Parameter 'max-connections' expects uint32_t"
    );
    let ok = qmp_ok(
        &s,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/x"}}, "handshake-max-seconds": 0}),
    );
    assert_eq!(
        ok,
        json!({"handshake-max-seconds": 0, "addr": {"type": "unix", "data": {"path": "/x"}}})
    );
}

#[test]
fn blockdev_errors_qmp() {
    let s = schema();
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "nope", "node-name": "n"})
        ),
        "Parameter 'driver' does not accept value 'nope'"
    );
    assert_eq!(
        qmp_err(&s, "blockdev-add", json!({"node-name": "n"})),
        "Parameter 'driver' is missing"
    );
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "file", "node-name": "n"})
        ),
        "Parameter 'filename' is missing"
    );
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "raw", "node-name": "a", "file": 1})
        ),
        "Invalid parameter type for 'file', expected: BlockdevRef"
    );
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "raw", "node-name": "a",
            "file": {"driver": "qcow2", "file": {"driver": "null-co", "bogus": 1}}})
        ),
        "Parameter 'file.file.bogus' is unexpected"
    );
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "x", "backing": 1})
        ),
        "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"
    );
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "x", "backing": null, "cache": {"direct": 1}})
        ),
        "Invalid parameter type for 'cache.direct', expected: boolean"
    );
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n", "size": "1M"})
        ),
        "Invalid parameter type for 'size', expected: integer"
    );
    assert_eq!(
        qmp_err(
            &s,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n", "size": 9223372036854775808u64})
        ),
        "Invalid parameter type for 'size', expected: integer"
    );
    assert_eq!(
        qmp_err(&s, "query-named-block-nodes", json!({"flat": null})),
        "Invalid parameter type for 'flat', expected: boolean"
    );
    assert_eq!(
        qmp_err(&s, "block_resize", json!({"node-name": "x", "size": "1"})),
        "Invalid parameter type for 'size', expected: integer"
    );
    assert_eq!(
        qmp_err(
            &s,
            "block-dirty-bitmap-add",
            json!({"node": "x", "name": "y", "granularity": -1})
        ),
        "Parameter 'granularity' expects uint32_t"
    );
    let ok = qmp_ok(
        &s,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "/i"},
                                               "backing": null, "overlap-check": "none"}),
    );
    assert_eq!(ok["backing"], Value::Null);
    assert_eq!(ok["file"], json!({"driver": "file", "filename": "/i"}));
}

#[test]
fn several_unexpected_members_in_glib_order() {
    // QSD reports the first key of its GHashTable, not the first in the input.
    let s = schema();
    assert_eq!(
        qmp_err(
            &s,
            "block-dirty-bitmap-remove",
            json!({"node": "x", "name": "y", "klaoka": 1, "kmbodnm": 1})
        ),
        "Parameter 'kmbodnm' is unexpected"
    );
    assert_eq!(
        json(
            &s,
            "BlockdevOptions",
            json!({"driver": "null-co", "node-name": "a", "zz": 1, "aa": 2, "mm": 3})
        ),
        Err("Parameter 'aa' is unexpected".into())
    );
}

#[test]
fn objects_qmp() {
    let s = schema();
    assert_eq!(
        qmp_err(
            &s,
            "object-add",
            json!({"qom-type": "authz-list", "id": "a",
            "rules": [{"match": "x", "policy": "allow"}, {"match": 1}]})
        ),
        "Invalid parameter type for 'rules[1].match', expected: string"
    );
    assert_eq!(
        qmp_err(
            &s,
            "object-add",
            json!({"qom-type": "authz-list", "id": "a",
            "rules": [{"match": "x", "policy": "allow"}, {"match": "y", "policy": "foo"}]})
        ),
        "Parameter 'policy' does not accept value 'foo'"
    );
    assert_eq!(
        qmp_err(
            &s,
            "object-add",
            json!({"qom-type": "iothread", "id": "a", "poll-max-ns": 1.5})
        ),
        "Invalid parameter type for 'poll-max-ns', expected: integer"
    );
    assert_eq!(
        qmp_err(&s, "object-add", json!({"qom-type": "nope", "id": "x"})),
        "Parameter 'qom-type' does not accept value 'nope'"
    );
    assert_eq!(
        qmp_err(&s, "object-add", json!({"qom-type": "iothread"})),
        "Parameter 'id' is missing"
    );
}

#[test]
fn capabilities_and_no_arg_commands() {
    let s = schema();
    assert_eq!(
        qmp_err(&s, "qmp_capabilities", json!({"enable": ["foo"]})),
        "Parameter 'null' does not accept value 'foo'"
    );
    assert_eq!(
        qmp_err(&s, "qmp_capabilities", json!({"enable": [1]})),
        "Invalid parameter type for 'enable[0]', expected: string"
    );
    assert_eq!(
        qmp_err(&s, "qmp_capabilities", json!({"enable": "oob"})),
        "Invalid parameter type for 'enable', expected: array"
    );
    assert_eq!(
        qmp_err(&s, "query-version", json!({"a": 1})),
        "Parameter 'a' is unexpected"
    );
    assert_eq!(qmp_ok(&s, "query-version", json!({})), json!({}));
    assert_eq!(
        qmp_ok(&s, "qmp_capabilities", json!({"enable": ["oob", "oob"]})),
        json!({"enable": ["oob", "oob"]})
    );
}

#[test]
fn command_line_keyval() {
    let s = schema();
    let bd = |v: Value| kv(&s, "BlockdevOptions", v);
    assert_eq!(
        bd(json!({"driver": "null-co", "node-name": "n", "size": "1M"})),
        Err("Parameter 'size' expects integer".into())
    );
    assert_eq!(
        bd(json!({"driver": "null-co", "node-name": "n", "size": "1e3"})),
        Err("Parameter 'size' expects integer".into())
    );
    assert_eq!(
        bd(
            json!({"driver": "null-co", "node-name": "n", "size": "0x10", "read-only": "y", "cache": {"direct": "off"}})
        ),
        Ok(
            json!({"driver": "null-co", "node-name": "n", "cache": {"direct": false}, "read-only": true, "size": 16})
        )
    );
    assert_eq!(
        bd(json!({"driver": "null-co", "node-name": "n", "read-only": "maybe"})),
        Err("Parameter 'read-only' expects 'on' or 'off'".into())
    );
    assert_eq!(
        bd(json!({"driver": "null-co", "cache": {"direct": "maybe"}})),
        Err("Parameter 'cache.direct' expects 'on' or 'off'".into())
    );
    assert_eq!(
        bd(json!({"driver": "null-co", "cache": "on"})),
        Err("Invalid parameter type for 'cache', expected: object".into())
    );
    assert_eq!(
        bd(json!({"driver": "null-co", "size": {"x": "1"}})),
        Err("Parameters 'size.*' are unexpected".into())
    );
    assert_eq!(
        bd(json!({"driver": "null-co", "bogus": "1"})),
        Err("Parameter 'bogus' is unexpected".into())
    );
    assert_eq!(
        bd(json!({"node-name": "x"})),
        Err("Parameter 'driver' is missing".into())
    );
    assert_eq!(
        bd(json!({"driver": "raw", "node-name": "a", "file": {"driver": "null-co", "bogus": "1"}})),
        Err("Parameter 'file.bogus' is unexpected".into())
    );
    assert_eq!(
        bd(json!({"driver": "raw", "node-name": "a", "file": ""})),
        Ok(json!({"driver": "raw", "node-name": "a", "file": ""}))
    );

    let ex = |v: Value| kv(&s, "BlockExportOptions", v);
    let vhost = json!({"type": "vhost-user-blk", "id": "v", "node-name": "n", "addr": {"type": "unix", "path": "/v"}});
    let with = |k: &str, v: &str| {
        let mut a = vhost.clone();
        a[k] = json!(v);
        a
    };
    assert_eq!(ex(with("num-queues", "0")).unwrap()["num-queues"], json!(0));
    assert_eq!(
        ex(with("num-queues", "65536")),
        Err("Parameter 'num-queues' expects uint16_t".into())
    );
    assert_eq!(
        ex(with("num-queues", "abc")),
        Err("Parameter 'num-queues' expects integer".into())
    );
    assert_eq!(
        ex(with("logical-block-size", "4k")).unwrap()["logical-block-size"],
        json!(4096)
    );
    assert_eq!(
        ex(with("logical-block-size", "4M")).unwrap()["logical-block-size"],
        json!(4194304)
    );
    assert_eq!(
        ex(with("logical-block-size", "-1")),
        Err("Parameter 'logical-block-size' expects size".into())
    );
    assert_eq!(
        ex(with("logical-block-size", "0x200")).unwrap()["logical-block-size"],
        json!(512)
    );
    assert_eq!(
        ex(json!({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": "b0"})),
        Err("Invalid parameter type for 'bitmaps', expected: array".into())
    );
    assert_eq!(
        ex(json!({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [{"node": "x"}]})),
        Err("Parameter 'bitmaps.0.name' is missing".into())
    );
    assert_eq!(
        ex(
            json!({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["b0", {"node": "x", "name": "b1"}]})
        ),
        Ok(
            json!({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["b0", {"node": "x", "name": "b1"}]})
        )
    );
    assert_eq!(
        ex(json!({"type": "nbd", "node-name": "n"})),
        Err("Parameter 'id' is missing".into())
    );
    assert_eq!(
        ex(json!({"id": "e", "node-name": "n"})),
        Err("Parameter 'type' is missing".into())
    );

    let ns = |v: Value| kv(&s, "NbdServerOptions", v);
    assert_eq!(
        ns(json!({"max-connections": "1"})),
        Err("Parameter 'addr' is missing".into())
    );
    assert_eq!(
        ns(json!({"addr": {"type": "unix"}})),
        Err("Parameter 'addr.path' is missing".into())
    );
    assert_eq!(
        ns(json!({"addr": {"type": "unix", "path": "/p"}, "max-connections": "abc"})),
        Err("Parameter 'max-connections' expects integer".into())
    );
    assert_eq!(
        ns(json!({"addr": {"type": "unix", "path": "/p"}, "max-connections": "-1"})),
        Err("Parameter 'max-connections' expects uint32_t".into())
    );
    assert_eq!(
        ns(json!({"addr": {"type": "unix", "data": {"path": "/p"}}})),
        Err("Parameter 'addr.path' is missing".into())
    );
    assert_eq!(
        ns(json!({"addr": {"type": "unix", "path": "/p", "data": {"path": "/p"}}})),
        Err("Parameter 'addr.data' is unexpected".into())
    );
    assert_eq!(
        ns(json!({"addr": {"type": "unix", "path": {"x": "1"}}})),
        Err("Parameters 'addr.path.*' are unexpected".into())
    );
    assert_eq!(
        ns(json!({"addr": {"type": "inet", "host": "h", "port": "1", "to": "x"}})),
        Err("Parameter 'addr.to' expects integer".into())
    );

    let ob = |v: Value| kv(&s, "ObjectOptions", v);
    assert_eq!(
        ob(json!({"qom-type": "iothread"})),
        Err("Parameter 'id' is missing".into())
    );
    assert_eq!(
        ob(json!({"qom-type": "nope", "id": "x"})),
        Err("Parameter 'qom-type' does not accept value 'nope'".into())
    );
    assert_eq!(
        ob(json!({"qom-type": "iothread", "id": "i", "poll-max-ns": "abc"})),
        Err("Parameter 'poll-max-ns' expects integer".into())
    );
    assert_eq!(
        ob(json!({"qom-type": "authz-simple", "id": "a", "identity": "C=GB", "O": "x"})),
        Err("Parameter 'O' is unexpected".into())
    );
    assert_eq!(
        ob(
            json!({"qom-type": "authz-list", "id": "a", "rules": [{"match": "x", "policy": "allow"}, {"match": "y"}]})
        ),
        Err("Parameter 'rules.1.policy' is missing".into())
    );
    assert_eq!(
        ob(json!({"qom-type": "authz-list", "id": "a", "rules": "x"})),
        Err("Invalid parameter type for 'rules', expected: array".into())
    );
    assert_eq!(
        ob(
            json!({"qom-type": "tls-creds-x509", "id": "t", "endpoint": "server", "verify-peer": "no", "dir": "/d"})
        ),
        Ok(
            json!({"qom-type": "tls-creds-x509", "id": "t", "endpoint": "server", "verify-peer": false, "dir": "/d"})
        )
    );
}

#[test]
fn command_line_json() {
    let s = schema();
    assert_eq!(
        json(
            &s,
            "BlockdevOptions",
            json!({"driver": "null-co", "node-name": "n0", "size": "1M"})
        ),
        Err("Invalid parameter type for 'size', expected: integer".into())
    );
    assert_eq!(
        json(
            &s,
            "NbdServerOptions",
            json!({"addr": {"type": "unix", "path": "/x"}, "max-connections": "1"})
        ),
        Err("Parameter 'max-connections' expects uint64".into())
    );
    assert_eq!(
        json(
            &s,
            "ObjectOptions",
            json!({"qom-type": "authz-list", "id": "a", "rules": [{"match": 1}]})
        ),
        Err("Invalid parameter type for 'rules[0].match', expected: string".into())
    );
    assert_eq!(
        qmp::json::from_str("{\"driver\":\"null-co\""),
        Err("JSON parse error, premature EOI".into())
    );
    assert_eq!(
        qmp::json::from_str("{\"driver\":\"null-co\"} x"),
        Err("Expecting at most one JSON value".into())
    );
}

#[test]
fn vq_mapping_extension() {
    let s = schema();
    let base = json!({"type": "vhost-user-blk", "id": "v", "node-name": "n", "addr": {"type": "unix", "path": "/v"}});
    let mut a = base.clone();
    a["iothread-vq-mapping"] = json!([{"iothread": "io0", "vqs": [0, 2]}, {"iothread": "io1"}]);
    assert_eq!(
        qmp_ok(&s, "block-export-add", a.clone())["iothread-vq-mapping"],
        a["iothread-vq-mapping"]
    );
    a["iothread-vq-mapping"] = json!([{"iothread": "io0", "vqs": [65536]}]);
    assert_eq!(
        qmp_err(&s, "block-export-add", a.clone()),
        "Parameter 'null' expects uint16_t"
    );
    a["iothread-vq-mapping"] = json!([{"vqs": [1]}]);
    assert_eq!(
        qmp_err(&s, "block-export-add", a.clone()),
        "Parameter 'iothread-vq-mapping[0].iothread' is missing"
    );
    let mut k = base.clone();
    k["iothread-vq-mapping"] = json!([{"iothread": "io0", "vqs": ["0", "1"]}]);
    assert_eq!(
        kv(&s, "BlockExportOptions", k).unwrap()["iothread-vq-mapping"],
        json!([{"iothread": "io0", "vqs": [0, 1]}])
    );
}

/// Shapes of a few entries, as QSD's `query-qmp-schema` has them.
#[test]
fn introspection_shapes() {
    let s = schema();
    let schema = s.introspect();
    let entries = schema.as_array().unwrap();
    let by_name = |n: &str| {
        entries
            .iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("no entry {n}"))
            .clone()
    };
    // Commands and events come first, in definition order.
    assert_eq!(entries[0]["name"], "block_resize");
    assert!(
        entries
            .iter()
            .take_while(|e| e["meta-type"] == "command" || e["meta-type"] == "event")
            .count()
            >= 25
    );

    let add = by_name("block-export-add");
    assert_eq!(add["meta-type"], "command");
    let args = by_name(add["arg-type"].as_str().unwrap());
    assert_eq!(args["meta-type"], "object");
    assert_eq!(args["tag"], "type");
    let names: Vec<&str> = args["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "type",
            "id",
            "fixed-iothread",
            "iothread",
            "node-name",
            "writable",
            "writethrough",
            "allow-inactive"
        ]
    );
    let cases: Vec<&str> = args["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["case"].as_str().unwrap())
        .collect();
    assert_eq!(cases, ["nbd", "vhost-user-blk"]);
    assert_eq!(
        args["members"][0],
        json!({"name": "type", "type": args["members"][0]["type"]})
    );
    assert_eq!(args["members"][2]["default"], Value::Null);
    let tag_type = by_name(args["members"][0]["type"].as_str().unwrap());
    assert_eq!(tag_type["meta-type"], "enum");
    assert_eq!(tag_type["values"], json!(["nbd", "vhost-user-blk"]));
    // Every integer is "int"; type names are masked numbers.
    let vhost = by_name(args["variants"][1]["type"].as_str().unwrap());
    assert_eq!(
        vhost["members"][1],
        json!({"default": null, "name": "logical-block-size", "type": "int"})
    );
    assert!(vhost["name"].as_str().unwrap().parse::<u32>().is_ok());

    let exports = by_name("query-block-exports");
    assert!(exports["ret-type"].as_str().unwrap().starts_with('['));
    assert_eq!(by_name("BLOCK_EXPORT_DELETED")["meta-type"], "event");
    assert_eq!(by_name("nbd-server-add")["features"], json!(["deprecated"]));
    assert_eq!(
        by_name("str"),
        json!({"json-type": "string", "meta-type": "builtin", "name": "str"})
    );
    // qmp_capabilities' arg: {"enable": [QMPCapability]} with enum ["oob"].
    let caps = by_name(by_name("qmp_capabilities")["arg-type"].as_str().unwrap());
    let list = by_name(caps["members"][0]["type"].as_str().unwrap());
    assert_eq!(list["meta-type"], "array");
    assert_eq!(
        by_name(list["element-type"].as_str().unwrap())["values"],
        json!(["oob"])
    );
}

#[test]
fn query_commands_order_is_qsds() {
    let s = schema();
    let names = s.command_names();
    // QSD lists the most recently registered first: object-del before
    // object-add, query-block-exports before block-export-del, ...
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(pos("object-del") < pos("object-add"));
    assert!(pos("quit") < pos("query-commands") && pos("query-commands") < pos("query-version"));
    assert!(pos("query-version") < pos("qmp_capabilities"));
    assert!(pos("query-block-exports") < pos("block-export-del"));
    assert_eq!(*names.last().unwrap(), "block_resize");
    assert_eq!(names.len(), 25);
}
