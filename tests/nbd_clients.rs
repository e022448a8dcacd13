//! NBD exports of the built daemon, used by real clients (nbdinfo, nbdsh,
//! nbdcopy, qemu-img, qemu-io, fio) and compared with qemu-storage-daemon.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::{run, run_ok, Daemon, Impl};
use serde_json::{json, Value};

const PY: &str = "/usr/bin/python3";

/// An image with data, a hole and zeroes: 8 MiB, data in the first 1 MiB and
/// at 4 MiB, the rest sparse.
fn make_sparse_image(path: &std::path::Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&vec![0xa5; 1 << 20], 0).unwrap();
    f.write_all_at(&vec![0x3c; 64 << 10], 4 << 20).unwrap();
}

/// Starts `which` serving `img.raw` as export `disk` on a unix socket and
/// 127.0.0.1:`port` is not used: unix only unless `tcp_port`.
fn start(which: Impl, writable: bool, extra_server: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.raw");
    make_sparse_image(&img);
    let sock = dir.path().join("nbd.sock");
    Daemon::start_in(
        which,
        dir,
        &[
            "--blockdev",
            &format!("file,node-name=file0,filename={}", img.display()),
            "--blockdev",
            "raw,node-name=disk0,file=file0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}{extra_server}", sock.display()),
            "--export",
            &format!(
                "nbd,id=e0,node-name=disk0,name=disk,description=test disk,writable={}",
                if writable { "on" } else { "off" }
            ),
        ],
    )
}

fn uri(d: &Daemon) -> String {
    format!("nbd+unix:///disk?socket={}", d.path("nbd.sock").display())
}

/// A libnbd client connected to `uri`, that has run `then` (Python, with the
/// handle as `h`) and stays connected for 30 s unless killed.
fn connected_client(uri: &str, then: &str) -> std::process::Child {
    let script = format!(
        "import nbd,sys,time\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n{then}\nprint('up',flush=True)\ntime.sleep(30)"
    );
    let mut client = Command::new(PY)
        .args(["-c", &script, uri])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");
    client
}

#[test]
fn nbdinfo_json_list_and_map_match_qsd() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    let mut outputs = Vec::new();
    for which in [Impl::Blkd, Impl::Qsd] {
        let d = start(which, true, "");
        let info: Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", &uri(&d)])).unwrap();
        let list = run_ok(
            "nbdinfo",
            &[
                "--list",
                "--json",
                &format!("nbd+unix://?socket={}", d.path("nbd.sock").display()),
            ],
        );
        let list: Value = serde_json::from_str(&list).unwrap();
        let map = run_ok("nbdinfo", &["--map", &uri(&d)]);
        let sock = d.path("nbd.sock").display().to_string();
        let content = run_ok("nbdinfo", &["--content", &uri(&d)]).replace(&sock, "$SOCK");
        outputs.push((info, list, map, content));
    }
    let (ours, theirs) = (&outputs[0], &outputs[1]);
    let strip = |mut v: Value| {
        // The socket paths differ between the two runs.
        if let Some(exports) = v["exports"].as_array_mut() {
            for e in exports {
                if let Some(o) = e.as_object_mut() {
                    o.remove("uri");
                }
            }
        }
        v
    };
    assert_eq!(strip(ours.0.clone()), strip(theirs.0.clone()));
    assert_eq!(
        strip(ours.1.clone())["exports"],
        strip(theirs.1.clone())["exports"]
    );
    assert_eq!(ours.2, theirs.2, "base:allocation maps differ");
    assert_eq!(ours.3, theirs.3);
    let export = &ours.0["exports"][0];
    assert_eq!(export["export-size"], 8 << 20);
    assert_eq!(export["description"], "test disk");
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 33554432);
    assert!(
        ours.2.contains("hole,zero"),
        "map shows no hole: {}",
        ours.2
    );
}

#[test]
fn qemu_io_patterns_and_qemu_img_over_unix_and_tcp() {
    let d = start(Impl::Blkd, true, "");
    let u = uri(&d);
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 2M 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "flush",
            &u,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A copy through nbd:// and back compares equal.
    let copy = d.path("copy.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &u,
            copy.to_str().unwrap(),
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &u,
            copy.to_str().unwrap(),
        ],
    );
    let img = std::fs::read(d.path("img.raw")).unwrap();
    assert!(img[..65536].iter().all(|b| *b == 0xab));
    // The same export over TCP.
    let mut qmp = d.qmp();
    qmp.ok("nbd-server-stop", json!({}));
    // Port 0: the daemon keeps the port it gets (see tcp_listen_port).
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
    );
    let port = common::tcp_listen_port(d.child.id());
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "disk"}),
    );
    let tcp = format!("nbd://127.0.0.1:{port}/disk");
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &tcp,
            copy.to_str().unwrap(),
        ],
    );
    let ro = run("qemu-io", &["-f", "raw", "-c", "write 0 512", &tcp]);
    let text =
        String::from_utf8_lossy(&ro.stdout).to_string() + &String::from_utf8_lossy(&ro.stderr);
    assert!(
        text.contains("Permission denied") || text.contains("Operation not permitted"),
        "{text}"
    );
}

#[test]
fn nbdsh_flags_contexts_and_many_requests_in_flight() {
    if common::missing_tools(&["nbdsh", PY]) {
        return;
    }
    let d = start(Impl::Blkd, true, "");
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
for f in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn", "can_df"):
    assert getattr(h, f)(), f
assert not h.is_read_only()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
# 64 writes in flight at once, then read all back.
bufs = []
for i in range(64):
    b = nbd.Buffer.from_bytearray(bytearray([i]) * 4096)
    bufs.append(b)
    h.aio_pwrite(b, 1048576 + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
rbufs = [nbd.Buffer(4096) for i in range(64)]
cookies = [h.aio_pread(rbufs[i], 1048576 + i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    assert h.aio_command_completed(c)
    assert rbufs[i].to_bytearray() == bytearray([i]) * 4096
for i in range(64):
    assert h.pread(4096, 1048576 + i * 4096) == bytes([i]) * 4096
# A hole comes back as a hole chunk, or as one data chunk with DF.
assert h.pread(65536, 6 << 20) == bytes(65536)
chunks = []
h.pread_structured(65536, 6 << 20, lambda b, off, status, err: chunks.append(status) or 0)
assert nbd.READ_HOLE in chunks, chunks
chunks = []
h.pread_structured(65536, 6 << 20, lambda b, off, status, err: chunks.append(status) or 0, flags=nbd.CMD_FLAG_DF)
assert chunks == [nbd.READ_DATA], chunks
exts = []
h.block_status(8 << 20, 0, lambda ctx, off, e, err: exts.append((ctx, list(e))))
assert exts and exts[0][0] == "base:allocation", exts
# Errors: beyond the end, and a too-large request.
try:
    h.pread(512, 8 << 20)
    sys.exit("read past end succeeded")
except nbd.Error as e:
    assert e.errno in ("EINVAL", "ENOSPC"), e.errno
h.flush()
h.shutdown()
print("ok")
"#;
    let out = run_ok(PY, &["-c", script, &uri(&d)]);
    assert_eq!(out.trim(), "ok");
}

#[test]
fn nbdcopy_round_trip_keeps_checksums() {
    if common::missing_tools(&["nbdcopy"]) {
        return;
    }
    let d = start(Impl::Blkd, true, "");
    let src = d.path("src.raw");
    common::make_image(&src, 8 << 20, 0x77);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri(&d)]);
    let back = d.path("back.raw");
    run_ok("nbdcopy", &[&uri(&d), back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
    assert_eq!(
        std::fs::read(&src).unwrap(),
        std::fs::read(d.path("img.raw")).unwrap()
    );
}

#[test]
fn fio_verify_with_several_connections() {
    if common::missing_tools(&["fio"]) {
        return;
    }
    let d = start(Impl::Blkd, true, "");
    let out = Command::new("fio")
        .current_dir(d.dir.path())
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&d)),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--iodepth=16",
            "--numjobs=1",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Three connections at once on separate regions.
    let out = Command::new("fio")
        .current_dir(d.dir.path())
        .args([
            "--name=multi",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&d)),
            "--rw=randrw",
            "--bs=4k",
            "--size=2M",
            "--iodepth=8",
            "--numjobs=3",
            "--offset_increment=2M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn max_connections_makes_extra_clients_wait() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    let d = start(Impl::Blkd, true, ",max-connections=1");
    let u = uri(&d);
    let info: Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", &u])).unwrap();
    assert_eq!(info["exports"][0]["can_multi_conn"], false);
    // Hold the one slot with a raw connection that never negotiates. Its
    // greeting shows that the server accepted it (the previous client may
    // still be leaving); a sleep would not.
    let mut holder = std::os::unix::net::UnixStream::connect(d.path("nbd.sock")).unwrap();
    holder
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut holder, &mut greeting).expect("greeting");
    let waited = run("timeout", &["2", "nbdinfo", "--size", &u]);
    assert_eq!(waited.status.code(), Some(124), "second client was served");
    drop(holder);
    let size = run_ok("timeout", &["10", "nbdinfo", "--size", &u]);
    assert_eq!(size.trim(), (8 << 20).to_string());
}

#[test]
fn block_export_del_modes_and_events() {
    let d = start(Impl::Blkd, true, "");
    let mut qmp = d.qmp();
    let mut client = connected_client(&uri(&d), "");
    let (_, e) = qmp.err("block-export-del", json!({"id": "e0"}));
    assert_eq!(e, "export 'e0' still in use");
    // Hard: reply first, then the event once the client is dropped.
    let r = qmp.cmd("block-export-del", json!({"id": "e0", "mode": "hard"}));
    assert_eq!(r, json!({"return": {}}));
    assert!(qmp.events.is_empty(), "event came before the reply");
    qmp.event("BLOCK_EXPORT_DELETED");
    assert_eq!(qmp.ok("query-block-exports", json!({})), json!([]));
    let _ = client.kill();
    let _ = client.wait();
}

/// What QMP sends when `block-export-del` hard drops a client, with the
/// commands an orchestrator pipelines after it; the client has a read in
/// flight on a slow node if `busy`.
fn hard_delete_transcript(which: Impl, busy: bool) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start_in(
        which,
        dir,
        &[
            "--blockdev",
            "null-co,node-name=n0,size=1048576,latency-ns=2000000000",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "nbd,id=e0,node-name=n0",
        ],
    );
    let mut qmp = d.qmp();
    let mut client = connected_client(
        &format!("nbd+unix:///n0?socket={}", sock.display()),
        if busy {
            "h.aio_pread(nbd.Buffer(4096),0)"
        } else {
            ""
        },
    );
    if busy {
        // The read reaches the server; it then takes 2 s.
        std::thread::sleep(Duration::from_millis(300));
    }
    let del_node = r#"{"execute": "blockdev-del", "arguments": {"node-name": "n0"}}"#;
    qmp.send_raw(
        format!(
            "{}\n{{\"execute\": \"query-block-exports\"}}\n{del_node}\n",
            r#"{"execute": "block-export-del", "arguments": {"id": "e0", "mode": "hard"}}"#
        )
        .as_bytes(),
    );
    let mut transcript: Vec<Value> = (0..4).map(|_| qmp.read_value().unwrap()).collect();
    qmp.send_raw(format!("{del_node}\n").as_bytes());
    transcript.push(qmp.read_value().unwrap());
    let _ = client.kill();
    let _ = client.wait();
    for v in &mut transcript {
        if let Some(o) = v.as_object_mut() {
            o.remove("timestamp");
        }
    }
    transcript
}

#[test]
fn hard_delete_drains_as_qsd() {
    if common::missing_tools(&["nbdsh"]) {
        return;
    }
    let deleted = json!({"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}});
    let ok = json!({"return": {}});
    // An idle client leaves at once: the export is gone, and its node free,
    // before the next command.
    let idle = hard_delete_transcript(Impl::Blkd, false);
    assert_eq!(idle[..2], [ok.clone(), deleted.clone()], "{idle:?}");
    assert_eq!(idle[2..4], [json!({"return": []}), ok.clone()], "{idle:?}");
    // QSD sometimes still lists the export, shutting down, in the query right
    // after the event (about one run in four here); everything else matches.
    let mut qsd = hard_delete_transcript(Impl::Qsd, false);
    let draining = json!([{"node-name": "n0", "shutting-down": true, "type": "nbd", "id": "e0"}]);
    if qsd.get(2) == Some(&json!({"return": draining})) {
        qsd[2] = json!({"return": []});
    }
    assert_eq!(idle, qsd);
    // A read in flight keeps the export shutting down, and its node busy,
    // until it is done.
    let busy = hard_delete_transcript(Impl::Blkd, true);
    assert_eq!(busy[1], json!({"return": draining}), "{busy:?}");
    assert_eq!(busy[2]["error"]["desc"], "Node n0 is in use", "{busy:?}");
    assert_eq!(busy[3..], [deleted, ok], "{busy:?}");
    assert_eq!(busy, hard_delete_transcript(Impl::Qsd, true));
}

#[test]
fn null_co_reads_never_show_earlier_request_data() {
    // null-co without read-zeroes leaves read buffers alone; the NBD server
    // reuses its buffers, so blkd must clear them.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start_in(
        Impl::Blkd,
        dir,
        &[
            "--blockdev",
            "null-co,node-name=n0,size=1048576",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "nbd,id=e0,node-name=n0,writable=on",
        ],
    );
    let uri = format!("nbd+unix:///n0?socket={}", d.path("nbd.sock").display());
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xaa 0 64k",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "write -P 0xbb 0 4k",
            "-c",
            "read -P 0 4k 4k",
            &uri,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn tcp_ipv6_and_inherited_fd_listeners() {
    if common::missing_tools(&["nbdinfo"]) {
        return;
    }
    // IPv6 loopback, when the machine has it.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let d = Daemon::start(
            Impl::Blkd,
            &["--blockdev", "null-co,node-name=n0,size=1048576"],
        );
        let mut qmp = d.qmp();
        // Port 0: the daemon keeps the port it gets (see tcp_listen_port).
        qmp.ok(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "::1", "port": "0"}}}),
        );
        let port = common::tcp_listen_port(d.child.id());
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
        );
        let size = run_ok("nbdinfo", &["--size", &format!("nbd://[::1]:{port}/n0")]);
        assert_eq!(size.trim(), "1048576");
    }
    // A listening socket handed over as fd 3, as a service manager would.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let mut cmd = Command::new(common::BLKD);
    cmd.args([
        "--blockdev",
        "null-co,node-name=n0,size=2097152",
        "--nbd-server",
        "addr.type=fd,addr.str=3",
        "--export",
        "nbd,id=e0,node-name=n0",
    ]);
    common::pass_fd_as_3(&mut cmd, fd);
    let mut child = cmd.spawn().unwrap();
    let uri = format!("nbd+unix:///n0?socket={}", sock.display());
    let size = run_ok("timeout", &["10", "nbdinfo", "--size", &uri]);
    assert_eq!(size.trim(), "2097152");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn connections_of_an_iothread_export_follow_its_cpu_affinity() {
    let d = Daemon::start(
        Impl::Blkd,
        &[
            "--object",
            "iothread,id=nbdio",
            "--blockdev",
            "null-co,node-name=n0,size=1048576",
        ],
    );
    let mut qmp = d.qmp();
    let tid = qmp.ok("query-iothreads", json!({}))[0]["thread-id"]
        .as_i64()
        .unwrap() as i32;
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    let sock = d.path("nbd.sock");
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "iothread": "nbdio"}),
    );
    let mut client = connected_client(
        &format!("nbd+unix:///n0?socket={}", sock.display()),
        "h.pread(512, 0)",
    );
    let pid = d.child.id();
    let found: Vec<String> = common::threads(pid)
        .into_iter()
        .filter(|(name, _)| name.starts_with("nbd-client-"))
        .map(|(_, cpus)| cpus)
        .collect();
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(found, vec!["0".to_string()]);
}

#[test]
fn acknowledged_writes_survive_a_killed_daemon_and_a_vanished_client() {
    let mut d = start(Impl::Blkd, true, "");
    let u = uri(&d);
    // A client that vanishes in the middle of a write request: header and
    // half the payload, then gone.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(d.path("nbd.sock")).unwrap();
        let mut greeting = [0u8; 18];
        std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
        s.write_all(&1u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE
        let name = b"disk";
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        s.write_all(&opt).unwrap();
        let mut export_info = [0u8; 10 + 124];
        std::io::Read::read_exact(&mut s, &mut export_info).unwrap();
        let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes()); // WRITE
        req.extend_from_slice(&7u64.to_be_bytes());
        req.extend_from_slice(&(2u64 << 20).to_be_bytes());
        req.extend_from_slice(&65536u32.to_be_bytes());
        req.extend_from_slice(&[0xee; 1000]);
        s.write_all(&req).unwrap();
    }
    // Another client's flushed writes are acknowledged...
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5d 3M 256k",
            "-c",
            "flush",
            &u,
        ],
    );
    // ...and are in the image even when the daemon dies without a word.
    let _ = d.child.kill();
    let _ = d.child.wait();
    let img = std::fs::read(d.path("img.raw")).unwrap();
    assert!(img[3 << 20..(3 << 20) + (256 << 10)]
        .iter()
        .all(|b| *b == 0x5d));
    // The half-sent write never reached the disk.
    assert!(!img[2 << 20..(2 << 20) + 1000].contains(&0xee));
}

/// Large WRITEs onto pages in the page cache are received straight into a mapping of the
/// image (whose pages then show in blkd's resident size), over unix and TCP, next to writes
/// into holes, which are not cached and go the ordinary way. So are small WRITEs after the
/// first of a connection, one page each. Every byte lands where it should, and reads see
/// them at once.
#[test]
fn writes_onto_cached_pages_are_received_into_the_page_cache() {
    if common::missing_tools(&["qemu-io"]) {
        return;
    }
    let mut d = start(Impl::Blkd, true, "");
    let mut qmp = d.qmp();
    // The NBD server moved to `addr`, exporting disk0 writable as `disk` under `id`.
    let mut serve_on = |addr: Value, id: &str| {
        qmp.ok("nbd-server-stop", json!({}));
        qmp.ok("nbd-server-start", json!({ "addr": addr }));
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": "disk0", "name": "disk", "writable": true}),
        );
    };
    // Write-back: qemu-io's default writethrough sends every write with FUA, which is
    // written whole.
    let qemu_io_writeback = |commands: &[&str], uri: &str| {
        let mut args = vec!["-f", "raw", "-t", "writeback"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(uri);
        run_ok("qemu-io", &args);
    };
    serve_on(
        json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}),
        "e1",
    );
    let port = common::tcp_listen_port(d.child.id());
    let img = d.path("img.raw");
    // Resident KiB of blkd's mappings of the image: only pages a receive wrote to.
    let mapped_kib = || {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", d.child.id())).unwrap();
        let mut kib = 0;
        let mut in_image = false;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if in_image {
                    kib += rss
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
            } else if line.contains(" kB") {
                continue;
            } else if line.split_whitespace().count() >= 5 {
                in_image = line.ends_with(img.to_str().unwrap());
            }
        }
        kib
    };
    assert_eq!(mapped_kib(), 0, "mapped before any write");
    // The first 1 MiB was just written by make_sparse_image, so it is cached; 2-3 MiB is
    // a hole.
    qemu_io_writeback(
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 2M 1M",
            "flush",
            "read -P 0x11 0 1M",
            "read -P 0x22 2M 1M",
        ],
        &format!("nbd://127.0.0.1:{port}/disk"),
    );
    let kib = mapped_kib();
    assert!(
        (1024..2048).contains(&kib),
        "{kib} KiB resident: the write onto 1 MiB of cached pages, not the one into the hole"
    );
    // Small writes, 4 KiB apart in 64 KiB of cached pages: each after the first of the
    // connection maps its page (the kernel may map the rest of its folio with it).
    let small_writes = |first: u64, fill: u8, uri: &str| {
        let before = mapped_kib();
        let writes: Vec<String> = (0..4)
            .map(|i| format!("write -P {fill:#x} {} 4k", first + i * 8192))
            .collect();
        let reads: Vec<String> = (0..4)
            .map(|i| format!("read -P {fill:#x} {} 4k", first + i * 8192))
            .collect();
        let mut commands: Vec<&str> = writes.iter().map(String::as_str).collect();
        commands.push("flush");
        commands.extend(reads.iter().map(String::as_str));
        qemu_io_writeback(&commands, uri);
        let kib = mapped_kib() - before;
        assert!(
            (12..=64).contains(&kib),
            "{kib} KiB newly resident after 4 small writes"
        );
    };
    small_writes(4 << 20, 0x44, &format!("nbd://127.0.0.1:{port}/disk"));
    // Over a unix socket, with the server restarted on one.
    serve_on(
        json!({"type": "unix", "data": {"path": d.path("nbd.sock")}}),
        "e2",
    );
    qemu_io_writeback(
        &[
            "write -P 0x33 256k 512k",
            "flush",
            "read -P 0x11 0 256k",
            "read -P 0x33 256k 512k",
            "read -P 0x11 768k 256k",
        ],
        &uri(&d),
    );
    // Cached pages not mapped yet, written past blkd.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[0x3c; 64 << 10], 6 << 20)
        .unwrap();
    small_writes(6 << 20, 0x55, &uri(&d));
    let _ = d.child.kill();
    let _ = d.child.wait();
    let on_disk = std::fs::read(&img).unwrap();
    let all = |range: std::ops::Range<usize>, byte: u8| on_disk[range].iter().all(|b| *b == byte);
    assert!(all(0..256 << 10, 0x11));
    assert!(all(256 << 10..768 << 10, 0x33));
    assert!(all(768 << 10..1 << 20, 0x11));
    assert!(all(1 << 20..2 << 20, 0));
    assert!(all(2 << 20..3 << 20, 0x22));
    for (base, fill) in [(4 << 20, 0x44), (6 << 20, 0x55)] {
        for page in 0..8 {
            let at = base + page * 4096;
            let byte = if page % 2 == 0 { fill } else { 0x3c };
            assert!(all(at..at + 4096, byte), "page {page} after {base}");
        }
    }
}
