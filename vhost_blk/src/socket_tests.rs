//! In-process tests over a real vhost-user socket: our export against the
//! `test_utils` front-end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Listener, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

use crate::test_utils::{memfd_memory, region_info, Client, ClientOptions, DiskOp, MemDisk};
use crate::{
    device_features, BlkConfig, BlkExport, QueueGroup, CONFIG_WCE_OFFSET, PROTOCOL_FEATURES,
};

const DISK_SIZE: usize = 4 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    disk: Arc<MemDisk>,
    export: Option<BlkExport>,
}

impl Fixture {
    fn new(config: BlkConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vhost.sock");
        let listener = Listener::new(&path, true).unwrap();
        let disk = Arc::new(MemDisk::patterned(DISK_SIZE));
        let export = BlkExport::start(listener, disk.clone(), config).unwrap();
        Fixture {
            _dir: dir,
            path,
            disk,
            export: Some(export),
        }
    }

    fn writable() -> Fixture {
        let mut c = BlkConfig::new("disk0");
        c.writable = true;
        Fixture::new(c)
    }

    fn connect(&self, options: &ClientOptions) -> Client {
        Client::connect(&self.path, options).unwrap()
    }

    fn export(&self) -> &BlkExport {
        self.export.as_ref().unwrap()
    }

    fn wait_connected(&self, connected: bool) {
        // Generous: a connection ends on the export's threads, which a loaded
        // machine may leave waiting.
        let deadline = Instant::now() + Duration::from_secs(20);
        while (self.export().connected() > 0) != connected {
            assert!(
                Instant::now() < deadline,
                "connected() > 0 never became {connected}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn negotiation_and_config_space() {
    let mut config = BlkConfig::new("disk0");
    config.num_queues = 2;
    config.logical_block_size = 4096;
    let f = Fixture::new(config);
    let mut client = f.connect(&ClientOptions {
        num_queues: 2,
        ..Default::default()
    });
    assert_eq!(client.offered_features, device_features(false));
    assert_eq!(
        client.offered_features,
        0x1_7000_7e64 | (1 << 5) | (1 << 30) | (1 << 28)
    );
    assert_ne!(client.offered_features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(client.offered_protocol_features, PROTOCOL_FEATURES);
    assert_eq!(client.frontend.get_queue_num().unwrap(), 2);
    assert_eq!(client.frontend.get_max_mem_slots().unwrap(), 509);
    let cs = client.config().unwrap();
    assert_eq!(cs.capacity, (DISK_SIZE / 512) as u64);
    assert_eq!(cs.blk_size, 4096);
    assert_eq!(cs.seg_max, 126);
    assert_eq!(cs.num_queues, 2);
    assert_eq!(cs.wce, 1);
    assert_eq!(
        (
            cs.max_discard_sectors,
            cs.max_discard_seg,
            cs.discard_sector_alignment
        ),
        (32768, 1, 8)
    );
    assert_eq!(
        (
            cs.max_write_zeroes_sectors,
            cs.max_write_zeroes_seg,
            cs.write_zeroes_may_unmap
        ),
        (32768, 1, 1)
    );
    // A partial read at an offset.
    let (_, payload) = client
        .frontend
        .get_config(20, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
        .unwrap();
    assert_eq!(payload, 4096u32.to_le_bytes());
    // Read-only export: writes fail.
    assert_eq!(
        client.queue(0).write(0, &[1; 4096]).unwrap(),
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        client.queue(1).read(8, 4096).unwrap().data,
        f.disk.contents()[4096..8192]
    );
}

#[test]
fn every_request_type() {
    let f = Fixture::writable();
    let mut client = f.connect(&ClientOptions::default());
    let q = client.queue(0);
    let r = q.read(1, 1024).unwrap();
    assert_eq!((r.status, r.used_len), (0, 1025));
    assert_eq!(r.data, f.disk.contents()[512..1536]);
    assert_eq!(q.write(8, &[0x77; 2048]).unwrap(), 0);
    assert!(f.disk.contents()[4096..6144].iter().all(|&b| b == 0x77));
    assert_eq!(q.flush().unwrap(), 0);
    let id = q.get_id().unwrap();
    assert_eq!(id.status, 0);
    assert_eq!(&id.data[..6], b"disk0\0");
    assert_eq!(
        q.discard_write_zeroes(VIRTIO_BLK_T_DISCARD, 16, 8, 0)
            .unwrap(),
        0
    );
    assert_eq!(
        q.discard_write_zeroes(
            VIRTIO_BLK_T_WRITE_ZEROES,
            8,
            2,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        )
        .unwrap(),
        0
    );
    assert!(f.disk.contents()[4096..5120].iter().all(|&b| b == 0));
    assert_eq!(f.disk.contents()[5120], 0x77);
    assert_eq!(
        q.discard_write_zeroes(VIRTIO_BLK_T_DISCARD, 0, 1, 1)
            .unwrap(),
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(
        q.request(99, 0, &[], 0).unwrap().status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(
        q.read((DISK_SIZE / 512) as u64, 512).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        f.disk.ops(),
        vec![
            DiskOp::Flush,
            DiskOp::Discard {
                offset: 8192,
                len: 4096
            },
            DiskOp::WriteZeroes {
                offset: 4096,
                len: 1024,
                unmap: true
            },
        ]
    );
    // Indirect descriptors through the socket too.
    let buf = q.buffer();
    let mut hdr = [0u8; 16];
    hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
    q.mem().write_slice(&hdr, GuestAddress(buf)).unwrap();
    let used = q
        .submit_indirect(&[
            (buf, 16, false),
            (buf + 0x1000, 512, true),
            (buf + 0x2000, 1, true),
        ])
        .unwrap();
    assert_eq!(used, 513);
    let mut got = vec![0u8; 512];
    q.mem()
        .read_slice(&mut got, GuestAddress(buf + 0x1000))
        .unwrap();
    assert_eq!(got, f.disk.contents()[1024..1536]);
}

#[test]
fn guest_can_switch_to_writethrough() {
    let mut config = BlkConfig::new("wt");
    config.writable = true;
    config.writethrough = true;
    let f = Fixture::new(config);
    let mut client = f.connect(&ClientOptions::default());
    assert_eq!(client.config().unwrap().wce, 0);
    assert_eq!(client.queue(0).write(0, &[1; 512]).unwrap(), 0);
    assert_eq!(f.disk.ops(), vec![DiskOp::Flush]);
    client
        .frontend
        .set_config(
            CONFIG_WCE_OFFSET as u32,
            VhostUserConfigFlags::WRITABLE,
            &[1],
        )
        .unwrap();
    assert_eq!(client.config().unwrap().wce, 1);
    assert_eq!(client.queue(0).write(0, &[2; 512]).unwrap(), 0);
    assert_eq!(f.disk.ops(), vec![DiskOp::Flush], "no flush in writeback");
    client
        .frontend
        .set_config(
            CONFIG_WCE_OFFSET as u32,
            VhostUserConfigFlags::WRITABLE,
            &[0],
        )
        .unwrap();
    assert_eq!(client.queue(0).write(0, &[3; 512]).unwrap(), 0);
    assert_eq!(f.disk.ops(), vec![DiskOp::Flush, DiskOp::Flush]);
}

#[test]
fn queues_run_in_parallel_on_named_workers() {
    let started = Arc::new(Mutex::new(Vec::<String>::new()));
    let group = |name: &str, queues: Vec<u16>| {
        let started = started.clone();
        QueueGroup {
            name: name.into(),
            queues,
            on_worker_start: Some(Arc::new(move || {
                let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
                started.lock().unwrap().push(comm.trim().to_string());
            })),
            poll_max: crate::DEFAULT_POLL_MAX,
        }
    };
    let mut config = BlkConfig::new("mq");
    config.writable = true;
    config.num_queues = 4;
    config.thread_groups = vec![
        group("iothread-a", vec![0, 2]),
        group("iothread-b", vec![1, 3]),
    ];
    let f = Fixture::new(config);
    let mut client = f.connect(&ClientOptions {
        num_queues: 4,
        ..Default::default()
    });
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let mut q = client.take_queue(usize::from(i)).unwrap();
            thread::spawn(move || {
                for round in 0..20u64 {
                    let sector = u64::from(i) * 1024 + round * 8;
                    assert_eq!(q.write(sector, &[i + 1; 4096]).unwrap(), 0);
                    let r = q.read(sector, 4096).unwrap();
                    assert!(r.data.iter().all(|&b| b == i + 1));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let disk = f.disk.contents();
    for i in 0..4usize {
        let start = i * 1024 * 512;
        assert!(disk[start..start + 20 * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    let mut names = started.lock().unwrap().clone();
    names.sort();
    assert_eq!(names, vec!["iothread-a", "iothread-b"]);
}

#[test]
fn event_idx_is_honoured() {
    let f = Fixture::writable();
    let mut client = f.connect(&ClientOptions {
        event_idx: true,
        ..Default::default()
    });
    let q = client.queue(0);
    for i in 0..5u64 {
        assert_eq!(q.write(i, &[9; 512]).unwrap(), 0);
    }
    // The device publishes where it wants the next kick when it re-arms
    // notifications, which may come just after the last completion.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut avail_event = q.avail_event().unwrap();
    while avail_event != 5 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
        avail_event = q.avail_event().unwrap();
    }
    assert_eq!(avail_event, 5);
    assert!(f.disk.contents()[..2560].iter().all(|&b| b == 9));
}

#[test]
fn reconnect_gets_a_clean_device() {
    let f = Fixture::writable();
    let mut first = f.connect(&ClientOptions::default());
    f.wait_connected(true);
    assert_eq!(first.queue(0).write(0, &[0x42; 512]).unwrap(), 0);
    first
        .frontend
        .set_config(
            CONFIG_WCE_OFFSET as u32,
            VhostUserConfigFlags::WRITABLE,
            &[0],
        )
        .unwrap();
    drop(first);
    f.wait_connected(false);
    let mut second = f.connect(&ClientOptions {
        num_queues: 1,
        event_idx: true,
        ..Default::default()
    });
    assert_eq!(
        second.config().unwrap().wce,
        1,
        "guest setting must not leak into the next connection"
    );
    let r = second.queue(0).read(0, 512).unwrap();
    assert_eq!((r.status, r.data), (0, vec![0x42; 512]));
}

#[test]
fn memory_regions_at_run_time_and_slot_limit() {
    let mut config = BlkConfig::new("slots");
    config.writable = true;
    config.max_mem_slots = 2;
    let f = Fixture::new(config);
    let mut client = f.connect(&ClientOptions::default());
    let base = 0x1000_0000u64;
    let extra = memfd_memory(base, 1 << 20).unwrap();
    let info = region_info(&extra, base).unwrap();
    extra.write_slice(&[0x3c; 512], GuestAddress(base)).unwrap();
    client.frontend.add_mem_region(&info).unwrap();

    let q = client.queue(0);
    let buf = q.buffer();
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hdr[8..16].copy_from_slice(&6u64.to_le_bytes());
    q.mem().write_slice(&hdr, GuestAddress(buf)).unwrap();
    let chain = [
        (buf, 16, false),
        (base, 512, false),
        (buf + 0x2000, 1, true),
    ];
    assert_eq!(q.submit(&chain).unwrap(), 1);
    assert_eq!(
        q.mem().read_obj::<u8>(GuestAddress(buf + 0x2000)).unwrap(),
        0
    );
    assert!(f.disk.contents()[3072..3584].iter().all(|&b| b == 0x3c));

    client.frontend.remove_mem_region(&info).unwrap();
    let q = client.queue(0);
    q.submit(&chain).unwrap();
    assert_eq!(
        q.mem().read_obj::<u8>(GuestAddress(buf + 0x2000)).unwrap(),
        VIRTIO_BLK_S_IOERR as u8,
        "removed region must not be usable"
    );

    client.frontend.add_mem_region(&info).unwrap();
    let third = memfd_memory(0x2000_0000, 1 << 20).unwrap();
    let third_info = region_info(&third, 0x2000_0000).unwrap();
    assert!(
        client.frontend.add_mem_region(&third_info).is_err(),
        "slot limit of 2 not enforced"
    );
    f.wait_connected(false);
    drop(client);
    let mut again = f.connect(&ClientOptions::default());
    assert_eq!(again.queue(0).read(6, 512).unwrap().data, vec![0x3c; 512]);
}

#[test]
fn resize_sends_config_change() {
    let f = Fixture::writable();
    let mut client = f.connect(&ClientOptions::default());
    assert_eq!(client.config().unwrap().capacity, (DISK_SIZE / 512) as u64);
    f.disk.set_size(DISK_SIZE * 2);
    f.export().resize();
    let code = client.recv_backend_request(Duration::from_secs(5)).unwrap();
    assert_eq!(code, 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    assert_eq!(
        client.config().unwrap().capacity,
        (DISK_SIZE * 2 / 512) as u64
    );
    let end = (DISK_SIZE * 2 / 512) as u64 - 1;
    assert_eq!(client.queue(0).write(end, &[5; 512]).unwrap(), 0);
    // Without a front-end, resize is a no-op.
    drop(client);
    f.wait_connected(false);
    f.export().resize();
}

#[test]
fn stop_while_connected_returns_promptly() {
    let mut f = Fixture::writable();
    let mut client = f.connect(&ClientOptions {
        num_queues: 1,
        event_idx: true,
        ..Default::default()
    });
    assert_eq!(client.queue(0).flush().unwrap(), 0);
    f.wait_connected(true);
    let export = f.export.take().unwrap();
    let t = Instant::now();
    export.stop();
    // Waiting for the front-end would take forever; the bound leaves room
    // for a loaded machine's scheduling.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(
        client.frontend.get_features().is_err(),
        "front-end still served after stop"
    );
    assert!(!f.path.exists(), "socket file left behind");
    // Accepting a stopped export fails.
    assert!(Client::connect(&f.path, &ClientOptions::default()).is_err());
}

#[test]
fn stop_without_front_end() {
    let mut f = Fixture::writable();
    let t = Instant::now();
    f.export.take().unwrap().stop();
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn garbage_on_the_socket_does_not_kill_the_export() {
    use std::io::Write;
    let f = Fixture::writable();
    let mut s = std::os::unix::net::UnixStream::connect(&f.path).unwrap();
    s.write_all(&[0xff; 12]).unwrap();
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        std::io::Read::read(&mut s, &mut buf).unwrap(),
        0,
        "connection must be closed"
    );
    drop(s);
    f.wait_connected(false);
    let mut client = f.connect(&ClientOptions::default());
    assert_eq!(client.queue(0).flush().unwrap(), 0);
    assert!(client
        .offered_protocol_features
        .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
}
