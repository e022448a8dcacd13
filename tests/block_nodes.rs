//! `query-named-block-nodes` as orchestrators read it: every node of a
//! backing chain, the image details of each (cluster size, qcow2 features,
//! stored bitmaps, backing file names) and the backing images, compared
//! entry by entry with what qemu-storage-daemon reports for the same images.

mod common;

use std::path::Path;

use common::{missing_tools, run_ok, Daemon, Impl};
use serde_json::{json, Value};

/// The images, made afresh for each daemon (a killed daemon leaves its
/// bitmaps marked in use):
/// - chain.qcow2 on mid.qcow2 on base.qcow2, backings named in the headers;
/// - onraw.qcow2 on the raw rawbase.img;
/// - v2.qcow2 (compat=0.10) and lazy.qcow2 (lazy refcounts);
/// - bm.qcow2 with the bitmaps b0 (enabled) and b1 (disabled);
/// - top.qcow2, whose backing base2.qcow2 is given inline.
fn make_images(dir: &Path) {
    let img = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let create = |args: &[&str]| {
        let mut all = vec!["create", "-q"];
        all.extend_from_slice(args);
        run_ok("qemu-img", &all);
    };
    create(&["-f", "qcow2", &img("base.qcow2"), "4M"]);
    create(&[
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &img("mid.qcow2"),
    ]);
    create(&[
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &img("chain.qcow2"),
    ]);
    create(&["-f", "raw", &img("rawbase.img"), "4M"]);
    create(&[
        "-f",
        "qcow2",
        "-b",
        "rawbase.img",
        "-F",
        "raw",
        &img("onraw.qcow2"),
    ]);
    create(&["-f", "qcow2", "-o", "compat=0.10", &img("v2.qcow2"), "4M"]);
    create(&[
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        &img("lazy.qcow2"),
        "4M",
    ]);
    create(&["-f", "qcow2", &img("bm.qcow2"), "4M"]);
    run_ok("qemu-img", &["bitmap", "--add", &img("bm.qcow2"), "b0"]);
    run_ok(
        "qemu-img",
        &["bitmap", "--add", "--disable", &img("bm.qcow2"), "b1"],
    );
    create(&["-f", "qcow2", &img("base2.qcow2"), "4M"]);
    create(&[
        "-f",
        "qcow2",
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        &img("top.qcow2"),
    ]);
}

/// Replaces the directory and automatic node names, which differ between
/// runs, and drops what the host decides (`actual-size`).
fn normalise(value: &mut Value, dir: &str) {
    match value {
        Value::String(s) => {
            *s = s.replace(dir, "DIR");
            if s.starts_with("#block") {
                *s = "#auto".into();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| normalise(v, dir)),
        Value::Object(map) => {
            map.remove("actual-size");
            map.values_mut().for_each(|v| normalise(v, dir));
        }
        _ => {}
    }
}

/// Where `ours` and `theirs` differ, as JSON pointers with both values.
fn differences(ours: &Value, theirs: &Value, at: &str, found: &mut Vec<String>) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let (x, y) = (a.get(key), b.get(key));
                match (x, y) {
                    (Some(x), Some(y)) => differences(x, y, &format!("{at}/{key}"), found),
                    _ => found.push(format!("{at}/{key}: {x:?} against {y:?}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(x, y, &format!("{at}/{i}"), found);
            }
        }
        (a, b) if a != b => found.push(format!("{at}: {a} against {b}")),
        _ => {}
    }
}

struct Report {
    nested: Value,
    flat: Value,
    /// Bitmaps listed in bm's image after b0 is removed.
    after_remove: Value,
    writable_backing: (String, String),
}

fn report(which: Impl) -> Report {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let d = dir.path().to_str().unwrap().to_string();
    let file_node = |node: &str, image: &str| format!("file,node-name={node},filename={d}/{image}");
    let daemon = Daemon::start(
        which,
        &[
            "--blockdev",
            &file_node("cf", "chain.qcow2"),
            "--blockdev",
            "qcow2,node-name=chain,file=cf",
            "--blockdev",
            &file_node("of", "onraw.qcow2"),
            "--blockdev",
            "qcow2,node-name=onraw,file=of",
            "--blockdev",
            &file_node("vf", "v2.qcow2"),
            "--blockdev",
            "qcow2,node-name=v2,file=vf",
            "--blockdev",
            &file_node("lf", "lazy.qcow2"),
            "--blockdev",
            "qcow2,node-name=lazy,file=lf",
            "--blockdev",
            &file_node("bf", "bm.qcow2"),
            "--blockdev",
            "qcow2,node-name=bm,file=bf",
            "--blockdev",
            &format!(
                "qcow2,node-name=top,file.driver=file,file.filename={d}/top.qcow2,\
                 backing.driver=qcow2,backing.node-name=b2,\
                 backing.file.driver=file,backing.file.node-name=b2f,\
                 backing.file.filename={d}/base2.qcow2"
            ),
        ],
    );
    let mut qmp = daemon.qmp();
    let mut nested = qmp.ok("query-named-block-nodes", json!({}));
    let mut flat = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    normalise(&mut nested, &d);
    normalise(&mut flat, &d);
    qmp.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "bm", "name": "b0"}),
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let bm = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "bm")
        .unwrap();
    let after_remove = bm["image"]["format-specific"]["data"]["bitmaps"].clone();
    let writable_backing = qmp.err(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "b2", "writable": true}),
    );
    Report {
        nested,
        flat,
        after_remove,
        writable_backing,
    }
}

#[test]
fn named_block_nodes_describe_images_and_chains_as_qsd() {
    if missing_tools(&["qemu-img", "qemu-storage-daemon"]) {
        return;
    }
    let blkd = report(Impl::Blkd);
    let qsd = report(Impl::Qsd);
    for (what, ours, theirs) in [
        ("nested", &blkd.nested, &qsd.nested),
        ("flat", &blkd.flat, &qsd.flat),
    ] {
        let ours = ours.as_array().unwrap();
        let theirs = theirs.as_array().unwrap();
        let names = |list: &[Value]| -> Vec<String> {
            list.iter()
                .map(|n| format!("{} {}", n["node-name"], n["image"]["filename"]))
                .collect()
        };
        assert_eq!(names(ours), names(theirs), "{what}: the nodes listed");
        for (a, b) in ours.iter().zip(theirs) {
            let mut found = Vec::new();
            differences(a, b, "", &mut found);
            assert!(
                found.is_empty(),
                "{what}: node {} differs from QSD's: {found:#?}",
                b["node-name"]
            );
        }
    }
    // The points the comparison rests on, in case QSD changes.
    let chain = |list: &Value| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "chain")
            .unwrap()
            .clone()
    };
    let nested = chain(&blkd.nested);
    assert_eq!(nested["backing_file_depth"], 2);
    assert_eq!(nested["backing_file"], "DIR/mid.qcow2");
    assert_eq!(nested["image"]["backing-filename"], "mid.qcow2");
    assert_eq!(
        nested["image"]["backing-image"]["backing-image"]["filename"],
        "DIR/base.qcow2"
    );
    assert_eq!(chain(&blkd.flat)["backing_file_depth"], 0);
    let header_opened = blkd
        .flat
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "#auto" && n["ro"] == true);
    // base and mid: a qcow2 and a file node each; rawbase: raw and file.
    assert_eq!(header_opened.count(), 6);
    assert_eq!(
        blkd.after_remove,
        json!([{"flags": ["in-use"], "granularity": 65536, "name": "b1"}])
    );
    assert_eq!(blkd.after_remove, qsd.after_remove);
    assert_eq!(
        blkd.writable_backing.1,
        "Cannot export read-only node as writable"
    );
    assert_eq!(blkd.writable_backing, qsd.writable_backing);
}
