//! vhost-user-blk exports of the built daemon, driven by an in-process
//! vhost-user front-end (vhost_blk's test harness): negotiation, config space,
//! every request type on several queues, reconnect, resize, deletion. The
//! config space is compared with qemu-storage-daemon's.

mod common;

use std::time::Duration;

use common::{Daemon, Impl};
use serde_json::json;
use vhost_blk::test_utils::{Client, ClientOptions};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

/// Starts `which` exporting a 4 MiB raw file over vhost-user-blk.
fn start(which: Impl, extra: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.raw");
    common::make_image(&img, 4 << 20, 0);
    let sock = dir.path().join("vhost.sock");
    Daemon::start_in(
        which,
        dir,
        &[
            "--blockdev",
            &format!("file,node-name=file0,filename={}", img.display()),
            "--blockdev",
            "raw,node-name=disk0,file=file0",
            "--export",
            &format!(
                "vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path={},writable=on{extra}",
                sock.display()
            ),
        ],
    )
}

fn options(num_queues: u16) -> ClientOptions {
    ClientOptions {
        num_queues,
        ..ClientOptions::default()
    }
}

#[test]
fn config_space_matches_qsd() {
    let mut spaces = Vec::new();
    for which in [Impl::Blkd, Impl::Qsd] {
        let d = start(which, ",num-queues=2,logical-block-size=4096");
        let mut c = Client::connect(d.path("vhost.sock"), &options(2)).unwrap();
        spaces.push(c.config().unwrap());
    }
    let (ours, theirs) = (&spaces[0], &spaces[1]);
    assert_eq!(ours.capacity, (4 << 20) / 512);
    assert_eq!(ours.capacity, theirs.capacity);
    assert_eq!(ours.blk_size, 4096);
    assert_eq!(ours.blk_size, theirs.blk_size);
    assert_eq!(ours.num_queues, 2);
    assert_eq!(ours.num_queues, theirs.num_queues);
    assert_eq!(ours.seg_max, theirs.seg_max);
    // Unlike QSD, which starts every device with wce 0 (and flushes anyway),
    // blkd reports the export's cache mode: writeback by default.
    assert_eq!((ours.wce, theirs.wce), (1, 0));
    assert!(ours.max_discard_sectors > 0 && ours.max_write_zeroes_sectors > 0);
    assert!(ours.max_discard_seg > 0 && ours.max_write_zeroes_seg > 0);
}

#[test]
fn every_request_type_on_every_queue() {
    let d = start(Impl::Blkd, ",num-queues=4");
    let mut c = Client::connect(d.path("vhost.sock"), &options(4)).unwrap();
    for q in 0..4u64 {
        let queue = c.queue(q as usize);
        let data = vec![0x40 + q as u8; 8192];
        assert_eq!(queue.write(q * 16, &data).unwrap(), S_OK);
        let r = queue.read(q * 16, 8192).unwrap();
        assert_eq!(r.status, S_OK);
        assert_eq!(r.data, data);
        assert_eq!(queue.flush().unwrap(), S_OK);
        let id = queue.get_id().unwrap();
        assert_eq!(id.status, S_OK);
        assert_eq!(&id.data[..4], b"vub0");
        assert_eq!(
            queue
                .discard_write_zeroes(T_WRITE_ZEROES, q * 16, 8, 0)
                .unwrap(),
            S_OK
        );
        let z = queue.read(q * 16, 4096).unwrap();
        assert!(z.data.iter().all(|b| *b == 0));
        assert_eq!(
            queue
                .discard_write_zeroes(T_DISCARD, q * 16 + 8, 8, 0)
                .unwrap(),
            S_OK
        );
        // Beyond the end of the disk.
        assert_eq!(queue.read((4 << 20) / 512, 512).unwrap().status, S_IOERR);
        // An unknown request type.
        assert_eq!(queue.request(99, 0, &[], 0).unwrap().status, 2);
    }
    // The writes reached the file.
    let img = std::fs::read(d.path("img.raw")).unwrap();
    assert_eq!(img[3 * 16 * 512 + 4096], 0x43);
    assert!(img[16 * 512..16 * 512 + 4096].iter().all(|b| *b == 0));
    let _ = (T_IN, T_OUT);
}

#[test]
fn queues_run_in_parallel_on_their_own_threads() {
    let d = start(Impl::Blkd, ",num-queues=2");
    let mut c = Client::connect(d.path("vhost.sock"), &options(2)).unwrap();
    let mut handles = Vec::new();
    for q in 0..2 {
        let mut queue = c.take_queue(q).unwrap();
        handles.push(std::thread::spawn(move || {
            for i in 0..200u64 {
                let data = vec![(q as u8) << 4 | (i % 16) as u8; 4096];
                let sector = (q as u64) * 2048 + (i % 64) * 8;
                assert_eq!(queue.write(sector, &data).unwrap(), S_OK);
                assert_eq!(queue.read(sector, 4096).unwrap().data, data);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let pid = d.child.id();
    let names: Vec<String> = common::threads(pid).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n == "vub0-q0"), "{names:?}");
    assert!(names.iter().any(|n| n == "vub0-q1"), "{names:?}");
}

#[test]
fn iothread_mapping_names_workers_after_iothreads() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let d = Daemon::start_in(
        Impl::Blkd,
        dir,
        &[
            "--object",
            "iothread,id=ioA",
            "--object",
            "iothread,id=ioB",
            "--blockdev",
            "null-co,node-name=n0,size=4194304",
        ],
    );
    let mut qmp = d.qmp();
    qmp.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "v0", "node-name": "n0", "writable": true,
               "addr": {"type": "unix", "path": sock}, "num-queues": 3,
               "iothread-vq-mapping": [{"iothread": "ioA", "vqs": [0, 2]}, {"iothread": "ioB"}]}),
    );
    let mut c = Client::connect(&sock, &options(3)).unwrap();
    for q in 0..3 {
        assert_eq!(c.queue(q).write(0, &[1u8; 512]).unwrap(), S_OK);
    }
    let pid = d.child.id();
    let count = |name: &str| {
        common::threads(pid)
            .iter()
            .filter(|(n, _)| n == name)
            .count()
    };
    // Each iothread itself plus one worker named after it.
    assert_eq!(count("ioA"), 2);
    assert_eq!(count("ioB"), 2);
    let (_, e) = qmp.err(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "v1", "node-name": "n0",
               "addr": {"type": "unix", "path": d.path("v1.sock")}, "num-queues": 2,
               "iothread-vq-mapping": [{"iothread": "ioA", "vqs": [0, 0]}]}),
    );
    assert!(e.contains("already assigned"), "{e}");
}

#[test]
fn front_ends_reconnect_and_see_earlier_writes() {
    let d = start(Impl::Blkd, "");
    {
        let mut c = Client::connect(d.path("vhost.sock"), &options(1)).unwrap();
        assert_eq!(c.queue(0).write(100, &[0x5a; 4096]).unwrap(), S_OK);
    }
    // The previous front-end vanished; the export listens again.
    for round in 0..3u8 {
        let mut c = Client::connect(d.path("vhost.sock"), &options(1)).unwrap();
        let r = c.queue(0).read(100, 4096).unwrap();
        assert_eq!(r.data, vec![0x5a; 4096], "round {round}");
    }
}

#[test]
fn resize_notifies_the_front_end_and_delete_removes_the_socket() {
    let d = start(Impl::Blkd, "");
    let mut qmp = d.qmp();
    let mut c = Client::connect(d.path("vhost.sock"), &options(1)).unwrap();
    qmp.ok(
        "block_resize",
        json!({"node-name": "disk0", "size": 8 << 20}),
    );
    c.recv_backend_request(Duration::from_secs(5)).unwrap();
    assert_eq!(c.config().unwrap().capacity, (8 << 20) / 512);
    // Safe mode succeeds with a front-end connected, as in QSD.
    qmp.ok("block-export-del", json!({"id": "vub0"}));
    let ev = qmp.event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"]["id"], "vub0");
    assert!(!d.path("vhost.sock").exists());
    assert_eq!(qmp.ok("query-block-exports", json!({})), json!([]));
    // The node is free again.
    qmp.ok("blockdev-del", json!({"node-name": "disk0"}));
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ro.sock");
    let d = Daemon::start_in(
        Impl::Blkd,
        dir,
        &[
            "--blockdev",
            "null-co,node-name=n0,size=1048576,read-zeroes=on",
            "--export",
            &format!(
                "vhost-user-blk,id=ro,node-name=n0,addr.type=unix,addr.path={}",
                sock.display()
            ),
        ],
    );
    let mut c = Client::connect(&sock, &options(1)).unwrap();
    const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    assert_ne!(c.offered_features & VIRTIO_BLK_F_RO, 0);
    assert_eq!(c.queue(0).write(0, &[1u8; 512]).unwrap(), S_IOERR);
    assert_eq!(c.queue(0).read(0, 512).unwrap().status, S_OK);
    drop(d);
}

#[test]
fn stale_socket_is_replaced_and_inherited_fd_works() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file left behind by a dead process.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let inherited = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&inherited).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let qmp = dir.path().join("qmp.sock");
    let mut cmd = std::process::Command::new(common::BLKD);
    cmd.args([
        "--chardev",
        &format!("socket,id=m0,path={},server=on,wait=off", qmp.display()),
        "--monitor",
        "chardev=m0",
        "--blockdev",
        "null-co,node-name=n0,size=1048576,read-zeroes=on",
        "--export",
        &format!(
            "vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path={}",
            stale.display()
        ),
        "--export",
        "vhost-user-blk,id=v1,node-name=n0,addr.type=fd,addr.str=3",
    ]);
    common::pass_fd_as_3(&mut cmd, fd);
    let mut child = cmd.spawn().unwrap();
    assert!(common::wait_for_path(&qmp, Duration::from_secs(10)));
    common::Qmp::connect(&qmp).ok("query-version", json!({}));
    for sock in [&stale, &inherited] {
        let mut c = Client::connect(sock, &options(1)).unwrap();
        let r = c.queue(0).read(0, 4096).unwrap();
        assert_eq!(r.status, S_OK);
        assert_eq!(c.config().unwrap().capacity, 2048);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `Cpus_allowed_list` of every thread of `pid` named `name`.
fn affinities(pid: u32, name: &str) -> Vec<String> {
    common::threads(pid)
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, cpus)| cpus)
        .collect()
}

#[test]
fn workers_follow_the_cpu_affinity_of_their_iothread() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let d = Daemon::start_in(
        Impl::Blkd,
        dir,
        &[
            "--object",
            "iothread,id=pin0",
            "--blockdev",
            "null-co,node-name=n0,size=1048576",
        ],
    );
    let mut qmp = d.qmp();
    let threads = qmp.ok("query-iothreads", json!({}));
    let tid = threads[0]["thread-id"].as_i64().unwrap() as i32;
    // Pin the iothread to CPU 0, as libvirt would by its thread id.
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    qmp.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "v0", "node-name": "n0",
               "addr": {"type": "unix", "path": sock}, "num-queues": 2, "iothread": "pin0"}),
    );
    let mut c = Client::connect(&sock, &options(2)).unwrap();
    for q in 0..2 {
        assert_eq!(c.queue(q).read(0, 512).unwrap().status, S_OK);
    }
    let pid = d.child.id();
    let found = affinities(pid, "pin0");
    // The iothread and its one worker, both on CPU 0 only.
    assert_eq!(found, vec!["0".to_string(), "0".to_string()], "{found:?}");
}

#[test]
fn two_front_ends_at_once_as_in_a_migration() {
    // QSD serves one front-end at a time; a migration target connects
    // while the source still runs.
    let d = start(Impl::Blkd, ",num-queues=2");
    let mut source = Client::connect(d.path("vhost.sock"), &options(2)).unwrap();
    assert_eq!(source.queue(0).write(64, &[0x61; 4096]).unwrap(), S_OK);
    let mut target = Client::connect(d.path("vhost.sock"), &options(2)).unwrap();
    assert_eq!(
        target.queue(1).read(64, 4096).unwrap().data,
        vec![0x61; 4096]
    );
    // Both keep working, each on its own device.
    assert_eq!(source.queue(1).write(72, &[0x62; 4096]).unwrap(), S_OK);
    assert_eq!(
        target.queue(0).read(72, 4096).unwrap().data,
        vec![0x62; 4096]
    );
    let mut qmp = d.qmp();
    qmp.ok(
        "block_resize",
        json!({"node-name": "disk0", "size": 8 << 20}),
    );
    for c in [&source, &target] {
        c.recv_backend_request(Duration::from_secs(5)).unwrap();
    }
    drop(source);
    assert_eq!(
        target.queue(0).read(64, 4096).unwrap().data,
        vec![0x61; 4096]
    );
    assert_eq!(target.config().unwrap().capacity, (8 << 20) / 512);
    // Deleting the export ends every connection.
    qmp.ok("block-export-del", json!({"id": "vub0"}));
    target.queue(0).set_timeout(Duration::from_millis(500));
    assert!(target.queue(0).read(64, 4096).is_err());
}
