//! QMP commands of the core: block nodes, objects, iothreads and export
//! argument checks, each scenario run against blkd and qemu-storage-daemon.

mod common;

use common::{Daemon, Impl, Qmp};
use serde_json::{json, Value};

/// Runs `steps` (command, arguments) and returns each reply with volatile
/// fields removed.
fn replies(qmp: &mut Qmp, steps: &[(&str, Value)]) -> Vec<Value> {
    steps
        .iter()
        .map(|(name, args)| qmp.cmd(name, args.clone()))
        .collect()
}

fn both(steps: impl Fn(&Daemon) -> Vec<(&'static str, Value)>) -> (Vec<Value>, Vec<Value>) {
    let run = |which| {
        let d = Daemon::start(which, &[]);
        let mut qmp = d.qmp();
        let dir = d.dir.path().display().to_string();
        replies(&mut qmp, &steps(&d))
            .into_iter()
            .map(|v| serde_json::from_str(&v.to_string().replace(&dir, "$DIR")).unwrap())
            .collect()
    };
    (run(Impl::Blkd), run(Impl::Qsd))
}

fn assert_same(ours: &[Value], theirs: &[Value]) {
    assert_eq!(ours.len(), theirs.len());
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a, b, "step {i} differs");
    }
}

#[test]
fn blockdev_add_and_del_errors_match_qsd() {
    let (ours, theirs) = both(|d| {
        let img = d.path("img.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        vec![
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "null0", "size": 1048576}),
            ),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "null0"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "file", "node-name": "f1", "filename": d.path("does-not-exist")}),
            ),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "1bad"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "#bad"}),
            ),
            ("blockdev-add", json!({"driver": "null-co"})),
            ("blockdev-add", json!({"driver": "nope", "node-name": "x"})),
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "r9", "file": "nonexistent"}),
            ),
            ("blockdev-add", json!({"driver": "file", "node-name": "f2"})),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "n2", "bogus": 1}),
            ),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "n3", "size": "1M"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "file", "node-name": "file0", "filename": img}),
            ),
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "fmt0", "file": "file0"}),
            ),
            ("blockdev-del", json!({"node-name": "file0"})),
            ("blockdev-del", json!({"node-name": "nope"})),
            (
                "block_resize",
                json!({"node-name": "null0", "size": 2097152}),
            ),
            (
                "block_resize",
                json!({"node-name": "fmt0", "size": 2097152}),
            ),
            ("block_resize", json!({"node-name": "fmt0", "size": -1})),
            ("block_resize", json!({"node-name": "nope", "size": 512})),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "ro0", "read-only": true}),
            ),
            ("block_resize", json!({"node-name": "ro0", "size": 512})),
            ("blockdev-del", json!({"node-name": "fmt0"})),
            ("blockdev-del", json!({"node-name": "file0"})),
            ("blockdev-del", json!({"node-name": "null0"})),
        ]
    });
    assert_same(&ours, &theirs);
    assert_eq!(
        ours[1]["error"]["desc"],
        "Duplicate nodes with node-name='null0'"
    );
    assert_eq!(ours[13]["error"]["desc"], "Block device file0 is in use");
}

#[test]
fn resize_changes_the_file_and_query_reports_nodes() {
    let d = Daemon::start(Impl::Blkd, &[]);
    let img = d.path("img.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut qmp = d.qmp();
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "file0", "filename": img}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt0", "file": "file0"}),
    );
    qmp.ok(
        "block_resize",
        json!({"node-name": "fmt0", "size": 4 << 20}),
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 20);
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let fmt = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fmt0")
        .unwrap();
    assert_eq!(fmt["drv"], "raw");
    assert_eq!(fmt["image"]["virtual-size"], 4 << 20);
    assert_eq!(fmt["file"], img.to_str().unwrap());
    assert_eq!(fmt["ro"], false);
}

#[test]
fn iothreads_are_real_threads_and_in_use_ones_cannot_be_deleted() {
    let d = Daemon::start(Impl::Blkd, &["--object", "iothread,id=io0"]);
    let mut qmp = d.qmp();
    qmp.ok(
        "object-add",
        json!({"qom-type": "iothread", "id": "io1", "poll-max-ns": 0, "poll-grow": 3}),
    );
    let (_, dup) = qmp.err("object-add", json!({"qom-type": "iothread", "id": "io1"}));
    assert_eq!(
        dup,
        "attempt to add duplicate property 'io1' to object (type 'container')"
    );
    let threads = qmp.ok("query-iothreads", json!({}));
    let list = threads.as_array().unwrap();
    assert_eq!(list.len(), 2);
    // QEMU's defaults, and what object-add set.
    let params = |t: &Value| {
        ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"].map(|k| t[k].as_i64().unwrap())
    };
    let by_id = |id: &str| list.iter().find(|t| t["id"] == id).unwrap();
    assert_eq!(params(by_id("io0")), [32768, 0, 0, 0]);
    assert_eq!(params(by_id("io1")), [0, 3, 0, 0]);
    let (_, negative) = qmp.err(
        "object-add",
        json!({"qom-type": "iothread", "id": "io2", "poll-max-ns": -1}),
    );
    assert_eq!(
        negative,
        "poll-max-ns value must be in range [0, 9223372036854775807]"
    );
    let pid = d.child.id();
    for t in list {
        let tid = t["thread-id"].as_i64().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), t["id"].as_str().unwrap());
    }
    let sock = d.path("nbd.sock");
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0"}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "iothread": "io1"}),
    );
    let (_, busy) = qmp.err("object-del", json!({"id": "io1"}));
    assert!(busy.contains("io1") && busy.contains("in use"), "{busy}");
    qmp.ok("block-export-del", json!({"id": "e0"}));
    qmp.ok("object-del", json!({"id": "io1"}));
    let (_, missing) = qmp.err("object-del", json!({"id": "io1"}));
    assert_eq!(missing, "object 'io1' not found");
    let left = qmp.ok("query-iothreads", json!({}));
    assert_eq!(left.as_array().unwrap().len(), 1);
    let tid = left[0]["thread-id"].as_i64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists());
}

/// QSD wraps a port over 65535 round (70000 listens on 4464); blkd refuses it.
#[test]
fn out_of_range_port_is_refused() {
    let d = Daemon::start(Impl::Blkd, &[]);
    let (class, desc) = d.qmp().err(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "70000"}}}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "Failed to parse port '70000'");
}

#[test]
fn export_argument_errors_match_qsd() {
    let (ours, theirs) = both(|d| {
        let nbd = d.path("nbd.sock");
        let long = "x".repeat(4097);
        vec![
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "null0", "size": 1048576}),
            ),
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "ro0", "read-only": true}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0"}),
            ),
            ("nbd-server-stop", json!({})),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "path": nbd}}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": 1}}}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": d.path("missing/nbd.sock")}}}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "no-such-service"}}}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "inet", "data": {"host": "256.1.1.1", "port": "0"}}}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd}}, "max-connections": -1}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd}}, "tls-creds": "nope"}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "", "node-name": "null0"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "nope"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "iothread": "noiot"}),
            ),
            (
                "block-export-add",
                json!({"type": "nope", "id": "e0", "node-name": "null0"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "ro0", "writable": true}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "name": long}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "description": long}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "bitmaps": ["nobitmap"]}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "bitmaps": "b0"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "writable": "yes"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "num-queues": 1}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0", "name": "x".repeat(4096)}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "null0"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "null0", "name": "null0"}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "null0", "name": ""}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "null0"}),
            ),
            ("blockdev-del", json!({"node-name": "null0"})),
            ("query-block-exports", json!({})),
            ("block-export-del", json!({"id": "nope"})),
            ("block-export-del", json!({"id": "e0", "mode": "soft"})),
            ("block-export-del", json!({"id": "e0"})),
            ("nbd-server-remove", json!({"name": "nope"})),
            ("query-block-exports", json!({})),
            ("nbd-server-stop", json!({})),
            ("query-block-exports", json!({})),
            ("nbd-server-stop", json!({})),
        ]
    });
    assert_same(&ours, &theirs);
}

#[test]
fn vhost_user_blk_argument_errors_match_qsd() {
    let (ours, theirs) = both(|d| {
        let s = |n: &str| json!({"type": "unix", "path": d.path(n)});
        let vu = |id: &str, extra: Value| {
            let mut a = json!({"type": "vhost-user-blk", "id": id, "node-name": "null0", "addr": s("v.sock")});
            for (k, v) in extra.as_object().unwrap() {
                a[k] = v.clone();
            }
            a
        };
        vec![
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "null0", "size": 1048576}),
            ),
            ("block-export-add", vu("q0", json!({"num-queues": 0}))),
            ("block-export-add", vu("q1", json!({"num-queues": 65536}))),
            ("block-export-add", vu("q2", json!({"num-queues": -1}))),
            ("block-export-add", vu("q3", json!({"num-queues": "2"}))),
            (
                "block-export-add",
                vu("l1", json!({"logical-block-size": 1000})),
            ),
            (
                "block-export-add",
                vu("l2", json!({"logical-block-size": 256})),
            ),
            (
                "block-export-add",
                vu("l3", json!({"logical-block-size": 4194304})),
            ),
            (
                "block-export-add",
                vu(
                    "a1",
                    json!({"addr": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
                ),
            ),
            (
                "block-export-add",
                vu(
                    "a2",
                    json!({"addr": {"type": "unix", "path": d.path("nodir/x.sock")}}),
                ),
            ),
            (
                "block-export-add",
                vu(
                    "a3",
                    json!({"addr": {"type": "unix", "path": d.path("v.sock"), "bogus": 1}}),
                ),
            ),
            (
                "block-export-add",
                vu("a4", json!({"addr": {"type": "fd", "str": "nosuchfd"}})),
            ),
            (
                "block-export-add",
                json!({"type": "vhost-user-blk", "id": "m0", "node-name": "null0"}),
            ),
            (
                "block-export-add",
                vu("v0", json!({"num-queues": 2, "logical-block-size": 4096})),
            ),
            ("query-block-exports", json!({})),
            ("block-export-del", json!({"id": "v0"})),
            ("query-block-exports", json!({})),
        ]
    });
    assert_same(&ours, &theirs);
    assert_eq!(
        ours[5]["error"]["desc"],
        "parameter logical-block-size must be a power of 2 between 512 and 2097152"
    );
}

#[test]
fn logical_block_size_zero_is_refused_unlike_qsd() {
    let d = Daemon::start(Impl::Blkd, &[]);
    let mut qmp = d.qmp();
    qmp.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "null0"}),
    );
    let (_, e) = qmp.err(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "v0", "node-name": "null0",
               "addr": {"type": "unix", "path": d.path("v.sock")}, "logical-block-size": 0}),
    );
    assert_eq!(
        e,
        "parameter logical-block-size must be a power of 2 between 512 and 2097152"
    );
}

#[test]
fn bitmap_commands_match_qsd() {
    let (ours, theirs) = both(|d| {
        let nbd = d.path("nbd.sock");
        vec![
            (
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "top", "size": 16777216}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "top", "name": "b0"}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "top", "name": "b0"}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "top", "name": "b1", "granularity": 1000}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "nonode", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "top", "name": "b1", "granularity": 512, "disabled": true}),
            ),
            (
                "block-dirty-bitmap-enable",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-enable",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-disable",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-disable",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-clear",
                json!({"node": "top", "name": "nope"}),
            ),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "top", "target": "b0", "bitmaps": ["nope"]}),
            ),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "top", "target": "b0", "bitmaps": ["b1"]}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "top", "bitmaps": ["b0"]}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "top", "bitmaps": ["b1"]}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e2", "node-name": "top", "name": "x", "bitmaps": ["b1"]}),
            ),
            (
                "block-dirty-bitmap-remove",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-enable",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-clear",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "top", "target": "b0", "bitmaps": ["b1"]}),
            ),
            ("block-export-del", json!({"id": "e1"})),
            (
                "block-dirty-bitmap-remove",
                json!({"node": "top", "name": "b1"}),
            ),
            (
                "block-dirty-bitmap-remove",
                json!({"node": "top", "name": "b1"}),
            ),
        ]
    });
    assert_same(&ours, &theirs);
}
