//! `blkd nbd`: the one-line, qemu-nbd style mode, including systemd socket
//! activation as libnbd's `[ server ... ]` syntax uses it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{run_ok, wait_for_path, BLKD};

#[test]
fn serves_a_qcow2_image_read_only_with_allocation_depth() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let img_s = img.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "4M"]);
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x42 0 64k", img_s],
    );
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(BLKD)
        .args([
            "nbd",
            "--read-only",
            "--allocation-depth",
            "--persistent",
            "--socket",
        ])
        .arg(&sock)
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_path(&sock, Duration::from_secs(10)));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let map = run_ok("nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    assert!(map.contains("local") && map.contains("absent"), "{map}");
    let info = run_ok("nbdinfo", &[&uri]);
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("export-size: 4194304"), "{info}");
    // --persistent: still serving after the clients left.
    let size = run_ok("nbdinfo", &["--size", &uri]);
    assert_eq!(size.trim(), "4194304");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn exits_after_the_last_client_without_persistent() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    common::make_image(&img, 1 << 20, 3);
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(BLKD)
        .args(["nbd", "-f", "raw", "-x", "disk", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    assert!(wait_for_path(&sock, Duration::from_secs(10)));
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 4k", &uri]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "blkd nbd kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(!sock.exists());
    assert_eq!(std::fs::read(&img).unwrap()[..4096], [0x77; 4096]);
}

#[test]
fn socket_activation_from_libnbd() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    common::make_image(&img, 2 << 20, 9);
    let out = run_ok(
        "timeout",
        &[
            "20",
            "nbdinfo",
            "--size",
            "--",
            "[",
            BLKD,
            "nbd",
            "-r",
            img.to_str().unwrap(),
            "]",
        ],
    );
    assert_eq!(out.trim(), (2 << 20).to_string());
}
