//! `detect-zeroes`: all-zero writes from NBD clients become write-zeroes
//! requests, as qemu-storage-daemon makes them. The same scenario runs
//! against both daemons and the images must end up the same.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{run_ok, Daemon, Impl};
use serde_json::{json, Value};

/// `qemu-img map` of `img` as (start, length, data, zero) entries.
fn map(format: &str, img: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok(
        "qemu-img",
        &["map", "-f", format, "--output=json", img.to_str().unwrap()],
    );
    let entries: Value = serde_json::from_str(&out).unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

struct Outcome {
    qcow2_map: Vec<(u64, u64, bool, bool)>,
    /// The v2 (compat=0.10) image, which has no zero clusters.
    v2_map: Vec<(u64, u64, bool, bool)>,
    /// The qcow2 image whose file node detects zeroes, before and after.
    under_qcow2_allocated: (u64, u64),
    raw_map: Vec<(u64, u64, bool, bool)>,
    raw_allocated_before: u64,
    raw_allocated_after: u64,
    detect_zeroes: Vec<(String, String)>,
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Four images full of 0x55, exported writable; qemu-io writes zero data
/// over NBD into the first MiB of each:
/// - q: a qcow2 node with `detect-zeroes=on`;
/// - r: a raw node on a file node with `detect-zeroes=unmap,discard=unmap`;
/// - c: a qcow2 node on such a file node;
/// - v2: a qcow2 v2 node with `detect-zeroes=on`.
fn zero_writes(which: Impl) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("a.qcow2");
    let raw = dir.path().join("b.raw");
    let under = dir.path().join("c.qcow2");
    let v2 = dir.path().join("d.qcow2");
    let (q, r) = (qcow2.to_str().unwrap(), raw.to_str().unwrap());
    let (c, d) = (under.to_str().unwrap(), v2.to_str().unwrap());
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", q, "2M"]);
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", c, "2M"]);
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", d, "2M"],
    );
    for img in [q, c, d] {
        run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x55 0 2M", img]);
    }
    std::fs::write(&raw, vec![0x55u8; 2 << 20]).unwrap();
    run_ok("sync", &[]);
    let raw_allocated_before = allocated(&raw);
    let under_before = allocated(&under);
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(
        which,
        &[
            "--blockdev",
            &format!("file,node-name=f0,filename={q}"),
            "--blockdev",
            "qcow2,node-name=q0,file=f0,detect-zeroes=on",
            "--blockdev",
            &format!("file,node-name=f1,filename={r},discard=unmap,detect-zeroes=unmap"),
            "--blockdev",
            "raw,node-name=r1,file=f1",
            "--blockdev",
            &format!("file,node-name=f2,filename={c},discard=unmap,detect-zeroes=unmap"),
            "--blockdev",
            "qcow2,node-name=c2,file=f2",
            "--blockdev",
            &format!("qcow2,node-name=v3,file.driver=file,file.filename={d},detect-zeroes=on"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "nbd,id=e0,node-name=q0,name=q,writable=on",
            "--export",
            "nbd,id=e1,node-name=r1,name=r,writable=on",
            "--export",
            "nbd,id=e2,node-name=c2,name=c,writable=on",
            "--export",
            "nbd,id=e3,node-name=v3,name=v2,writable=on",
        ],
    );
    for name in ["q", "r", "c", "v2"] {
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0 0 1M", "-c", "flush", &uri],
        );
        let read = run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0 0 1M",
                "-c",
                "read -P 0x55 1M 1M",
                &uri,
            ],
        );
        assert!(
            !read.contains("Pattern verification failed"),
            "{which:?} {name}: {read}"
        );
    }
    let nodes = daemon.qmp().ok("query-named-block-nodes", json!({}));
    let mut detect_zeroes: Vec<(String, String)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap().to_string(),
                n["detect_zeroes"].as_str().unwrap().to_string(),
            )
        })
        // Automatic names of inline children differ between the daemons.
        .filter(|(name, _)| !name.starts_with('#'))
        .collect();
    detect_zeroes.sort();
    assert!(daemon.terminate().success());
    Outcome {
        qcow2_map: map("qcow2", &qcow2),
        v2_map: map("qcow2", &v2),
        under_qcow2_allocated: (under_before, allocated(&under)),
        raw_map: map("raw", &raw),
        raw_allocated_before,
        raw_allocated_after: allocated(&raw),
        detect_zeroes,
    }
}

#[test]
fn zero_writes_become_zero_clusters_and_holes_as_in_qsd() {
    if common::missing_tools(&["qemu-img", "qemu-io", common::QSD]) {
        return;
    }
    let blkd = zero_writes(Impl::Blkd);
    // qcow2 with `on`: the zeroed MiB is zero clusters, not data.
    assert_eq!(blkd.qcow2_map[0].0, 0);
    assert_eq!(blkd.qcow2_map[0].1, 1 << 20);
    assert!(
        !blkd.qcow2_map[0].2 && blkd.qcow2_map[0].3,
        "{:?}",
        blkd.qcow2_map
    );
    // raw file with `unmap`: the zeroed MiB is a hole now.
    assert_eq!(
        blkd.raw_map[0],
        (0, 1 << 20, false, true),
        "{:?}",
        blkd.raw_map
    );
    assert!(
        blkd.raw_allocated_after + (1 << 20) <= blkd.raw_allocated_before,
        "{} -> {} bytes allocated",
        blkd.raw_allocated_before,
        blkd.raw_allocated_after
    );
    // Zero data that qcow2 writes to a file node detecting zeroes is punched.
    let (before, after) = blkd.under_qcow2_allocated;
    assert!(
        after + (768 << 10) <= before,
        "{before} -> {after} bytes allocated"
    );
    // v2 has no zero clusters; without a backing file, as in QEMU, the
    // zeroed clusters are deallocated.
    assert_eq!(
        blkd.v2_map[0],
        (0, 1 << 20, false, true),
        "{:?}",
        blkd.v2_map
    );
    let qsd = zero_writes(Impl::Qsd);
    assert_eq!(blkd.qcow2_map, qsd.qcow2_map);
    assert_eq!(blkd.v2_map, qsd.v2_map);
    let qsd_after = qsd.under_qcow2_allocated.1;
    assert!(
        after.abs_diff(qsd_after) <= 256 << 10,
        "blkd left {after} bytes allocated, QSD {qsd_after}"
    );
    assert_eq!(blkd.raw_map, qsd.raw_map);
    assert_eq!(blkd.detect_zeroes, qsd.detect_zeroes);
    let expected: Vec<(String, String)> = [
        ("c2", "off"),
        ("f0", "off"),
        ("f1", "unmap"),
        ("f2", "unmap"),
        ("q0", "on"),
        ("r1", "off"),
        ("v3", "on"),
    ]
    .iter()
    .map(|(n, d)| (n.to_string(), d.to_string()))
    .collect();
    assert_eq!(blkd.detect_zeroes, expected);
}

#[test]
fn unmapping_zero_writes_needs_discard_unmap_as_in_qsd() {
    if common::missing_tools(&[common::QSD]) {
        return;
    }
    let mut answers = Vec::new();
    for which in [Impl::Blkd, Impl::Qsd] {
        let daemon = Daemon::start(which, &[]);
        let img = daemon.path("c.raw");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let mut qmp = daemon.qmp();
        let err = qmp.err(
            "blockdev-add",
            json!({"driver": "file", "node-name": "f0", "filename": img,
                   "detect-zeroes": "unmap"}),
        );
        // Nothing was added: the name is free for a valid node.
        qmp.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "f0", "filename": img,
                   "detect-zeroes": "unmap", "discard": "unmap"}),
        );
        answers.push(err);
    }
    assert_eq!(
        answers[0],
        (
            "GenericError".to_string(),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                .to_string()
        )
    );
    assert_eq!(answers[0], answers[1]);
}
