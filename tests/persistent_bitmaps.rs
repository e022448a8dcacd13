//! Persistent dirty bitmaps in qcow2 images, in QEMU's on-disk format:
//! bitmaps added in blkd are there for qemu-img and qemu-storage-daemon after
//! blkd exits, and blkd reads the ones QEMU stored.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{run_ok, Daemon, Impl};
use serde_json::{json, Value};

fn tools_present() -> bool {
    !common::missing_tools(&["nbdinfo", "qemu-io", "qemu-img", common::QSD])
}

/// Starts `which` on the qcow2 image `img` as node `n0`, with an NBD server
/// on `dir/nbd.sock`, plus `extra` arguments.
fn start(which: Impl, dir: tempfile::TempDir, img: &Path, extra: &[&str]) -> Daemon {
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        "--blockdev".to_string(),
        format!(
            "qcow2,node-name=n0,file.driver=file,file.filename={}",
            img.display()
        ),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", sock.display()),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_in(which, dir, &args)
}

fn uri(d: &Daemon, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        d.path("nbd.sock").display()
    )
}

/// `nbdinfo --map` of a dirty bitmap: (offset, length, dirty) runs.
fn bitmap_map(uri: &str, bitmap: &str) -> Vec<(u64, u64, bool)> {
    let out = run_ok(
        "nbdinfo",
        &["--json", &format!("--map=qemu:dirty-bitmap:{bitmap}"), uri],
    );
    let map: Value = serde_json::from_str(&out).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() & 1 == 1,
            )
        })
        .collect()
}

fn dirty_bytes(map: &[(u64, u64, bool)]) -> u64 {
    map.iter().filter(|e| e.2).map(|e| e.1).sum()
}

/// `qemu-img info`'s bitmaps as (name, granularity, flags).
fn image_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = run_ok(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    );
    let info: Value = serde_json::from_str(&info).unwrap();
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// The `dirty-bitmaps` of node `n0` in `query-named-block-nodes`.
fn node_bitmaps(d: &Daemon) -> Vec<Value> {
    let nodes = d.qmp().ok("query-named-block-nodes", json!({}));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n0")
        .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
        .unwrap_or_default()
}

fn write_over_nbd(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run_ok("qemu-io", &args);
}

fn quit(mut d: Daemon) {
    d.qmp().ok("quit", json!({}));
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{:?} exited with {status}", d.which);
}

fn check_clean(img: &Path) {
    run_ok("qemu-img", &["check", img.to_str().unwrap()]);
}

#[test]
fn bitmaps_added_in_blkd_are_read_by_qemu() {
    if !tools_present() {
        return;
    }
    // The daemons' directories go with them; the image outlives both.
    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"],
    );
    let d = start(Impl::Blkd, tempfile::tempdir().unwrap(), &img, &[]);
    let mut qmp = d.qmp();
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "b0", "persistent": true}),
    );
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "b1", "persistent": true, "granularity": 4096}),
    );
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "transient"}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "rw", "writable": true,
               "bitmaps": ["b0", "b1"]}),
    );
    let rw = uri(&d, "rw");
    write_over_nbd(
        &rw,
        &[
            "write -P 0x41 100k 8k",
            "write -z 1M 192k",
            "write -P 0x42 4190208 4k",
        ],
    );
    let ours = (bitmap_map(&rw, "b0"), bitmap_map(&rw, "b1"));
    assert_eq!(dirty_bytes(&ours.0), 65536 * 5);
    assert_eq!(dirty_bytes(&ours.1), 8192 + 196608 + 4096);
    drop(qmp);
    quit(d);

    check_clean(&img);
    assert_eq!(
        image_bitmaps(&img),
        vec![
            ("b0".to_string(), 65536, vec!["auto".to_string()]),
            ("b1".to_string(), 4096, vec!["auto".to_string()]),
        ]
    );
    // QSD exports the bitmaps blkd stored, with the same bits.
    let qsd = start(
        Impl::Qsd,
        tempfile::tempdir().unwrap(),
        &img,
        &[
            "--export",
            "nbd,id=e0,node-name=n0,name=rw,writable=on,bitmaps.0=b0,bitmaps.1=b1",
        ],
    );
    assert!(common::wait_for_path(
        &qsd.path("nbd.sock"),
        Duration::from_secs(10)
    ));
    let qsd_uri = uri(&qsd, "rw");
    assert_eq!(bitmap_map(&qsd_uri, "b0"), ours.0);
    assert_eq!(bitmap_map(&qsd_uri, "b1"), ours.1);
    quit(qsd);
    check_clean(&img);
}

#[test]
fn bitmaps_stored_by_qemu_are_read_by_blkd() {
    if !tools_present() {
        return;
    }
    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("disk.qcow2");
    let name = img.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", name, "4M"]);
    run_ok("qemu-img", &["bitmap", "--add", name, "q0"]);
    run_ok("qemu-img", &["bitmap", "--add", "-g", "512", name, "q1"]);
    // Writes through QSD, which records them in both enabled bitmaps.
    let qsd = start(
        Impl::Qsd,
        tempfile::tempdir().unwrap(),
        &img,
        &[
            "--export",
            "nbd,id=e0,node-name=n0,name=rw,writable=on,bitmaps.0=q0,bitmaps.1=q1",
        ],
    );
    assert!(common::wait_for_path(
        &qsd.path("nbd.sock"),
        Duration::from_secs(10)
    ));
    let qsd_uri = uri(&qsd, "rw");
    write_over_nbd(&qsd_uri, &["write -P 0x51 3000 5000", "write -z 2M 1M"]);
    let theirs = (bitmap_map(&qsd_uri, "q0"), bitmap_map(&qsd_uri, "q1"));
    assert!(dirty_bytes(&theirs.1) > 1 << 20);
    quit(qsd);

    let d = start(Impl::Blkd, tempfile::tempdir().unwrap(), &img, &[]);
    let listed = node_bitmaps(&d);
    let entry = |n: &str| listed.iter().find(|b| b["name"] == n).cloned().unwrap();
    assert_eq!(entry("q0")["persistent"], true);
    assert_eq!(entry("q0")["recording"], true);
    assert_eq!(entry("q0")["count"], dirty_bytes(&theirs.0));
    assert_eq!(entry("q1")["granularity"], 512);
    assert_eq!(entry("q1")["count"], dirty_bytes(&theirs.1));
    let mut qmp = d.qmp();
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "rw", "writable": true,
               "bitmaps": ["q0", "q1"]}),
    );
    let ours = uri(&d, "rw");
    assert_eq!(bitmap_map(&ours, "q0"), theirs.0);
    assert_eq!(bitmap_map(&ours, "q1"), theirs.1);
    // Removing a bitmap in blkd removes it from the image. nbdinfo may exit
    // before the server has seen it go, and safe mode refuses an export in use.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = qmp.cmd("block-export-del", json!({"id": "e0"}));
        if r.get("return").is_some() {
            break;
        }
        assert_eq!(r["error"]["desc"], "export 'e0' still in use", "{r}");
        assert!(Instant::now() < deadline, "export still in use: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    qmp.event("BLOCK_EXPORT_DELETED");
    qmp.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "n0", "name": "q1"}),
    );
    drop(qmp);
    // SIGTERM stores the bitmaps too.
    assert!(d.terminate().success());
    check_clean(&img);
    assert_eq!(
        image_bitmaps(&img),
        vec![("q0".to_string(), 65536, vec!["auto".to_string()])]
    );
}

#[test]
fn persistent_needs_a_writable_qcow2_node() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let ro_img = dir.path().join("ro.qcow2");
    let raw = dir.path().join("disk.raw");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            ro_img.to_str().unwrap(),
            "1M",
        ],
    );
    common::make_image(&raw, 1 << 20, 1);
    let d = start(
        Impl::Blkd,
        dir,
        &img,
        &[
            "--blockdev",
            &format!(
                "raw,node-name=r0,file.driver=file,file.filename={}",
                raw.display()
            ),
            "--blockdev",
            &format!(
                "qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={}",
                ro_img.display()
            ),
        ],
    );
    let mut qmp = d.qmp();
    let (_, desc) = qmp.err(
        "block-dirty-bitmap-add",
        json!({"node": "r0", "name": "b0", "persistent": true}),
    );
    assert_eq!(
        desc,
        "Can't store persistent bitmaps to r0: Operation not supported"
    );
    let (_, desc) = qmp.err(
        "block-dirty-bitmap-add",
        json!({"node": "ro", "name": "b0", "persistent": true}),
    );
    assert!(
        desc.starts_with("Can't make bitmap 'b0' persistent in 'ro'"),
        "{desc}"
    );
    let (_, desc) = qmp.err(
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": &"x".repeat(1024), "persistent": true}),
    );
    assert!(desc.contains("Name length exceeds maximum"), "{desc}");
}
