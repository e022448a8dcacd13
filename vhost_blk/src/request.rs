//! virtio-blk request lifecycle: descriptor chain → [`Request::parse`] →
//! validated [`Request`] → [`Request::execute`] → status byte.

use std::io::{self, IoSlice, IoSliceMut};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{
    MAX_DISCARD_WZ_SECTORS, MAX_DISCARD_WZ_SEG, SECTOR_SIZE, SEG_MAX, SERIAL_MAX_LEN,
};
use crate::BlockDisk;

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
const OUTHDR_SIZE: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEGMENT_SIZE: u64 = 16;

/// What a request needs from the device: the disk and the export settings.
pub(crate) struct DeviceContext {
    pub disk: Arc<dyn BlockDisk>,
    pub serial: Vec<u8>,
    pub logical_block_size: u64,
    pub writable: bool,
    /// Config `wce`: false means flush after every write (writethrough).
    pub writeback: AtomicBool,
}

/// A contiguous piece of guest memory named by a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// Drops `n` bytes from the front of `segs`; false if they hold fewer.
fn discard_front(segs: &mut Vec<Segment>, mut n: u64) -> bool {
    while n > 0 {
        let Some(first) = segs.first_mut() else {
            return false;
        };
        if first.len > n {
            first.addr = first.addr.unchecked_add(n);
            first.len -= n;
            return true;
        }
        n -= first.len;
        segs.remove(0);
    }
    segs.retain(|s| s.len > 0);
    true
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Copies the first `buf.len()` bytes of `segs` out of guest memory.
fn read_from_segments(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        if mem.read_slice(&mut buf[done..done + n], seg.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Copies `data` into guest memory along `segs` (as far as they reach).
fn write_to_segments(mem: &GuestMemoryMmap, segs: &[Segment], data: &[u8]) -> bool {
    let mut done = 0usize;
    for seg in segs {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        if mem.write_slice(&data[done..done + n], seg.addr).is_err() {
            return false;
        }
        done += n;
    }
    true
}

/// A validated request, ready to run.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Read { offset: u64, data: Vec<Segment> },
    Write { offset: u64, data: Vec<Segment> },
    Flush,
    GetId { data: Vec<Segment> },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub kind: RequestKind,
    pub status_addr: GuestAddress,
    /// Used length reported to the guest: all device-writable bytes (as QEMU).
    pub used_len: u32,
}

/// Why a chain did not become a [`Request`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// No usable status byte: the chain is returned with used length 0.
    NoStatus(&'static str),
    /// The request is answered with `status` (IOERR or UNSUPP) without running.
    Rejected {
        status_addr: GuestAddress,
        used_len: u32,
        status: u8,
        reason: String,
    },
}

/// Device-side view of a chain: readable part, writable part, status byte.
struct ChainLayout {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    status_addr: GuestAddress,
    used_len: u32,
    misordered: bool,
}

impl ChainLayout {
    fn collect<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<Self, ParseError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut misordered = false;
        let mut last: Option<Descriptor> = None;
        for desc in chain {
            let seg = Segment {
                addr: desc.addr(),
                len: u64::from(desc.len()),
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else {
                misordered |= !writable.is_empty();
                readable.push(seg);
            }
            last = Some(desc);
        }
        let Some(last) = last else {
            return Err(ParseError::NoStatus("empty or unreadable descriptor chain"));
        };
        // The iterator stops early on a bad `next` or indirect table; the last
        // descriptor then still has NEXT set.
        if last.has_next() {
            return Err(ParseError::NoStatus("descriptor chain is truncated"));
        }
        if !last.is_write_only() || last.len() == 0 {
            return Err(ParseError::NoStatus(
                "last descriptor is not a writable status byte",
            ));
        }
        let status_addr = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .ok_or(ParseError::NoStatus("status byte address overflows"))?;
        if GuestMemoryBackend::get_slice(mem, status_addr, 1).is_err() {
            return Err(ParseError::NoStatus("status byte is outside guest memory"));
        }
        let used_len = u32::try_from(total_len(&writable)).unwrap_or(u32::MAX);
        // The status byte is not data.
        if let Some(seg) = writable.last_mut() {
            seg.len -= 1;
        }
        writable.retain(|s| s.len > 0);
        readable.retain(|s| s.len > 0);
        Ok(ChainLayout {
            readable,
            writable,
            status_addr,
            used_len,
            misordered,
        })
    }

    fn reject(&self, status: u32, reason: impl Into<String>) -> ParseError {
        ParseError::Rejected {
            status_addr: self.status_addr,
            used_len: self.used_len,
            status: status as u8,
            reason: reason.into(),
        }
    }
}

impl Request {
    /// Validates a chain against the device's rules (QEMU's virtio-blk-handler semantics).
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        ctx: &DeviceContext,
    ) -> Result<Request, ParseError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let layout = ChainLayout::collect(chain, mem)?;
        if layout.misordered {
            return Err(layout.reject(
                VIRTIO_BLK_S_IOERR,
                "device-readable descriptor after a device-writable one",
            ));
        }
        let mut hdr = [0u8; OUTHDR_SIZE as usize];
        if !read_from_segments(mem, &layout.readable, &mut hdr) {
            return Err(layout.reject(VIRTIO_BLK_S_IOERR, "request header missing or unreadable"));
        }
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) & !VIRTIO_BLK_T_BARRIER;
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let mut out = layout.readable.clone();
        discard_front(&mut out, OUTHDR_SIZE);
        let kind = match req_type {
            VIRTIO_BLK_T_IN => {
                if !out.is_empty() {
                    return Err(layout.reject(VIRTIO_BLK_S_IOERR, "read with device-readable data"));
                }
                let offset = check_range(&layout, ctx, sector, &layout.writable)?;
                RequestKind::Read {
                    offset,
                    data: layout.writable.clone(),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if !layout.writable.is_empty() {
                    return Err(
                        layout.reject(VIRTIO_BLK_S_IOERR, "write with device-writable data")
                    );
                }
                let offset = check_range(&layout, ctx, sector, &out)?;
                if !ctx.writable {
                    return Err(layout.reject(VIRTIO_BLK_S_IOERR, "write to a read-only export"));
                }
                RequestKind::Write { offset, data: out }
            }
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId {
                data: layout.writable.clone(),
            },
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                parse_discard_write_zeroes(&layout, ctx, mem, req_type, &out)?
            }
            other => {
                return Err(layout.reject(
                    VIRTIO_BLK_S_UNSUPP,
                    format!("unsupported request type {other}"),
                ))
            }
        };
        Ok(Request {
            kind,
            status_addr: layout.status_addr,
            used_len: layout.used_len,
        })
    }

    /// Runs the request against the disk and returns the status byte.
    pub fn execute(&self, mem: &GuestMemoryMmap, ctx: &DeviceContext) -> u8 {
        let result = match &self.kind {
            RequestKind::Read { offset, data } => read_into_guest(mem, &*ctx.disk, data, *offset),
            RequestKind::Write { offset, data } => write_from_guest(mem, &*ctx.disk, data, *offset)
                .and_then(|()| flush_if_writethrough(ctx)),
            RequestKind::Flush => ctx.disk.flush(),
            RequestKind::GetId { data } => {
                let mut id = [0u8; SERIAL_MAX_LEN];
                let n = ctx.serial.len().min(SERIAL_MAX_LEN);
                id[..n].copy_from_slice(&ctx.serial[..n]);
                let len = usize::try_from(total_len(data))
                    .unwrap_or(usize::MAX)
                    .min(SERIAL_MAX_LEN);
                if write_to_segments(mem, data, &id[..len]) {
                    Ok(())
                } else {
                    Err(io::Error::other("GET_ID buffer outside guest memory"))
                }
            }
            RequestKind::Discard { offset, len } => ctx.disk.discard(*offset, *len),
            RequestKind::WriteZeroes { offset, len, unmap } => ctx
                .disk
                .write_zeroes(*offset, *len, *unmap)
                .and_then(|()| flush_if_writethrough(ctx)),
        };
        match result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                warn!(
                    "vhost-user-blk export '{}': {:?} failed: {e}",
                    String::from_utf8_lossy(&ctx.serial),
                    self.kind_name()
                );
                VIRTIO_BLK_S_IOERR as u8
            }
        }
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            RequestKind::Read { .. } => "read",
            RequestKind::Write { .. } => "write",
            RequestKind::Flush => "flush",
            RequestKind::GetId { .. } => "get-id",
            RequestKind::Discard { .. } => "discard",
            RequestKind::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

fn flush_if_writethrough(ctx: &DeviceContext) -> io::Result<()> {
    if ctx.writeback.load(Ordering::Acquire) {
        Ok(())
    } else {
        ctx.disk.flush()
    }
}

/// Checks a byte range given in sectors against size, alignment and capacity.
fn check_sector_range(
    layout: &ChainLayout,
    ctx: &DeviceContext,
    sector: u64,
    len: u64,
) -> Result<u64, ParseError> {
    let lbs = ctx.logical_block_size;
    if !len.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(lbs) {
        return Err(layout.reject(
            VIRTIO_BLK_S_IOERR,
            format!("length {len} is not a multiple of the block size {lbs}"),
        ));
    }
    let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
        return Err(layout.reject(VIRTIO_BLK_S_IOERR, format!("sector {sector} overflows")));
    };
    if !offset.is_multiple_of(lbs) {
        return Err(layout.reject(
            VIRTIO_BLK_S_IOERR,
            format!("sector {sector} is not aligned to the block size {lbs}"),
        ));
    }
    let capacity = ctx.disk.size() / SECTOR_SIZE * SECTOR_SIZE;
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(offset),
        _ => Err(layout.reject(
            VIRTIO_BLK_S_IOERR,
            format!("{len} bytes at sector {sector} go past the capacity of {capacity} bytes"),
        )),
    }
}

fn check_range(
    layout: &ChainLayout,
    ctx: &DeviceContext,
    sector: u64,
    data: &[Segment],
) -> Result<u64, ParseError> {
    if data.len() > SEG_MAX as usize {
        return Err(layout.reject(
            VIRTIO_BLK_S_IOERR,
            format!("{} data segments exceed seg_max {SEG_MAX}", data.len()),
        ));
    }
    check_sector_range(layout, ctx, sector, total_len(data))
}

fn parse_discard_write_zeroes(
    layout: &ChainLayout,
    ctx: &DeviceContext,
    mem: &GuestMemoryMmap,
    req_type: u32,
    payload: &[Segment],
) -> Result<RequestKind, ParseError> {
    let payload_len = total_len(payload);
    if payload_len > DWZ_SEGMENT_SIZE * u64::from(MAX_DISCARD_WZ_SEG) {
        return Err(layout.reject(
            VIRTIO_BLK_S_UNSUPP,
            "more than one discard/write-zeroes segment",
        ));
    }
    let mut seg = [0u8; DWZ_SEGMENT_SIZE as usize];
    if payload_len < DWZ_SEGMENT_SIZE || !read_from_segments(mem, payload, &mut seg) {
        return Err(layout.reject(VIRTIO_BLK_S_IOERR, "discard/write-zeroes segment missing"));
    }
    let sector = u64::from_le_bytes([
        seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
    ]);
    let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    let is_discard = req_type == VIRTIO_BLK_T_DISCARD;
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
        || (is_discard && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
    {
        return Err(layout.reject(VIRTIO_BLK_S_UNSUPP, format!("unsupported flags {flags:#x}")));
    }
    if num_sectors > MAX_DISCARD_WZ_SECTORS {
        return Err(layout.reject(
            VIRTIO_BLK_S_IOERR,
            format!("{num_sectors} sectors exceed the limit of {MAX_DISCARD_WZ_SECTORS}"),
        ));
    }
    let len = u64::from(num_sectors) * SECTOR_SIZE;
    let offset = check_sector_range(layout, ctx, sector, len)?;
    if !ctx.writable {
        return Err(layout.reject(
            VIRTIO_BLK_S_IOERR,
            "discard/write-zeroes on a read-only export",
        ));
    }
    Ok(if is_discard {
        RequestKind::Discard { offset, len }
    } else {
        RequestKind::WriteZeroes {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    })
}

/// Guest memory slices of `segs`, split where guest regions end.
fn guest_slices<'a>(
    mem: &'a GuestMemoryMmap,
    segs: &[Segment],
) -> io::Result<Vec<vm_memory::VolatileSlice<'a, ()>>> {
    let mut slices = Vec::with_capacity(segs.len());
    for seg in segs {
        let len = usize::try_from(seg.len).map_err(io::Error::other)?;
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, len) {
            slices.push(slice.map_err(|e| {
                io::Error::other(format!(
                    "buffer at {:#x} (+{len}) is outside guest memory: {e}",
                    seg.addr.raw_value()
                ))
            })?);
        }
    }
    Ok(slices)
}

fn read_into_guest(
    mem: &GuestMemoryMmap,
    disk: &dyn BlockDisk,
    segs: &[Segment],
    offset: u64,
) -> io::Result<()> {
    let slices = guest_slices(mem, segs)?;
    if slices.is_empty() {
        return Ok(());
    }
    let mut bufs: Vec<IoSliceMut<'_>> = slices
        .iter()
        .map(|s| {
            // SAFETY: the slice lies inside a region of `mem` (vm-memory checked
            // the range), and the mapping stays valid while `mem` is borrowed,
            // which outlives `bufs`. The guest owns these bytes for the duration
            // of the request, so nothing in this process reads them meanwhile.
            IoSliceMut::new(unsafe {
                std::slice::from_raw_parts_mut(s.ptr_guard_mut().as_ptr(), s.len())
            })
        })
        .collect();
    disk.read_vectored_at(&mut bufs, offset)?;
    for s in &slices {
        s.bitmap().mark_dirty(0, s.len());
    }
    Ok(())
}

fn write_from_guest(
    mem: &GuestMemoryMmap,
    disk: &dyn BlockDisk,
    segs: &[Segment],
    offset: u64,
) -> io::Result<()> {
    let slices = guest_slices(mem, segs)?;
    if slices.is_empty() {
        return Ok(());
    }
    let bufs: Vec<IoSlice<'_>> = slices
        .iter()
        .map(|s| {
            // SAFETY: as in `read_into_guest`; the slice is only read.
            IoSlice::new(unsafe { std::slice::from_raw_parts(s.ptr_guard().as_ptr(), s.len()) })
        })
        .collect();
    disk.write_vectored_at(&bufs, offset)
}

/// Parses, runs and completes one chain; returns the used length.
pub(crate) fn process_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    ctx: &DeviceContext,
) -> u32
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let (status_addr, used_len, status) = match Request::parse(chain, mem, ctx) {
        Ok(req) => (req.status_addr, req.used_len, req.execute(mem, ctx)),
        Err(ParseError::NoStatus(reason)) => {
            debug!(
                "vhost-user-blk export '{}': dropping descriptor chain {head}: {reason}",
                String::from_utf8_lossy(&ctx.serial)
            );
            return 0;
        }
        Err(ParseError::Rejected {
            status_addr,
            used_len,
            status,
            reason,
        }) => {
            debug!(
                "vhost-user-blk export '{}': request {head} rejected: {reason}",
                String::from_utf8_lossy(&ctx.serial)
            );
            (status_addr, used_len, status)
        }
    };
    if mem.write_obj(status, status_addr).is_err() {
        // Checked during parsing; only a concurrent memory change gets here.
        return 0;
    }
    used_len
}
