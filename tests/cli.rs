//! The qemu-storage-daemon command line: errors against QSD's, pidfile,
//! daemonize and signals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_for_path, Daemon, Impl, BLKD, QSD};
use serde_json::json;

/// Runs a command line that must fail at start-up; returns the message after
/// the program name.
fn startup_error(program: &str, args: &[String]) -> String {
    // Only guards against a hang: generous for a loaded machine.
    let out = Command::new("timeout")
        .arg("30")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{program} {args:?} did not fail with 1"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let (_, msg) = stderr
        .split_once(": ")
        .unwrap_or_else(|| panic!("no prefix in {stderr:?}"));
    msg.to_string()
}

#[test]
fn startup_errors_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cases: Vec<Vec<String>> = vec![
        vec!["foo".into()],
        vec!["--foo".into()],
        vec!["--blockdev".into()],
        vec!["--blockdev".into(), "node-name=x".into()],
        vec!["--blockdev".into(), "driver=null-co".into()],
        vec!["--blockdev".into(), "driver=nope,node-name=n0".into()],
        vec!["--blockdev".into(), format!("driver=file,node-name=n0,filename={d}/nonexistent")],
        vec!["--blockdev".into(), "driver=null-co,node-name=n0,bogus=1".into()],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--blockdev".into(), "null-co,node-name=n0".into()],
        vec!["--blockdev".into(), "null-co,node-name=n0,size=1M".into()],
        vec!["--blockdev".into(), "null-co,node-name=n0,read-only=maybe".into()],
        vec!["--blockdev".into(), r#"{"driver":"null-co","node-name":"n0","size":"1M"}"#.into()],
        vec!["--nbd-server".into(), "max-connections=1".into()],
        vec!["--nbd-server".into(), "addr.type=unix".into()],
        vec!["--nbd-server".into(), format!("addr.type=unix,addr.path={d}/a.sock,max-connections=abc")],
        vec!["--nbd-server".into(), format!("addr.type=unix,addr.path={d}/a.sock,max-connections=-1")],
        vec!["--nbd-server".into(), format!("addr.type=unix,addr.path={d}/a.sock,tls-creds=nope")],
        vec!["--nbd-server".into(), format!("addr.type=unix,addr.path={d}/a.sock"), "--nbd-server".into(), format!("addr.type=unix,addr.path={d}/b.sock")],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), "nbd,id=e0,node-name=n0".into()],
        vec!["--nbd-server".into(), format!("addr.type=unix,addr.path={d}/c.sock"), "--export".into(), "nbd,id=e0,node-name=nope".into()],
        vec!["--export".into(), "type=nbd,node-name=n0".into()],
        vec!["--export".into(), "id=e0,node-name=n0".into()],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), "vhost-user-blk,id=v0,node-name=n0".into()],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), format!("vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path={d}/v.sock,logical-block-size=1000")],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), format!("vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path={d}/v.sock,num-queues=0")],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), format!("vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path={d}/v.sock,num-queues=65536")],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), format!("vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path={d}/v.sock,num-queues=abc")],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), "vhost-user-blk,id=v0,node-name=n0,addr.type=inet,addr.host=127.0.0.1,addr.port=1".into()],
        vec!["--blockdev".into(), "null-co,node-name=n0".into(), "--export".into(), "vhost-user-blk,id=v0,node-name=n0,addr.type=fd,addr.str=3".into()],
        vec!["--object".into(), "iothread".into()],
        vec!["--object".into(), "iothread,id=iot0".into(), "--object".into(), "iothread,id=iot0".into()],
        vec!["--object".into(), "nope,id=x".into()],
        vec!["--object".into(), "iothread,id=x,poll-max-ns=abc".into()],
        vec!["--object".into(), "iothread,id=x,poll-max-ns=-1".into()],
        vec!["--object".into(), "iothread,id=x,aio-max-batch=-5".into()],
        vec!["--monitor".into(), "chardev=nope".into()],
        vec!["--chardev".into(), format!("socket,id=m,path={d}/m.sock,server=on,wait=off"), "--monitor".into(), "chardev=m,mode=readline".into()],
        vec!["--chardev".into(), format!("socket,id=m,path={d}/nodir/m.sock,server=on,wait=off")],
        vec!["--object".into(), "authz-simple,id=auth0,identity=C=GB,O=QSD Test,CN=qsd-client".into()],
        vec!["--pidfile".into(), format!("{d}/nodir/x.pid")],
    ];
    for args in &cases {
        let ours = startup_error(BLKD, args);
        let theirs = startup_error(QSD, args);
        // QSD's socket paths and ours are the same; only the program differs.
        assert_eq!(ours, theirs, "for {args:?}");
    }
}

#[test]
fn options_apply_in_order_and_keyval_escapes_work() {
    let d = Daemon::start(
        Impl::Blkd,
        &[
            "--object",
            "authz-simple,id=auth0,identity=C=GB,,O=QSD Test,,CN=qsd-client",
            "--blockdev",
            r#"{"driver":"null-co","node-name":"n0","size":1048576}"#,
            "--blockdev",
            "driver=null-co,node-name=n1,",
        ],
    );
    let mut qmp = d.qmp();
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n1", "n0"]);
    assert_eq!(nodes[1]["image"]["virtual-size"], 1048576);
}

#[test]
fn pidfile_is_locked_written_and_removed_and_signals_exit_cleanly() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("blkd.pid");
        let nbd = dir.path().join("nbd.sock");
        let p = pidfile.display().to_string();
        let mut d = Daemon::start_in(
            Impl::Blkd,
            dir,
            &[
                "--pidfile",
                &p,
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", nbd.display()),
            ],
        );
        assert!(wait_for_path(&pidfile, Duration::from_secs(5)));
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        assert_eq!(pid, format!("{}\n", d.child.id()));
        // A second daemon on the same pidfile fails, as with QSD.
        let second = startup_error(BLKD, &["--pidfile".into(), p.clone()]);
        assert_eq!(
            second,
            "cannot create PID file: Cannot lock pid file: Resource temporarily unavailable"
        );
        // SAFETY: kill on our child.
        unsafe { libc::kill(d.child.id() as i32, signal) };
        let status = d.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "signal {signal}");
        assert!(!pidfile.exists(), "pidfile left behind");
        // Better than QSD: the NBD socket goes too.
        assert!(!nbd.exists(), "NBD socket left behind");
        assert!(!d.path("qmp.sock").exists(), "QMP socket left behind");
    }
}

#[test]
fn daemonize_returns_after_startup_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nbd = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("d.pid");
    let status = Command::new(BLKD)
        .args([
            "--daemonize",
            "--pidfile",
            pidfile.to_str().unwrap(),
            "--blockdev",
            "null-co,node-name=n0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export",
            "nbd,id=e0,node-name=n0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // The parent returned only once start-up was complete.
    assert!(nbd.exists() && pidfile.exists());
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: i32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, std::process::id() as i32);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .unwrap()
            .to_str(),
        Some("/")
    );
    if !common::missing_tools(&["nbdinfo"]) {
        let out = common::run_ok(
            "nbdinfo",
            &[
                "--size",
                &format!("nbd+unix:///n0?socket={}", nbd.display()),
            ],
        );
        assert_eq!(out.trim(), "1073741824");
    }
    // SAFETY: kill on the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Up to 30 s: not our child, so its exit is seen through its files.
    for _ in 0..3000 {
        if !pidfile.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!pidfile.exists());
    assert!(!nbd.exists());

    let out = Command::new(BLKD)
        .args(["--daemonize", "--blockdev", "driver=nope,node-name=n0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "blkd: --blockdev driver=nope,node-name=n0: Parameter 'driver' does not accept value 'nope'"
    );
}

#[test]
fn version_and_help() {
    let v = common::run_ok(BLKD, &["-V"]);
    assert!(v.starts_with("blkd version "));
    let h = common::run_ok(BLKD, &["--help"]);
    assert!(h.contains("--blockdev") && h.contains("--nbd-server") && h.contains("--export"));
}
