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
/// - onraw.qcow2 on the raw rawbase.img, and window.img under a raw window;
/// - v2.qcow2 (compat=0.10) and lazy.qcow2 (lazy refcounts);
/// - bm.qcow2 with the bitmaps b0 (enabled) and b1 (disabled);
/// - top.qcow2, whose backing base2.qcow2 is given inline;
/// - nul.qcow2 and oth.qcow2 on base.qcow2, opened with no backing and with
///   other.qcow2 as the backing, so that only a `json:` name describes them.
fn make_images(dir: &Path) {
    let img = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let create = |name: &str, opts: &str| {
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, &img(name), "4M"],
        );
    };
    // The header names the backing relative to the image, as users do.
    let overlay = |name: &str, backing: &str, format: &str| {
        let args = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", format];
        run_ok("qemu-img", &[&args[..], &[&img(name)]].concat());
    };
    for name in ["base.qcow2", "bm.qcow2", "base2.qcow2", "other.qcow2"] {
        create(name, "compat=1.1");
    }
    create("v2.qcow2", "compat=0.10");
    create("lazy.qcow2", "lazy_refcounts=on");
    overlay("mid.qcow2", "base.qcow2", "qcow2");
    overlay("chain.qcow2", "mid.qcow2", "qcow2");
    for name in ["rawbase.img", "window.img"] {
        run_ok("qemu-img", &["create", "-q", "-f", "raw", &img(name), "4M"]);
    }
    overlay("onraw.qcow2", "rawbase.img", "raw");
    overlay("top.qcow2", "base2.qcow2", "qcow2");
    overlay("nul.qcow2", "base.qcow2", "qcow2");
    overlay("oth.qcow2", "base.qcow2", "qcow2");
    run_ok("qemu-img", &["bitmap", "--add", &img("bm.qcow2"), "b0"]);
    run_ok(
        "qemu-img",
        &["bitmap", "--add", "--disable", &img("bm.qcow2"), "b1"],
    );
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
    /// blockdev-del of mid.qcow2's nodes, which a header opened.
    refused: Vec<(String, String)>,
    /// Bitmaps listed in bm's image after b0 is removed.
    after_remove: Value,
    writable_backing: (String, String),
}

fn report(which: Impl) -> Report {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let d = dir.path().to_str().unwrap().to_string();
    let mut blockdevs = Vec::new();
    // A file node and a format node on it, for each image opened plainly.
    for (node, image, extra) in [
        ("chain", "chain.qcow2", ""),
        ("onraw", "onraw.qcow2", ""),
        ("v2", "v2.qcow2", ""),
        ("lazy", "lazy.qcow2", ""),
        ("bm", "bm.qcow2", ""),
        // Nodes that only a json: name describes.
        ("nul", "nul.qcow2", ",backing="),
        ("oth", "oth.qcow2", ",backing=other"),
    ] {
        if node == "oth" {
            blockdevs.push(format!(
                "qcow2,node-name=other,read-only=on,file.driver=file,file.filename={d}/other.qcow2"
            ));
        }
        blockdevs.push(format!("file,node-name={node}-file,filename={d}/{image}"));
        blockdevs.push(format!("qcow2,node-name={node},file={node}-file{extra}"));
    }
    blockdevs.push(format!(
        "qcow2,node-name=top,file.driver=file,file.filename={d}/top.qcow2,\
         backing.driver=qcow2,backing.node-name=b2,\
         backing.file.driver=file,backing.file.node-name=b2f,\
         backing.file.filename={d}/base2.qcow2"
    ));
    blockdevs.push(format!("file,node-name=rf,filename={d}/window.img"));
    for plain in [
        "raw,node-name=window,file=rf,offset=4096,size=8192",
        "null-co,node-name=n0",
        "null-co,node-name=n1,read-zeroes=off,latency-ns=5",
        "null-co,node-name=n2,size=1000",
    ] {
        blockdevs.push(plain.to_string());
    }
    let args: Vec<&str> = blockdevs
        .iter()
        .flat_map(|b| ["--blockdev", b.as_str()])
        .collect();
    let daemon = Daemon::start(which, &args);
    let mut qmp = daemon.qmp();
    // Commands take the names of nodes a header opened, as QEMU's do.
    let listing = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    // mid.qcow2's qcow2 and file nodes.
    let mid_node = |driver: &str| -> Value {
        let path = format!("{d}/mid.qcow2");
        let nodes = listing.as_array().unwrap();
        let node = nodes
            .iter()
            .find(|n| n["drv"] == driver && n["file"] == path);
        node.unwrap_or_else(|| panic!("no {driver} node for {path}"))["node-name"].clone()
    };
    let (mid, mid_file) = (mid_node("qcow2"), mid_node("file"));
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": mid, "name": "on-mid"}),
    );
    // Only what blockdev-add created can be deleted.
    let mut refused = Vec::new();
    for name in [&mid, &mid_file] {
        let (class, desc) = qmp.err("blockdev-del", json!({"node-name": name}));
        let desc = desc
            .replace(mid.as_str().unwrap(), "MID")
            .replace(mid_file.as_str().unwrap(), "MID-FILE");
        refused.push((class, desc));
    }
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
        refused,
        after_remove,
        writable_backing,
    }
}

fn chain_named(list: &Value, name: &str) -> Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
        .unwrap_or_else(|| panic!("no node {name}"))
        .clone()
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
    let chain = |list: &Value| chain_named(list, "chain");
    let nested = chain(&blkd.nested);
    assert_eq!(nested["backing_file_depth"], 2);
    assert_eq!(nested["backing_file"], "DIR/mid.qcow2");
    assert_eq!(nested["image"]["backing-filename"], "mid.qcow2");
    assert_eq!(
        nested["image"]["backing-image"]["backing-image"]["filename"],
        "DIR/base.qcow2"
    );
    assert_eq!(chain(&blkd.flat)["backing_file_depth"], 0);
    assert_eq!(
        chain_named(&blkd.flat, "oth")["file"],
        "json:{\"backing\": {\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \
         \"filename\": \"DIR/other.qcow2\"}}, \"driver\": \"qcow2\", \"file\": {\"driver\": \
         \"file\", \"filename\": \"DIR/oth.qcow2\"}}"
    );
    assert_eq!(
        chain_named(&blkd.flat, "oth")["backing_file"],
        "DIR/other.qcow2"
    );
    assert_eq!(chain_named(&blkd.flat, "n0")["file"], "null-co://");
    let header_opened = blkd
        .flat
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "#auto" && n["ro"] == true);
    // base and mid: a qcow2 and a file node each; rawbase: raw and file;
    // and the inline file of the read-only node other.
    assert_eq!(header_opened.count(), 7);
    assert_eq!(
        blkd.after_remove,
        json!([{"flags": ["in-use"], "granularity": 65536, "name": "b1"}])
    );
    assert_eq!(blkd.after_remove, qsd.after_remove);
    assert_eq!(
        blkd.refused[0].1,
        "Node 'MID' is busy: node is used as backing hd of 'chain'"
    );
    assert_eq!(
        blkd.refused[1].1,
        "Node MID-FILE is not owned by the monitor"
    );
    assert_eq!(blkd.refused, qsd.refused);
    assert_eq!(
        blkd.writable_backing.1,
        "Cannot export read-only node as writable"
    );
    assert_eq!(blkd.writable_backing, qsd.writable_backing);
}

/// What `blockdev-del`, `block_resize` and exports say about nodes a header
/// opened and nodes an export outlives, as a transcript of replies with the
/// `#block<N>` names replaced.
fn deletion_transcript(which: Impl) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let create = |args: &[&str]| run_ok("qemu-img", &[&["create", "-q"][..], args].concat());
    create(&["-f", "qcow2", &format!("{d}/base.qcow2"), "4M"]);
    create(&[
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &format!("{d}/top.qcow2"),
    ]);
    let daemon = Daemon::start(
        which,
        &[
            "--blockdev",
            &format!("qcow2,node-name=top,file.driver=file,file.filename={d}/top.qcow2"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={d}/nbd.sock"),
        ],
    );
    let mut qmp = daemon.qmp();
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let backing = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == "qcow2" && n["node-name"] != "top")
        .expect("the header's backing node is listed")["node-name"]
        .as_str()
        .unwrap()
        .to_string();
    let mut transcript = Vec::new();
    let run = |qmp: &mut common::Qmp, name: &str, args: Value| {
        let reply = qmp.cmd(name, args).to_string().replace(&backing, "BACKING");
        format!("{name}: {reply}")
    };
    transcript.push(run(
        &mut qmp,
        "block_resize",
        json!({"node-name": backing, "size": 1 << 20}),
    ));
    transcript.push(run(
        &mut qmp,
        "block_resize",
        json!({"node-name": "top", "size": (4 << 20) + 1000}),
    ));
    transcript.push(run(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top"}),
    ));
    transcript.push(run(&mut qmp, "blockdev-del", json!({"node-name": backing})));
    transcript.push(run(&mut qmp, "block-export-del", json!({"id": "e0"})));
    // An export keeps an inline child alive after its parent is deleted;
    // the child goes with the export.
    transcript.push(run(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "p1",
               "file": {"driver": "null-co", "node-name": "nc"}}),
    ));
    transcript.push(run(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "nc"}),
    ));
    transcript.push(run(&mut qmp, "blockdev-del", json!({"node-name": "nc"})));
    transcript.push(run(&mut qmp, "blockdev-del", json!({"node-name": "p1"})));
    let names = |qmp: &mut common::Qmp| -> Vec<String> {
        let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
        let mut names: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .filter(|n| !n.starts_with("#block"))
            .collect();
        names.sort();
        names
    };
    transcript.push(format!("nodes: {:?}", names(&mut qmp)));
    transcript.push(run(&mut qmp, "block-export-del", json!({"id": "e1"})));
    // The deletion may finish after the reply.
    std::thread::sleep(std::time::Duration::from_millis(300));
    transcript.push(format!("nodes: {:?}", names(&mut qmp)));
    transcript.push(run(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "nc"}),
    ));
    transcript.push(run(&mut qmp, "blockdev-del", json!({"node-name": "nc"})));
    transcript
}

#[test]
fn deleting_and_resizing_nodes_as_qsd() {
    if missing_tools(&["qemu-img", "qemu-storage-daemon"]) {
        return;
    }
    let ours = deletion_transcript(Impl::Blkd);
    let theirs = deletion_transcript(Impl::Qsd);
    assert_eq!(ours, theirs);
    // What the comparison rests on.
    assert!(ours[0].contains("Node 'BACKING' is busy: node is used as backing hd of 'top'"));
    assert!(ours[1].contains("The new size must be a multiple of 512"));
    assert!(ours[3].contains("is busy"), "{ours:?}");
    assert_eq!(ours[9], "nodes: [\"nc\", \"top\"]");
    assert_eq!(ours[11], "nodes: [\"top\"]");
}
