//! Request parsing and processing on mock split-queue chains (no socket).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::request::{process_chain, DeviceContext};
use crate::test_utils::{DiskOp, MemDisk};

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x20_0000;
const DISK_SIZE: usize = 1 << 20;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Setup {
    mem: GuestMemoryMmap,
    disk: Arc<MemDisk>,
    ctx: DeviceContext,
}

fn setup(writable: bool, lbs: u64) -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let disk = Arc::new(MemDisk::patterned(DISK_SIZE));
    let ctx = DeviceContext {
        disk: disk.clone(),
        serial: b"export-serial-0123456789".to_vec(),
        logical_block_size: lbs,
        writable,
        writeback: AtomicBool::new(true),
    };
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    Setup { mem, disk, ctx }
}

impl Setup {
    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs a chain given as (addr, len, flags); NEXT links are added.
    /// Returns (used length, status byte).
    fn run(&self, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(Descriptor::new(
                    addr,
                    len,
                    flags,
                    if last { 0 } else { i as u16 + 1 },
                ))
            })
            .collect();
        self.run_raw(&raw)
    }

    fn run_raw(&self, raw: &[RawDescriptor]) -> (u32, u8) {
        let q = MockSplitQueue::create(&self.mem, GuestAddress(0), 256);
        q.add_desc_chains(raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&self.mem).unwrap();
        let used = process_chain(chain, &self.mem, &self.ctx);
        (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn dwz_segment(&self, sector: u64, num: u32, flags: u32, at: u64) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(at)).unwrap();
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_fills_guest_buffers() {
    let s = setup(false, 512);
    s.header(VIRTIO_BLK_T_IN, 2);
    let (used, status) = s.run(&[
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 0x1000, 512, W),
        (STATUS, 1, W),
    ]);
    assert_eq!((used, status), (1025, OK));
    let disk = s.disk.contents();
    let mut got = vec![0u8; 512];
    s.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk[1024..1536]);
    s.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, disk[1536..2048]);
}

#[test]
fn status_may_share_the_last_data_descriptor() {
    let s = setup(false, 512);
    s.header(VIRTIO_BLK_T_IN, 1);
    let (used, status) = s.run(&[(HDR, 16, R), (STATUS - 512, 513, W)]);
    assert_eq!((used, status), (513, OK));
    let mut got = vec![0u8; 512];
    s.mem
        .read_slice(&mut got, GuestAddress(STATUS - 512))
        .unwrap();
    assert_eq!(got, s.disk.contents()[512..1024]);
}

#[test]
fn write_goes_to_disk_and_flushes_in_writethrough() {
    let s = setup(true, 512);
    s.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    s.header(VIRTIO_BLK_T_OUT, 4);
    let (used, status) = s.run(&[
        (HDR, 16, R),
        (DATA, 512, R),
        (DATA + 512, 512, R),
        (STATUS, 1, W),
    ]);
    assert_eq!((used, status), (1, OK));
    assert!(s.disk.contents()[2048..3072].iter().all(|&b| b == 0xab));
    assert_eq!(
        s.disk.contents()[3072],
        MemDisk::patterned(DISK_SIZE).contents()[3072]
    );
    assert!(s.disk.ops().is_empty(), "writeback must not flush");

    s.ctx
        .writeback
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (_, status) = s.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(status, OK);
    assert_eq!(s.disk.ops(), vec![DiskOp::Flush]);
}

#[test]
fn header_and_data_in_one_descriptor() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_OUT, 0);
    s.mem
        .write_slice(&[0x5a; 512], GuestAddress(HDR + 16))
        .unwrap();
    let (_, status) = s.run(&[(HDR, 16 + 512, R), (STATUS, 1, W)]);
    assert_eq!(status, OK);
    assert!(s.disk.contents()[..512].iter().all(|&b| b == 0x5a));
}

#[test]
fn write_to_read_only_export_fails() {
    let s = setup(false, 512);
    s.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]).1,
        IOERR
    );
    assert_eq!(s.disk.write_count(), 0);
}

#[test]
fn wrong_data_direction_is_ioerr() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
        (1, IOERR)
    );
    s.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
        (513, IOERR)
    );
    assert_eq!(s.disk.write_count(), 0);
}

#[test]
fn readable_after_writable_is_ioerr() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[
            (HDR, 16, R),
            (DATA, 512, W),
            (DATA + 0x1000, 512, R),
            (STATUS, 1, W)
        ])
        .1,
        IOERR
    );
}

#[test]
fn missing_status_consumes_with_zero_length() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_IN, 0);
    // Last descriptor readable: no status byte.
    assert_eq!(s.run(&[(HDR, 16, R), (STATUS, 1, R)]), (0, 0xee));
    // Zero-length status descriptor.
    assert_eq!(s.run(&[(HDR, 16, R), (STATUS, 0, W)]), (0, 0xee));
    // Status outside guest memory.
    assert_eq!(s.run(&[(HDR, 16, R), (0x1000_0000, 1, W)]).0, 0);
}

#[test]
fn truncated_chain_is_dropped() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_IN, 0);
    // The second descriptor points past the 256-entry table.
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(
            STATUS,
            1,
            W | VRING_DESC_F_NEXT as u16,
            300,
        )),
    ];
    assert_eq!(s.run_raw(&raw), (0, 0xee));
}

#[test]
fn missing_header_is_ioerr() {
    let s = setup(true, 512);
    assert_eq!(s.run(&[(HDR, 8, R), (STATUS, 1, W)]), (1, IOERR));
    assert_eq!(s.run(&[(STATUS, 1, W)]), (1, IOERR));
}

#[test]
fn out_of_range_and_unaligned_requests_are_ioerr() {
    let s = setup(true, 4096);
    let sectors = (DISK_SIZE / 512) as u64;
    s.header(VIRTIO_BLK_T_IN, sectors - 8);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]).1,
        OK
    );
    s.header(VIRTIO_BLK_T_IN, sectors);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]).1,
        IOERR
    );
    s.header(VIRTIO_BLK_T_IN, u64::MAX / 256);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]).1,
        IOERR
    );
    // Sector not aligned to the 4 KiB logical block.
    s.header(VIRTIO_BLK_T_IN, 1);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]).1,
        IOERR
    );
    // Length not a multiple of the logical block / of 512.
    s.header(VIRTIO_BLK_T_OUT, 8);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]).1,
        IOERR
    );
    s.header(VIRTIO_BLK_T_OUT, 8);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 4097, R), (STATUS, 1, W)]).1,
        IOERR
    );
    assert_eq!(s.disk.write_count(), 0);
}

#[test]
fn too_many_segments_is_ioerr() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![(HDR, 16, R)];
    descs.extend((0..127).map(|i| (DATA + i * 512, 512, W)));
    descs.push((STATUS, 1, W));
    assert_eq!(s.run(&descs).1, IOERR);
    descs.remove(1);
    assert_eq!(s.run(&descs).1, OK);
}

#[test]
fn data_outside_guest_memory_is_ioerr() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.run(&[(HDR, 16, R), (0x3f_ff00, 512, W), (STATUS, 1, W)])
            .1,
        IOERR
    );
    s.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        s.run(&[(HDR, 16, R), (u64::MAX - 100, 512, R), (STATUS, 1, W)])
            .1,
        IOERR
    );
    assert_eq!(s.disk.write_count(), 0);
}

#[test]
fn indirect_chain_works() {
    let s = setup(false, 512);
    s.header(VIRTIO_BLK_T_IN, 3);
    let table = 0x30_0000u64;
    let entries = [
        Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        Descriptor::new(DATA, 512, W | VRING_DESC_F_NEXT as u16, 2),
        Descriptor::new(STATUS, 1, W, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        s.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let head = RawDescriptor::from(Descriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0));
    assert_eq!(s.run_raw(&[head]), (513, OK));
    let mut got = vec![0u8; 512];
    s.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, s.disk.contents()[1536..2048]);
    // An indirect table whose length is not a multiple of 16 is malformed.
    s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let bad = RawDescriptor::from(Descriptor::new(table, 47, VRING_DESC_F_INDIRECT as u16, 0));
    assert_eq!(s.run_raw(&[bad]), (0, 0xee));
}

#[test]
fn flush_get_id_and_unknown_types() {
    let s = setup(true, 512);
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(s.run(&[(HDR, 16, R), (STATUS, 1, W)]), (1, OK));
    assert_eq!(s.disk.ops(), vec![DiskOp::Flush]);
    s.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        s.run(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]),
        (21, OK)
    );
    let mut id = [0u8; 20];
    s.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"export-serial-012345");
    s.header(VIRTIO_BLK_T_SCSI_CMD, 0);
    assert_eq!(s.run(&[(HDR, 16, R), (STATUS, 1, W)]).1, UNSUPP);
    s.header(0x4242, 0);
    assert_eq!(s.run(&[(HDR, 16, R), (STATUS, 1, W)]).1, UNSUPP);
    // The barrier bit is ignored.
    s.header(VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_BARRIER, 0);
    assert_eq!(s.run(&[(HDR, 16, R), (STATUS, 1, W)]).1, OK);
}

#[test]
fn discard_and_write_zeroes_segments() {
    let s = setup(true, 512);
    let seg = DATA;
    let run = |t: u32, len: u32| {
        s.header(t, 0);
        s.run(&[(HDR, 16, R), (seg, len, R), (STATUS, 1, W)]).1
    };
    s.dwz_segment(2, 4, 0, seg);
    assert_eq!(run(VIRTIO_BLK_T_DISCARD, 16), OK);
    s.dwz_segment(2, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, seg);
    assert_eq!(run(VIRTIO_BLK_T_DISCARD, 16), UNSUPP, "discard with UNMAP");
    assert_eq!(run(VIRTIO_BLK_T_WRITE_ZEROES, 16), OK);
    s.dwz_segment(2, 4, 2, seg);
    assert_eq!(run(VIRTIO_BLK_T_WRITE_ZEROES, 16), UNSUPP, "unknown flag");
    s.dwz_segment(2, 4, 0, seg);
    s.dwz_segment(10, 4, 0, seg + 16);
    assert_eq!(run(VIRTIO_BLK_T_DISCARD, 32), UNSUPP, "two segments");
    assert_eq!(run(VIRTIO_BLK_T_DISCARD, 8), IOERR, "short segment");
    s.dwz_segment(0, 32769, 0, seg);
    assert_eq!(
        run(VIRTIO_BLK_T_WRITE_ZEROES, 16),
        IOERR,
        "too many sectors"
    );
    s.dwz_segment((DISK_SIZE / 512) as u64 - 1, 2, 0, seg);
    assert_eq!(run(VIRTIO_BLK_T_DISCARD, 16), IOERR, "past the end");
    assert_eq!(
        s.disk.ops(),
        vec![
            DiskOp::Discard {
                offset: 1024,
                len: 2048
            },
            DiskOp::WriteZeroes {
                offset: 1024,
                len: 2048,
                unmap: true
            },
        ]
    );
    assert!(s.disk.contents()[1024..3072].iter().all(|&b| b == 0));

    let ro = setup(false, 512);
    ro.dwz_segment(0, 1, 0, seg);
    ro.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        ro.run(&[(HDR, 16, R), (seg, 16, R), (STATUS, 1, W)]).1,
        IOERR
    );
    assert!(ro.disk.ops().is_empty());
}
