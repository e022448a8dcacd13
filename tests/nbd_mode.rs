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

/// `blkd nbd` or `qemu-nbd`, to take the same arguments.
fn qemu_nbd_like(program: &str) -> Command {
    let mut cmd = Command::new(program);
    if program == BLKD {
        cmd.arg("nbd");
    }
    cmd
}

/// Runs qemu-io `commands` on the raw NBD export at `uri`; fails the test if
/// a pattern does not verify.
fn qemu_io_verified(uri: &str, commands: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run_ok("qemu-io", &args);
    assert!(!out.contains("verification failed"), "{uri}: {out}");
}

/// A server killed when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The open flags of `pid`'s descriptor for `path`, from /proc.
fn open_flags(pid: u32, path: &std::path::Path) -> Option<u32> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if std::fs::read_link(entry.path()).ok().as_deref() == Some(path) {
            let fd = entry.file_name();
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_str()?)).ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            return u32::from_str_radix(flags.trim(), 8).ok();
        }
    }
    None
}

fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `--cache=none --discard=unmap --detect-zeroes=unmap`, as a tool would pass
/// them to qemu-nbd: the image is open with O_DIRECT, and zero data written
/// over NBD is punched out of it. qemu-nbd runs the same scenario.
#[test]
fn cache_discard_and_detect_zeroes_options_as_qemu_nbd() {
    if common::missing_tools(&["qemu-io", "qemu-nbd"]) {
        return;
    }
    for program in [BLKD, "qemu-nbd"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.raw");
        std::fs::write(&img, vec![0x55u8; 2 << 20]).unwrap();
        run_ok("sync", &[]);
        let before = allocated(&img);
        let sock = dir.path().join("s.sock");
        let mut cmd = qemu_nbd_like(program);
        let child = cmd
            .args([
                "--cache=none",
                "--aio=threads",
                "--discard=unmap",
                "--detect-zeroes=unmap",
                "-t",
                "-f",
                "raw",
                "-k",
            ])
            .arg(&sock)
            .arg(&img)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let child = KillOnDrop(child);
        assert!(wait_for_path(&sock, Duration::from_secs(10)), "{program}");
        // qemu-nbd listens before it opens the image: wait for both.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let flags = loop {
            match open_flags(child.0.id(), &img) {
                Some(flags) => break flags,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                None => panic!("{program}: the image is not open"),
            }
        };
        assert_ne!(
            flags & libc::O_DIRECT as u32,
            0,
            "{program}: flags {flags:o}"
        );
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        qemu_io_verified(
            &uri,
            &[
                "write -P 0 0 1M",
                "flush",
                "read -P 0 0 1M",
                "read -P 0x55 1M 1M",
            ],
        );
        let after = allocated(&img);
        assert!(
            after + (1 << 20) <= before,
            "{program}: zero data was written, not punched: {before} -> {after} bytes allocated"
        );
    }
}

/// `--handshake-limit`: a client that stays silent after the greeting is
/// dropped after the limit, not the default 10 s.
#[test]
fn handshake_limit_drops_silent_clients() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    common::make_image(&img, 1 << 20, 5);
    let sock = dir.path().join("s.sock");
    let _server = KillOnDrop(
        Command::new(BLKD)
            .args(["nbd", "--handshake-limit=1", "-t", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(&img)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_for_path(&sock, Duration::from_secs(10)));
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let mut greeting = [0u8; 18];
    client.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let start = std::time::Instant::now();
    let mut rest = [0u8; 1];
    let n = client
        .read(&mut rest)
        .expect("the server closes the connection, not the read timeout");
    assert_eq!(n, 0, "the server sent more than its greeting");
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "dropped after {waited:?}, not about 1 s"
    );
}

/// What a client sees of an export: its size and its bytes.
fn export_contents(program: &str, args: &[&str]) -> (u64, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut cmd = qemu_nbd_like(program);
    let _server = KillOnDrop(
        cmd.args(["-t", "-k"])
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_for_path(&sock, Duration::from_secs(10)),
        "{program} {args:?}"
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let size = run_ok("nbdinfo", &["--size", &uri]).trim().parse().unwrap();
    let out = dir.path().join("out.raw");
    run_ok("nbdcopy", &[&uri, out.to_str().unwrap()]);
    (size, std::fs::read(&out).unwrap())
}

/// `-o OFFSET` (a raw node with the offset on top of the image, also over
/// qcow2) and `--image-opts`, side by side with qemu-nbd.
#[test]
fn offset_and_image_opts_as_qemu_nbd() {
    if common::missing_tools(&["nbdinfo", "nbdcopy", "qemu-img", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    common::make_image(&raw, 1 << 20, 7);
    let qcow2 = dir.path().join("b.qcow2");
    let (r, q) = (raw.to_str().unwrap(), qcow2.to_str().unwrap());
    run_ok("qemu-img", &["convert", "-O", "qcow2", "-f", "raw", r, q]);
    let image_opts = format!("driver=qcow2,file.driver=file,file.filename={q}");
    // An empty overlay whose backing is given with no drivers at all.
    let overlay = dir.path().join("c.qcow2");
    let o = overlay.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", q, "-F", "qcow2", o],
    );
    let nested = format!("driver=qcow2,file.filename={o},backing.file.filename={q}");
    let cases: [Vec<&str>; 5] = [
        vec!["-r", "-o", "4096", "-f", "raw", r],
        vec!["-r", "--offset=0x2000", "-f", "qcow2", q],
        vec!["-r", "--image-opts", &image_opts],
        vec!["-r", "--image-opts", "-o", "512", &image_opts],
        vec!["-r", "--image-opts", &nested],
    ];
    let data = std::fs::read(&raw).unwrap();
    let offsets = [4096, 8192, 0, 512, 0];
    for (args, offset) in cases.iter().zip(offsets) {
        let ours = export_contents(BLKD, args);
        assert_eq!(ours.0, (1 << 20) - offset as u64, "{args:?}");
        assert!(
            ours.1 == data[offset..],
            "{args:?}: not the bytes from the offset on"
        );
        let theirs = export_contents("qemu-nbd", args);
        assert_eq!(ours.0, theirs.0, "{args:?}: sizes");
        assert!(
            ours.1 == theirs.1,
            "{args:?}: the contents differ from qemu-nbd's"
        );
    }
    // The overlay's header says its backing is raw: the qcow2 file under it
    // is read as raw bytes, not probed and read as qcow2.
    let as_raw = dir.path().join("d.qcow2");
    let d = as_raw.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", q, "-F", "raw", d],
    );
    let recorded = format!("driver=qcow2,file.filename={d},backing.file.filename={q}");
    let args = ["-r", "--image-opts", &recorded];
    let ours = export_contents(BLKD, &args);
    assert!(
        ours.1.starts_with(b"QFI\xfb"),
        "the backing was not read as raw"
    );
    let theirs = export_contents("qemu-nbd", &args);
    assert_eq!(ours.0, theirs.0, "sizes");
    assert!(ours.1 == theirs.1, "the contents differ from qemu-nbd's");
}

/// A loop device over a file, detached when the test ends.
struct LoopDevice(String);

impl LoopDevice {
    /// None where loop devices cannot be set up (not root, no loop driver).
    fn attach(file: &std::path::Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then_some(LoopDevice(dev))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A block device given as the image is opened with the host_device driver,
/// as qemu-nbd probes it, whether named plainly or in `--image-opts`.
#[test]
fn block_devices_are_served_as_qemu_nbd_serves_them() {
    if common::missing_tools(&["nbdinfo", "nbdcopy", "qemu-nbd", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("dev.img");
    common::make_image(&backing, 2 << 20, 5);
    let Some(dev) = LoopDevice::attach(&backing) else {
        eprintln!("skipped: no loop device can be attached here");
        return;
    };
    let image_opts = format!("driver=raw,file.filename={}", dev.0);
    let cases: [Vec<&str>; 3] = [
        vec!["-r", &dev.0],
        vec!["-r", "-f", "raw", &dev.0],
        vec!["-r", "--image-opts", &image_opts],
    ];
    let data = std::fs::read(&backing).unwrap();
    for args in &cases {
        let ours = export_contents(BLKD, args);
        assert_eq!(ours.0, 2 << 20, "{args:?}: size");
        assert!(ours.1 == data, "{args:?}: not the device's bytes");
        let theirs = export_contents("qemu-nbd", args);
        assert_eq!(ours.0, theirs.0, "{args:?}: sizes");
        assert!(
            ours.1 == theirs.1,
            "{args:?}: the contents differ from qemu-nbd's"
        );
    }
}

/// Whether process `pid` has a file open that was in `dir` and is unlinked.
fn holds_deleted_file_in(pid: u32, dir: &std::path::Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| {
            let target = target.to_string_lossy().into_owned();
            target.starts_with(dir.to_str().unwrap_or("/")) && target.ends_with(" (deleted)")
        })
}

/// `-s`: writes land in a temporary overlay in TMPDIR, which has no name
/// once open, and the image keeps its bytes. qemu-nbd side by side.
#[test]
fn snapshot_writes_to_a_temporary_overlay_as_qemu_nbd() {
    if common::missing_tools(&["qemu-io", "qemu-nbd"]) {
        return;
    }
    for program in [BLKD, "qemu-nbd"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.raw");
        common::make_image(&img, 1 << 20, 11);
        let before = std::fs::read(&img).unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let sock = dir.path().join("s.sock");
        let mut cmd = qemu_nbd_like(program);
        let mut server = KillOnDrop(
            cmd.args(["-s", "-f", "raw", "-k"])
                .arg(&sock)
                .arg(&img)
                .env("TMPDIR", &tmp)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        assert!(wait_for_path(&sock, Duration::from_secs(10)), "{program}");
        // The overlay is in TMPDIR, open and without a name. (qemu-nbd
        // listens before it makes the overlay, so wait for that first.)
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !holds_deleted_file_in(server.0.id(), &tmp) {
            assert!(
                std::time::Instant::now() < deadline,
                "{program}: no open overlay in TMPDIR"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{program}");
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        qemu_io_verified(&uri, &["write -P 0x5a 4k 64k", "read -P 0x5a 4k 64k"]);
        // Without -t the server exits after its last client.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while server.0.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "{program} kept running"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "{program}: the image is untouched"
        );
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{program}");
    }
}

/// `-s` with `-f raw` on a file that looks like qcow2 exports the file's own
/// bytes: the header's backing file (here a "secret" host file) is never
/// opened. A qcow2 image with a backing chain shows the chain. `--fork`
/// leaves the server running with its overlay unlinked. qemu-nbd side by side.
#[test]
fn snapshot_keeps_the_given_format_and_works_with_fork_as_qemu_nbd() {
    if common::missing_tools(&["nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0x73u8; 1 << 20]).unwrap();
    let lure = dir.path().join("lure.qcow2");
    let (s, l) = (secret.to_str().unwrap(), lure.to_str().unwrap());
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", s, "-F", "raw", l],
    );
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", b, "1M"]);
    run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 512k", b]);
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
    );
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 256k 64k", t],
    );
    let lure_bytes = std::fs::read(&lure).unwrap();
    for (args, check) in [
        (vec!["-r", "-s", "-f", "raw", l], Some(&lure_bytes)),
        (vec!["-r", "-s", "-f", "qcow2", t], None),
    ] {
        let ours = export_contents(BLKD, &args);
        if let Some(expected) = check {
            // QEMU rounds sizes up to whole sectors, which read as zeroes.
            assert!(
                ours.1.starts_with(expected),
                "{args:?}: not the file's own bytes"
            );
        }
        let leaked = ours.1.chunks(4096).any(|c| c.iter().all(|&b| b == 0x73));
        assert!(!leaked, "{args:?}: the secret leaked");
        let theirs = export_contents("qemu-nbd", &args);
        assert_eq!(ours.0, theirs.0, "{args:?}: sizes");
        assert!(
            ours.1 == theirs.1,
            "{args:?}: the contents differ from qemu-nbd's"
        );
    }
    // Bounded, on a private socket and TMPDIR, in case it ever serves.
    let tmp_refused = dir.path().join("tmp-refused");
    std::fs::create_dir(&tmp_refused).unwrap();
    let refused = Command::new("timeout")
        .args(["10", BLKD, "nbd", "-s", "-f", "qcow2", "-k"])
        .arg(dir.path().join("r.sock"))
        .arg(&secret)
        .env("TMPDIR", &tmp_refused)
        .output()
        .unwrap();
    assert_eq!(
        refused.status.code(),
        Some(1),
        "a raw file is not a qcow2 base"
    );
    assert_eq!(
        std::fs::read_dir(&tmp_refused).unwrap().count(),
        0,
        "no overlay left"
    );
    // --fork: the parent returns once serving; the overlay has no name.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let sock = dir.path().join("f.sock");
    let pid_file = dir.path().join("pid");
    let status = Command::new(BLKD)
        .args(["nbd", "-s", "--fork", "-t", "-f", "qcow2", "--pid-file"])
        .arg(&pid_file)
        .arg("-k")
        .arg(&sock)
        .arg(&top)
        .env("TMPDIR", &tmp)
        .status()
        .unwrap();
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = holds_deleted_file_in(pid as u32, &tmp);
    let count = std::fs::read_dir(&tmp).unwrap().count();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // Killed first, so that a failing check leaves no server behind.
    let served = std::panic::catch_unwind(|| {
        qemu_io_verified(&uri, &["write -P 0x33 0 4k", "read -P 0x33 0 4k"])
    });
    // SAFETY: kill on the forked server's pid, read from its pid file.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(
        alive,
        "the forked server holds an unlinked overlay from TMPDIR"
    );
    assert_eq!(count, 0, "the overlay has no name");
    assert!(served.is_ok(), "the forked server serves the overlay");
}

/// An image whose format was probed as raw cannot be given a qcow2 header
/// by a client (it would be opened as qcow2 next time, with a backing file
/// the client chose); with `-f raw` it can. qemu-nbd side by side.
#[test]
fn probed_raw_images_refuse_a_forged_header_as_qemu_nbd() {
    if common::missing_tools(&["nbdcopy", "qemu-img", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lure = dir.path().join("lure.qcow2");
    let l = lure.to_str().unwrap();
    let b = "/etc/hostname";
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", b, l],
    );
    let header = std::fs::read(&lure).unwrap();
    for program in [BLKD, "qemu-nbd"] {
        for format in [&[][..], &["-f", "raw"][..]] {
            let img = dir.path().join("img.raw");
            std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
            let sock = dir.path().join("s.sock");
            let _server = KillOnDrop(
                qemu_nbd_like(program)
                    .args(["-t", "-k"])
                    .arg(&sock)
                    .args(format)
                    .arg(&img)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            assert!(wait_for_path(&sock, Duration::from_secs(10)), "{program}");
            let uri = format!("nbd+unix:///?socket={}", sock.display());
            let copied = common::run("nbdcopy", &[l, &uri]).status.success();
            let written = std::fs::read(&img).unwrap().starts_with(&header[..4]);
            assert_eq!(copied, !format.is_empty(), "{program} {format:?}");
            assert_eq!(written, !format.is_empty(), "{program} {format:?}");
            drop(_server);
            let _ = std::fs::remove_file(&sock);
        }
    }
}
