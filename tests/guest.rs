//! A real Linux guest on a vhost-user-blk export: scripts/guest-test.sh boots
//! a Debian cloud kernel with a busybox initramfs under QEMU (TCG), runs block
//! checks in the guest (O_DIRECT data, queue count, block size, discard,
//! write zeroes, fio verify, reboot and reconnect) and checks the image on the
//! host. The same script runs against qemu-storage-daemon, the oracle, so a
//! failure only against blkd is blkd's.

mod common;

use std::path::Path;
use std::process::Command;

use common::BLKD;

/// Runs the script against `daemon`; panics with its whole report on failure.
fn run_guest_test(daemon: &str, extra_args: &[&str]) {
    if common::missing_tools(&["qemu-system-x86_64"]) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest-test.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--daemon", daemon])
        .args(extra_args)
        .output()
        .expect("run scripts/guest-test.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "guest test against {daemon} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    assert!(
        stdout.contains(&format!("guest-test: PASS against {daemon}")),
        "guest test against {daemon} exited 0 without a PASS line:\n{stderr}\n{stdout}"
    );
    eprintln!("{stderr}{stdout}");
}

#[test]
fn guest_on_blkd() {
    run_guest_test("blkd", &["--blkd", BLKD]);
}

#[test]
fn guest_on_qsd() {
    run_guest_test("qsd", &[]);
}
