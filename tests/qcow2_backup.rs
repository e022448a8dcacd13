//! qcow2 chains, allocation depth and dirty bitmaps over NBD: maps compared
//! with qemu-storage-daemon, and an incremental backup end to end.

mod common;

use std::path::Path;

use common::{run_ok, Daemon, Impl};
use serde_json::{json, Value};
use vhost_blk::test_utils::{Client, ClientOptions};

fn qemu_img(args: &[&str]) {
    run_ok("qemu-img", args);
}

fn qemu_io(img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    run_ok("qemu-io", &args);
}

/// base <- mid <- top, 4 MiB, with data in each layer and an explicit zero
/// cluster in top.
fn make_chain(dir: &Path, layers: usize) -> String {
    let base = dir.join("base.qcow2").display().to_string();
    let mid = dir.join("mid.qcow2").display().to_string();
    let top = dir.join("top.qcow2").display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "4M"]);
    qemu_io(&base, &["write -P 0x11 0 1M", "write -P 0x12 2M 64k"]);
    let mut below = base.clone();
    if layers >= 3 {
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid,
        ]);
        qemu_io(&mid, &["write -P 0x21 512k 128k"]);
        below = mid.clone();
    }
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &below, "-F", "qcow2", &top,
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x31 64k 64k",
            "write -z 128k 64k",
            "write -P 0x32 3M 64k",
        ],
    );
    top
}

fn start_on_chain(which: Impl, layers: usize) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path(), layers);
    let sock = dir.path().join("nbd.sock");
    Daemon::start_in(
        which,
        dir,
        &[
            "--blockdev",
            &format!("qcow2,node-name=top,file.driver=file,file.filename={top},read-only=on"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "nbd,id=e0,node-name=top,name=top,allocation-depth=on",
        ],
    )
}

#[test]
fn allocation_depth_and_base_allocation_maps_match_qsd() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    for layers in [2, 3] {
        let mut maps = Vec::new();
        for which in [Impl::Blkd, Impl::Qsd] {
            let d = start_on_chain(which, layers);
            let uri = format!("nbd+unix:///top?socket={}", d.path("nbd.sock").display());
            let depth = run_ok("nbdinfo", &["--map=qemu:allocation-depth", &uri]);
            let base = run_ok("nbdinfo", &["--map", &uri]);
            let img_map = run_ok(
                "qemu-img",
                &["map", "--output=json", "--image-opts",
                  &format!("driver=nbd,server.type=unix,server.path={},export=top,x-dirty-bitmap=qemu:allocation-depth", d.path("nbd.sock").display())],
            );
            let contents = run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-O",
                    "raw",
                    &uri,
                    d.path("out.raw").to_str().unwrap(),
                ],
            );
            let _ = contents;
            let data = std::fs::read(d.path("out.raw")).unwrap();
            maps.push((depth, base, img_map, data));
        }
        let (ours, theirs) = (&maps[0], &maps[1]);
        assert_eq!(
            ours.0, theirs.0,
            "{layers} layers: allocation-depth maps differ"
        );
        assert_eq!(
            ours.1, theirs.1,
            "{layers} layers: base:allocation maps differ"
        );
        assert_eq!(ours.2, theirs.2, "{layers} layers: qemu-img map differs");
        assert!(ours.3 == theirs.3, "{layers} layers: contents differ");
        // The three states are all there: local, backing, unallocated.
        assert!(ours.0.contains("local"), "{}", ours.0);
        assert!(ours.0.contains("backing depth 2"), "{}", ours.0);
        assert!(ours.0.contains("absent"), "{}", ours.0);
    }
}

/// Reads the dirty extents of `bitmap` over NBD: (offset, length) pairs.
fn dirty_extents(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let out = run_ok(
        "nbdinfo",
        &["--json", &format!("--map=qemu:dirty-bitmap:{bitmap}"), uri],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn incremental_backup_through_dirty_bitmap() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    common::make_image(&img, 8 << 20, 0x5);
    let backup = dir.path().join("backup.raw");
    let vsock = dir.path().join("vhost.sock");
    let nsock = dir.path().join("nbd.sock");
    let d = Daemon::start_in(
        Impl::Blkd,
        dir,
        &[
            "--blockdev",
            &format!("file,node-name=file0,filename={}", img.display()),
            "--blockdev",
            "raw,node-name=disk0,file=file0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nsock.display()),
        ],
    );
    let mut qmp = d.qmp();
    // Full backup, then start tracking.
    std::fs::copy(&img, &backup).unwrap();
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b0"}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "v0", "node-name": "disk0", "writable": true,
               "addr": {"type": "unix", "path": vsock}}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w0", "node-name": "disk0", "name": "rw", "writable": true}),
    );
    // Guest writes through vhost-user-blk, a tool writes through NBD.
    {
        let mut c = Client::connect(&vsock, &ClientOptions::default()).unwrap();
        assert_eq!(c.queue(0).write(2048, &[0xee; 4096]).unwrap(), 0);
        assert_eq!(
            c.queue(0).discard_write_zeroes(13, 8192, 128, 0).unwrap(),
            0
        );
    }
    let rw = format!("nbd+unix:///rw?socket={}", nsock.display());
    // Large enough (and without FUA: writeback) to be spliced into the file, a path that
    // must mark the bitmap too.
    run_ok(
        "qemu-io",
        &[
            "-t",
            "writeback",
            "-f",
            "raw",
            "-c",
            "write -P 0x99 6M 700k",
            &rw,
        ],
    );
    // Freeze the bitmap and export it read-only for the backup.
    qmp.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk0", "name": "b0"}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "bk", "node-name": "disk0", "name": "bk", "bitmaps": ["b0"]}),
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let entry = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap();
    assert_eq!(entry["dirty-bitmaps"][0]["busy"], true);
    let uri = format!("nbd+unix:///bk?socket={}", nsock.display());
    let extents = dirty_extents(&uri, "b0");
    assert!(!extents.is_empty());
    let total: u64 = extents.iter().map(|e| e.1).sum();
    assert!(total < 2 << 20, "too much marked dirty: {total}");
    // Copy only the dirty extents into the backup.
    let src = std::fs::read(&img).unwrap();
    let mut dst = std::fs::read(&backup).unwrap();
    for (off, len) in &extents {
        let (o, l) = (*off as usize, *len as usize);
        dst[o..o + l].copy_from_slice(&src[o..o + l]);
    }
    std::fs::write(&backup, dst).unwrap();
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            backup.to_str().unwrap(),
        ],
    );
    // Without the dirty extents the backup would differ: the test can fail.
    assert!(extents
        .iter()
        .any(|(o, l)| *o <= 2048 * 512 && o + l > 2048 * 512));
    assert!(extents
        .iter()
        .any(|(o, l)| *o <= 6 << 20 && o + l > 6 << 20));
}
