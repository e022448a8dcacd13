//! Test helpers: an in-memory [`BlockDisk`] and a minimal vhost-user-blk
//! front-end ("guest driver") that talks to any vhost-user-blk back-end over
//! its socket, ours or QSD's. One request in flight per queue.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{BlockDisk, ConfigSpace, CONFIG_SPACE_SIZE};

/// A disk operation other than read/write, as recorded by [`MemDisk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskOp {
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// A [`BlockDisk`] in memory that records flushes, discards and write-zeroes.
#[derive(Debug, Default)]
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    ops: Mutex<Vec<DiskOp>>,
    writes: AtomicU64,
}

impl MemDisk {
    pub fn new(size: usize) -> Self {
        MemDisk {
            data: RwLock::new(vec![0; size]),
            ..Default::default()
        }
    }

    /// A disk whose byte `i` is `(i / 512) as u8 ^ (i % 251) as u8`.
    pub fn patterned(size: usize) -> Self {
        let data = (0..size)
            .map(|i| (i / 512) as u8 ^ (i % 251) as u8)
            .collect();
        MemDisk {
            data: RwLock::new(data),
            ..Default::default()
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    pub fn set_size(&self, size: usize) {
        if let Ok(mut d) = self.data.write() {
            d.resize(size, 0);
        }
    }

    pub fn ops(&self) -> Vec<DiskOp> {
        self.ops.lock().map(|o| o.clone()).unwrap_or_default()
    }

    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn record(&self, op: DiskOp) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.push(op);
        }
    }

    fn range(&self, len: usize, offset: u64, size: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(io::Error::other(format!(
                "{len} bytes at {offset} are past the end"
            ))),
        }
    }
}

impl BlockDisk for MemDisk {
    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let data = self.data.read().map_err(|_| io::Error::other("poisoned"))?;
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            let r = self.range(buf.len(), pos, data.len())?;
            buf.copy_from_slice(&data[r]);
            pos += buf.len() as u64;
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut data = self
            .data
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        let mut pos = offset;
        for buf in bufs {
            let r = self.range(buf.len(), pos, data.len())?;
            data[r].copy_from_slice(buf);
            pos += buf.len() as u64;
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.record(DiskOp::Flush);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(DiskOp::Discard { offset, len });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mut data = self
            .data
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        let r = self.range(
            usize::try_from(len).map_err(io::Error::other)?,
            offset,
            data.len(),
        )?;
        data[r].fill(0);
        self.record(DiskOp::WriteZeroes { offset, len, unmap });
        Ok(())
    }
}

fn vhost_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Guest RAM at `base` backed by a memfd, so it can be shared with a back-end.
pub fn memfd_memory(base: u64, size: usize) -> io::Result<GuestMemoryMmap> {
    // SAFETY: the name is a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vhost-blk-test".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(base),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(vhost_err)
}

/// The vhost-user description of the region of `mem` that starts at `base`.
pub fn region_info(mem: &GuestMemoryMmap, base: u64) -> io::Result<VhostUserMemoryRegionInfo> {
    let region = mem
        .find_region(GuestAddress(base))
        .ok_or_else(|| io::Error::other(format!("no region at {base:#x}")))?;
    VhostUserMemoryRegionInfo::from_guest_region(region).map_err(vhost_err)
}

/// What the harness asks of the back-end.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub event_idx: bool,
    /// Pass a back-end request channel (needed for config-change messages).
    pub backend_req: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: 128,
            event_idx: false,
            backend_req: true,
        }
    }
}

/// Answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u8,
    pub data: Vec<u8>,
    pub used_len: u32,
}

const RING_AREA: u64 = 0x1000;
const RING_STRIDE: u64 = 0x1_0000;
const BUF_AREA: u64 = 0x40_0000;
const BUF_STRIDE: u64 = 0x10_0000;
const STATUS_POISON: u8 = 0xee;

/// One virtqueue driven synchronously by the harness.
pub struct ClientQueue {
    mem: GuestMemoryMmap,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    kick: EventFd,
    call: EventFd,
    submitted: u16,
    buf: u64,
    event_idx: bool,
    timeout: Duration,
}

impl ClientQueue {
    /// Guest address of this queue's scratch buffer (1 MiB).
    pub fn buffer(&self) -> u64 {
        self.buf
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// How long to wait for a completion before failing with TimedOut.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The `avail_event` the device wrote after the used ring (EVENT_IDX).
    pub fn avail_event(&self) -> io::Result<u16> {
        let addr = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        self.mem.read_obj::<u16>(addr).map_err(vhost_err)
    }

    /// Submits a chain of (guest address, length, device-writable) descriptors
    /// and waits for it to be used; returns the used length.
    pub fn submit(&mut self, descs: &[(u64, u32, bool)]) -> io::Result<u32> {
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let last = i + 1 == descs.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(
                i as u16,
                addr,
                len,
                flags,
                if last { 0 } else { i as u16 + 1 },
            )?;
        }
        self.publish(0)
    }

    /// Like [`ClientQueue::submit`] with the chain in an indirect table.
    pub fn submit_indirect(&mut self, descs: &[(u64, u32, bool)]) -> io::Result<u32> {
        let table = self.buf + BUF_STRIDE - 0x1000;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let last = i + 1 == descs.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = GuestAddress(table + 16 * i as u64);
            self.write_raw_desc(at, addr, len, flags, if last { 0 } else { i as u16 + 1 })?;
        }
        self.write_desc(
            0,
            table,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )?;
        self.publish(0)
    }

    fn write_raw_desc(
        &self,
        at: GuestAddress,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> io::Result<()> {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).map_err(vhost_err)
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> io::Result<()> {
        self.write_raw_desc(
            self.desc.unchecked_add(16 * u64::from(index)),
            addr,
            len,
            flags,
            next,
        )
    }

    fn publish(&mut self, head: u16) -> io::Result<u32> {
        let slot = u64::from(self.submitted % self.size);
        let m = |e| vhost_err(e);
        self.mem
            .write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .map_err(m)?;
        if self.event_idx {
            // used_event: notify us once this request is used.
            let used_event = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
            self.mem.write_obj(self.submitted, used_event).map_err(m)?;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let new_idx = self.submitted.wrapping_add(1);
        self.mem
            .write_obj(new_idx, self.avail.unchecked_add(2))
            .map_err(m)?;
        std::sync::atomic::fence(Ordering::SeqCst);
        self.kick.write(1)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let used_idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).map_err(m)?;
            if used_idx == new_idx {
                break;
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request not completed",
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            let _ = self.call.read();
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let elem = self.used.unchecked_add(4 + 8 * slot);
        let id: u32 = self.mem.read_obj(elem).map_err(m)?;
        let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).map_err(m)?;
        self.submitted = new_idx;
        if id != u32::from(head) {
            return Err(io::Error::other(format!("used id {id}, expected {head}")));
        }
        Ok(len)
    }

    /// Sends a request laid out as header, `out` (readable), `in_len`
    /// writable bytes and a status byte, in separate descriptors.
    pub fn request(
        &mut self,
        req_type: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
    ) -> io::Result<Reply> {
        let hdr = self.buf;
        let out_at = self.buf + 0x1000;
        let in_at = out_at + (out.len() as u64).div_ceil(0x1000) * 0x1000;
        let status_at = in_at + (in_len as u64).div_ceil(0x1000) * 0x1000;
        if status_at >= self.buf + BUF_STRIDE - 0x1000 {
            return Err(io::Error::other("request too large for the harness buffer"));
        }
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(hdr))
            .map_err(vhost_err)?;
        self.mem
            .write_slice(out, GuestAddress(out_at))
            .map_err(vhost_err)?;
        self.mem
            .write_slice(&vec![0u8; in_len], GuestAddress(in_at))
            .map_err(vhost_err)?;
        self.mem
            .write_obj(STATUS_POISON, GuestAddress(status_at))
            .map_err(vhost_err)?;
        let mut descs = vec![(hdr, 16, false)];
        if !out.is_empty() {
            descs.push((out_at, out.len() as u32, false));
        }
        if in_len > 0 {
            descs.push((in_at, in_len as u32, true));
        }
        descs.push((status_at, 1, true));
        let used_len = self.submit(&descs)?;
        let status: u8 = self
            .mem
            .read_obj(GuestAddress(status_at))
            .map_err(vhost_err)?;
        let mut data = vec![0u8; in_len];
        self.mem
            .read_slice(&mut data, GuestAddress(in_at))
            .map_err(vhost_err)?;
        Ok(Reply {
            status,
            data,
            used_len,
        })
    }

    pub fn read(&mut self, sector: u64, len: usize) -> io::Result<Reply> {
        self.request(VIRTIO_BLK_T_IN, sector, &[], len)
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> io::Result<u8> {
        Ok(self.request(VIRTIO_BLK_T_OUT, sector, data, 0)?.status)
    }

    pub fn flush(&mut self) -> io::Result<u8> {
        Ok(self.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0)?.status)
    }

    pub fn get_id(&mut self) -> io::Result<Reply> {
        self.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20)
    }

    /// DISCARD or WRITE_ZEROES with one segment.
    pub fn discard_write_zeroes(
        &mut self,
        req_type: u32,
        sector: u64,
        num_sectors: u32,
        flags: u32,
    ) -> io::Result<u8> {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        Ok(self.request(req_type, 0, &seg, 0)?.status)
    }
}

/// A connected vhost-user-blk front-end with guest RAM and ready queues.
pub struct Client {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap,
    /// Virtio features the back-end offered.
    pub offered_features: u64,
    /// Protocol features the back-end offered.
    pub offered_protocol_features: VhostUserProtocolFeatures,
    /// Our end of the back-end request channel, if requested.
    pub backend_channel: Option<UnixStream>,
    queues: Vec<Option<ClientQueue>>,
}

impl Client {
    /// Connects to `path`, negotiates and sets up `options.num_queues` queues.
    pub fn connect(path: impl AsRef<Path>, options: &ClientOptions) -> io::Result<Client> {
        let mut fe = Frontend::connect(path, u64::from(options.num_queues)).map_err(vhost_err)?;
        fe.set_owner().map_err(vhost_err)?;
        let offered = fe.get_features().map_err(vhost_err)?;
        let mut acked = offered;
        if !options.event_idx {
            acked &= !(1u64 << VIRTIO_RING_F_EVENT_IDX);
        }
        fe.set_features(acked).map_err(vhost_err)?;
        let offered_pf = fe.get_protocol_features().map_err(vhost_err)?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ;
        fe.set_protocol_features(offered_pf & wanted)
            .map_err(vhost_err)?;
        if offered_pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // As QEMU: wait for each message to be applied before going on,
            // so control messages cannot race with queue kicks.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_channel =
            if options.backend_req && offered_pf.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
                let (ours, theirs) = UnixStream::pair()?;
                fe.set_backend_request_fd(&theirs).map_err(vhost_err)?;
                Some(ours)
            } else {
                None
            };
        let n = u64::from(options.num_queues);
        let mem_size = (BUF_AREA + n * BUF_STRIDE).max(16 << 20) as usize;
        let mem = memfd_memory(0, mem_size)?;
        fe.set_mem_table(&[region_info(&mem, 0)?])
            .map_err(vhost_err)?;
        let qs = u64::from(options.queue_size);
        let mut queues = Vec::new();
        for i in 0..usize::from(options.num_queues) {
            let desc = GuestAddress(RING_AREA + i as u64 * RING_STRIDE);
            let avail = desc.unchecked_add(16 * qs);
            let used = GuestAddress((avail.0 + 6 + 2 * qs).div_ceil(4) * 4);
            let hva =
                |a: GuestAddress| mem.get_host_address(a).map(|p| p as u64).map_err(vhost_err);
            let q = ClientQueue {
                mem: mem.clone(),
                size: options.queue_size,
                desc,
                avail,
                used,
                kick: EventFd::new(EFD_NONBLOCK)?,
                call: EventFd::new(EFD_NONBLOCK)?,
                submitted: 0,
                buf: BUF_AREA + i as u64 * BUF_STRIDE,
                event_idx: options.event_idx && offered & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
                // Generous for a loaded machine; tests that expect no
                // completion set a short one.
                timeout: Duration::from_secs(30),
            };
            fe.set_vring_num(i, options.queue_size).map_err(vhost_err)?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: options.queue_size,
                    queue_size: options.queue_size,
                    flags: 0,
                    desc_table_addr: hva(desc)?,
                    used_ring_addr: hva(used)?,
                    avail_ring_addr: hva(avail)?,
                    log_addr: None,
                },
            )
            .map_err(vhost_err)?;
            fe.set_vring_base(i, 0).map_err(vhost_err)?;
            fe.set_vring_call(i, &q.call).map_err(vhost_err)?;
            fe.set_vring_kick(i, &q.kick).map_err(vhost_err)?;
            fe.set_vring_enable(i, true).map_err(vhost_err)?;
            queues.push(Some(q));
        }
        Ok(Client {
            frontend: fe,
            mem,
            offered_features: offered,
            offered_protocol_features: offered_pf,
            backend_channel,
            queues,
        })
    }

    /// Queue `index`, unless it was taken.
    pub fn queue(&mut self, index: usize) -> &mut ClientQueue {
        match self.queues.get_mut(index).and_then(Option::as_mut) {
            Some(q) => q,
            None => panic!("queue {index} does not exist or was taken"),
        }
    }

    /// Takes queue `index` out, e.g. to drive it from another thread.
    pub fn take_queue(&mut self, index: usize) -> Option<ClientQueue> {
        self.queues.get_mut(index).and_then(Option::take)
    }

    /// GET_CONFIG of the whole config space we know.
    pub fn config(&mut self) -> io::Result<ConfigSpace> {
        let (_, payload) = self
            .frontend
            .get_config(
                0,
                CONFIG_SPACE_SIZE as u32,
                VhostUserConfigFlags::WRITABLE,
                &[0u8; CONFIG_SPACE_SIZE],
            )
            .map_err(vhost_err)?;
        ConfigSpace::from_bytes(&payload).ok_or_else(|| io::Error::other("short config space"))
    }

    /// Waits for a message on the back-end channel and returns its request code.
    pub fn recv_backend_request(&self, timeout: Duration) -> io::Result<u32> {
        let chan = self
            .backend_channel
            .as_ref()
            .ok_or_else(|| io::Error::other("no back-end channel"))?;
        chan.set_read_timeout(Some(timeout))?;
        let mut hdr = [0u8; 12];
        io::Read::read_exact(&mut &*chan, &mut hdr)?;
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let mut body = vec![0u8; size];
        io::Read::read_exact(&mut &*chan, &mut body)?;
        Ok(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]))
    }
}
