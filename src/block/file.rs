//! The `file` (regular file) and `host_device` (block or character device)
//! protocol drivers: positioned, vectored system calls on one descriptor.
//!
//! Image locking follows QEMU's file-posix, so that blkd, qemu-storage-daemon,
//! qemu-img and QEMU guests see each other's claims: a node holds a shared
//! OFD read lock on byte 100+bit for each permission it uses and on byte
//! 200+bit for each permission it refuses to share with other users.

use std::alloc::Layout;
use std::ffi::CString;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::{Map, Value};

use nbd::QueuedWrite;

use super::page_map::{self, PageMap};
use super::{
    leading_writes, round_up_to_sector, write_zeroes_as_data, BlockDriver, CacheMode, DiscardMode,
    Extent, OpenContext, ZeroFlags, ZERO_CHUNK,
};
use crate::errno_text;

// Linux block-device ioctls (include/uapi/linux/fs.h) that libc does not define.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
const BLKDISCARD: libc::Ioctl = 0x1277;

/// The largest number of iovecs one preadv/pwritev takes.
const IOV_MAX: usize = 1024;

/// QEMU's permission bits (BLK_PERM_*), in lock-byte order, and their names
/// as its lock errors print them.
const PERM_CONSISTENT_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
const PERM_RESIZE: u32 = 1 << 3;
const PERM_ALL: u32 = 0xf;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    Regular,
    BlockDevice,
    CharDevice,
}

/// Alignment rules while the page cache is bypassed (`cache.direct=on`).
struct DirectIo {
    /// Offsets and lengths must be multiples of this.
    request_align: u64,
    /// Buffer addresses must be multiples of this.
    mem_align: usize,
    /// Writes that need read-modify-write of partial blocks take it
    /// exclusively; aligned writes share it, so neither overwrites the other.
    rmw: RwLock<()>,
}

pub struct FileDriver {
    fd: OwnedFd,
    filename: String,
    kind: FileKind,
    driver_name: &'static str,
    read_only: bool,
    discard: DiscardMode,
    no_flush: bool,
    locking: bool,
    direct: Option<DirectIo>,
    /// A regular file's length, kept up to date by our own writes instead of
    /// an fstat per request (the image is locked against other writers, and
    /// QEMU caches it the same way).
    file_len: AtomicU64,
    /// Where write payloads are received into the page cache, if they can be (see
    /// [`FileDriver::receive_writes`]).
    page_map: Option<PageMap>,
}

/// Opens a `file` or `host_device` node (picked by the `driver` member)
/// from schema-checked `blockdev-add` arguments.
pub fn open(opts: &Map<String, Value>, ctx: &OpenContext) -> Result<Box<dyn BlockDriver>, String> {
    let driver_name = match opts.get("driver").and_then(Value::as_str) {
        Some("host_device") => "host_device",
        _ => "file",
    };
    let filename = opts
        .get("filename")
        .and_then(Value::as_str)
        .ok_or("Parameter 'filename' is missing")?;
    if filename.is_empty() {
        return Err(format!(
            "The '{driver_name}' block driver requires a file name"
        ));
    }
    match opts.get("aio").and_then(Value::as_str).unwrap_or("threads") {
        "threads" => {}
        "native" if !ctx.cache_direct => return Err(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        ),
        other => {
            return Err(format!(
                "aio={other} is not supported by this build (use aio=threads)"
            ))
        }
    }
    if let Some(id) = opts.get("pr-manager").and_then(Value::as_str) {
        return Err(format!("No persistent reservation manager with id '{id}'"));
    }
    let locking = opts.get("locking").and_then(Value::as_str) != Some("off");

    let (fd, read_only) = open_fd(filename, ctx)?;
    let kind =
        file_kind(&fd).map_err(|e| format!("Could not stat '{filename}': {}", errno_text(&e)))?;
    match (driver_name, kind) {
        ("file", FileKind::Regular)
        | ("host_device", FileKind::BlockDevice | FileKind::CharDevice) => {}
        ("file", _) => {
            return Err(format!(
                "'file' driver requires '{filename}' to be a regular file"
            ))
        }
        _ => {
            return Err(format!(
            "'host_device' driver requires '{filename}' to be either a character or block device"
        ))
        }
    }
    if locking {
        let (perm, shared) = if read_only {
            // A reader lets others write, as QEMU's read-only exports do
            // (and force-share is only allowed on read-only nodes).
            (PERM_CONSISTENT_READ, PERM_ALL)
        } else {
            // A writer refuses other writers and resizers, like a QEMU guest disk.
            (
                PERM_CONSISTENT_READ | PERM_WRITE,
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            )
        };
        take_locks(fd.as_raw_fd(), perm, shared)?;
    }
    let direct = if ctx.cache_direct {
        let request_align = direct_io_alignment(&fd, kind);
        log::debug!("{filename}: O_DIRECT with {request_align}-byte alignment");
        Some(DirectIo {
            request_align,
            mem_align: request_align.max(512) as usize,
            rmw: RwLock::new(()),
        })
    } else {
        None
    };
    let maps_writes = kind == FileKind::Regular
        && !read_only
        && !ctx.cache_direct
        && page_map::reserves_space_on_fault(fd.as_fd());
    let driver = FileDriver {
        fd,
        filename: filename.to_string(),
        kind,
        driver_name,
        read_only,
        discard: ctx.discard,
        no_flush: ctx.cache_no_flush,
        locking,
        direct,
        file_len: AtomicU64::new(0),
        page_map: maps_writes.then(PageMap::default),
    };
    driver.refresh_file_len();
    Ok(Box::new(driver))
}

/// Opens the image, falling back to read-only with `auto-read-only` as QEMU
/// does. Returns the descriptor and whether it is read-only.
fn open_fd(filename: &str, ctx: &OpenContext) -> Result<(OwnedFd, bool), String> {
    let path = CString::new(filename)
        .map_err(|_| format!("Could not open '{filename}': Invalid argument"))?;
    let mut flags = libc::O_CLOEXEC;
    if ctx.cache_direct {
        flags |= libc::O_DIRECT;
    }
    let try_open = |access: libc::c_int| -> io::Result<OwnedFd> {
        // SAFETY: path is NUL-terminated; the descriptor is owned on success.
        let fd = unsafe { libc::open(path.as_ptr(), flags | access) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let failed = |e: io::Error| format!("Could not open '{filename}': {}", errno_text(&e));
    if ctx.read_only {
        return try_open(libc::O_RDONLY)
            .map(|fd| (fd, true))
            .map_err(failed);
    }
    match try_open(libc::O_RDWR) {
        Ok(fd) => Ok((fd, false)),
        Err(e)
            if ctx.auto_read_only
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EROFS | libc::EPERM)
                ) =>
        {
            try_open(libc::O_RDONLY)
                .map(|fd| (fd, true))
                .map_err(failed)
        }
        Err(e) => Err(failed(e)),
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn file_kind(fd: &OwnedFd) -> io::Result<FileKind> {
    let st = fstat(fd.as_raw_fd())?;
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::Regular,
        libc::S_IFBLK => FileKind::BlockDevice,
        _ => FileKind::CharDevice,
    })
}

/// The offset alignment O_DIRECT needs: the device's logical block size, or
/// what statx reports for a file; 4096 (always safe) when neither is known.
fn direct_io_alignment(fd: &OwnedFd, kind: FileKind) -> u64 {
    if kind == FileKind::BlockDevice {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::BLKSSZGET, &mut size) } == 0 && size > 0 {
            return size as u64;
        }
        return 4096;
    }
    // SAFETY: an all-zero statx is a valid value for statx to overwrite.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH stats the descriptor itself.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        return u64::from(stx.stx_dio_offset_align);
    }
    4096
}

fn lock_byte(
    fd: RawFd,
    byte: i64,
    lock_type: libc::c_int,
    cmd: libc::c_int,
) -> io::Result<libc::flock> {
    // SAFETY: an all-zero flock is valid; OFD locks require l_pid == 0.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = lock_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fl is a valid flock for the duration of the call.
    if unsafe { libc::fcntl(fd, cmd, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

/// Whether another open file description holds a lock on `byte`. A failed
/// test counts as a conflict, as in QEMU.
fn lock_conflicts(fd: RawFd, byte: i64) -> bool {
    match lock_byte(fd, byte, libc::F_WRLCK, libc::F_OFD_GETLK) {
        Ok(fl) => i32::from(fl.l_type) != libc::F_UNLCK,
        Err(_) => true,
    }
}

fn perm_bits(mask: u32) -> impl Iterator<Item = (i64, &'static str)> {
    (0..PERM_NAMES.len())
        .filter(move |bit| mask & (1 << bit) != 0)
        .map(|bit| (bit as i64, PERM_NAMES[bit]))
}

/// Announces `perm` and the refusal of everything outside `shared`, then
/// checks that no other user refuses what we use or uses what we refuse
/// (QEMU's raw_apply_lock_bytes + raw_check_lock_bytes). The locks go away
/// with the descriptor.
fn take_locks(fd: RawFd, perm: u32, shared: u32) -> Result<(), String> {
    let unshared = PERM_ALL & !shared;
    let bytes = perm_bits(perm)
        .map(|(bit, _)| LOCK_PERM_BASE + bit)
        .chain(perm_bits(unshared).map(|(bit, _)| LOCK_SHARED_BASE + bit));
    for byte in bytes {
        lock_byte(fd, byte, libc::F_RDLCK, libc::F_OFD_SETLK)
            .map_err(|e| format!("Failed to lock byte {byte}: {}", errno_text(&e)))?;
    }
    for (bit, name) in perm_bits(perm) {
        if lock_conflicts(fd, LOCK_SHARED_BASE + bit) {
            return Err(format!("Failed to get \"{name}\" lock"));
        }
    }
    for (bit, name) in perm_bits(unshared) {
        if lock_conflicts(fd, LOCK_PERM_BASE + bit) {
            return Err(format!("Failed to get shared \"{name}\" lock"));
        }
    }
    Ok(())
}

/// A zeroed heap buffer with a chosen alignment, for O_DIRECT bounces.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn zeroed(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(ptr)
            .map(|ptr| AlignedBuf { ptr, layout })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn iovecs_mut(bufs: &mut [IoSliceMut<'_>]) -> Vec<libc::iovec> {
    bufs.iter_mut()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

fn iovecs(bufs: &[IoSlice<'_>]) -> Vec<libc::iovec> {
    bufs.iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect()
}

fn total_len(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// Repeats preadv/pwritev until every iovec is done, retrying EINTR and
/// continuing after short transfers. Stops early at end of file (a read of 0
/// bytes), or after any short read when `short_read_is_eof` (O_DIRECT, where
/// the rest would be misaligned). Returns the bytes transferred.
fn transfer(
    fd: RawFd,
    dir: Direction,
    mut iov: Vec<libc::iovec>,
    mut offset: u64,
    short_read_is_eof: bool,
) -> io::Result<u64> {
    let mut start = 0;
    let mut done = 0u64;
    while start < iov.len() {
        let batch = &iov[start..iov.len().min(start + IOV_MAX)];
        let wanted = total_len(batch);
        let pos = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into a live caller buffer of its length.
        let n = unsafe {
            match dir {
                Direction::Read => {
                    libc::preadv(fd, batch.as_ptr(), batch.len() as libc::c_int, pos)
                }
                Direction::Write => {
                    libc::pwritev(fd, batch.as_ptr(), batch.len() as libc::c_int, pos)
                }
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            if dir == Direction::Write {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            break;
        }
        let mut n = n as u64;
        done += n;
        offset += n;
        if dir == Direction::Read && short_read_is_eof && n < wanted {
            break;
        }
        while n > 0 {
            let first = &mut iov[start];
            if n >= first.iov_len as u64 {
                n -= first.iov_len as u64;
                start += 1;
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the buffer.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n as usize) }.cast();
                first.iov_len -= n as usize;
                n = 0;
            }
        }
    }
    Ok(done)
}

/// Zero-fills `bufs` from byte `skip` on (the part past end of file).
fn zero_fill_from(bufs: &mut [IoSliceMut<'_>], mut skip: u64) {
    for buf in bufs.iter_mut() {
        let len = buf.len() as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        buf[skip as usize..].fill(0);
        skip = 0;
    }
}

fn align_down(x: u64, align: u64) -> u64 {
    x - x % align
}

fn align_up(x: u64, align: u64) -> io::Result<u64> {
    x.checked_next_multiple_of(align)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

fn byte_len(bufs: &[IoSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

fn refuse_if_read_only(read_only: bool) -> io::Result<()> {
    if read_only {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

impl FileDriver {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Re-reads a regular file's length after an operation that may have
    /// changed it in ways a write offset does not tell.
    fn refresh_file_len(&self) {
        if self.kind == FileKind::Regular {
            match fstat(self.raw_fd()) {
                Ok(st) => self.file_len.store(st.st_size as u64, Ordering::Release),
                Err(e) => log::warn!("{}: cannot get the size: {}", self.filename, errno_text(&e)),
            }
        }
    }

    /// Keeps the length current after a write: a complete write reached its
    /// end; a failed one may have extended the file partway.
    fn after_write(&self, offset: u64, len: u64, result: io::Result<()>) -> io::Result<()> {
        match &result {
            Ok(()) => {
                self.file_len
                    .fetch_max(offset.saturating_add(len), Ordering::AcqRel);
            }
            Err(_) => self.refresh_file_len(),
        }
        result
    }

    /// The exact length of the file or device in bytes.
    fn byte_length(&self) -> io::Result<u64> {
        match self.kind {
            FileKind::Regular => Ok(self.file_len.load(Ordering::Acquire)),
            FileKind::BlockDevice => {
                let mut size: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64.
                if unsafe { libc::ioctl(self.raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(size)
            }
            FileKind::CharDevice => {
                // SAFETY: lseek has no memory effects.
                let end = unsafe { libc::lseek(self.raw_fd(), 0, libc::SEEK_END) };
                Ok(end.max(0) as u64)
            }
        }
    }

    /// Whether O_DIRECT can take the request as it is.
    fn direct_aligned(direct: &DirectIo, offset: u64, iov: &[libc::iovec]) -> bool {
        offset.is_multiple_of(direct.request_align)
            && iov.iter().all(|v| {
                (v.iov_base as usize).is_multiple_of(direct.mem_align)
                    && (v.iov_len as u64).is_multiple_of(direct.request_align)
            })
    }

    /// Reads `[start, start + buf.len())` into an aligned buffer, zero-filling past EOF.
    fn read_aligned(&self, start: u64, buf: &mut AlignedBuf) -> io::Result<()> {
        let slice = buf.as_mut_slice();
        let iov = vec![libc::iovec {
            iov_base: slice.as_mut_ptr().cast(),
            iov_len: slice.len(),
        }];
        let done = transfer(self.raw_fd(), Direction::Read, iov, start, true)?;
        slice[done as usize..].fill(0);
        Ok(())
    }

    fn read_bounced(
        &self,
        direct: &DirectIo,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let start = align_down(offset, direct.request_align);
        let end = align_up(offset + len, direct.request_align)?;
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, direct.mem_align)?;
        self.read_aligned(start, &mut bounce)?;
        let mut pos = (offset - start) as usize;
        let data = bounce.as_mut_slice();
        for buf in bufs.iter_mut() {
            let n = buf.len();
            buf.copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    /// Read-modify-write of the partial blocks at both ends of an unaligned write.
    fn write_bounced(
        &self,
        direct: &DirectIo,
        offset: u64,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<()> {
        let align = direct.request_align;
        let len = byte_len(bufs);
        let start = align_down(offset, align);
        let end = align_up(offset + len, align)?;
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, direct.mem_align)?;
        let mut block = AlignedBuf::zeroed(align as usize, direct.mem_align)?;
        let _exclusive = write_guard(&direct.rmw);
        if start < offset {
            self.read_aligned(start, &mut block)?;
            bounce.as_mut_slice()[..align as usize].copy_from_slice(block.as_mut_slice());
        }
        if offset + len < end {
            self.read_aligned(end - align, &mut block)?;
            let tail = (end - start - align) as usize;
            bounce.as_mut_slice()[tail..].copy_from_slice(block.as_mut_slice());
        }
        let mut pos = (offset - start) as usize;
        let data = bounce.as_mut_slice();
        for buf in bufs {
            data[pos..pos + buf.len()].copy_from_slice(buf);
            pos += buf.len();
        }
        let iov = vec![libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        }];
        let result = transfer(self.raw_fd(), Direction::Write, iov, start, false).map(drop);
        // The aligned write may have extended the file past the data's end.
        self.refresh_file_len();
        result
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (off, len) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        loop {
            // SAFETY: fallocate has no memory effects.
            if unsafe { libc::fallocate(self.raw_fd(), mode, off, len) } == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn blkdiscard(&self, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads two u64s.
        if unsafe { libc::ioctl(self.raw_fd(), BLKDISCARD, range.as_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes zero buffers, the slow path of write_zeroes.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let align = self.direct.as_ref().map_or(1, |d| d.mem_align);
        let mut zeroes = AlignedBuf::zeroed(len.min(ZERO_CHUNK) as usize, align)?;
        write_zeroes_as_data(self, offset, len, zeroes.as_mut_slice())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek has no memory effects; the file position is unused
        // because all I/O is positioned.
        let ret = unsafe { libc::lseek(self.raw_fd(), off, whence) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as u64)
    }
}

fn read_guard(lock: &RwLock<()>) -> RwLockReadGuard<'_, ()> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write_guard(lock: &RwLock<()>) -> RwLockWriteGuard<'_, ()> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl BlockDriver for FileDriver {
    fn driver_name(&self) -> &'static str {
        self.driver_name
    }

    /// The length rounded up to whole sectors, as QEMU reports it; the tail
    /// past end of file reads as zeroes.
    fn size(&self) -> u64 {
        match self.byte_length() {
            Ok(len) => round_up_to_sector(len),
            Err(e) => {
                log::warn!("{}: cannot get the size: {}", self.filename, errno_text(&e));
                0
            }
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u32 {
        self.direct.as_ref().map_or(1, |d| d.request_align as u32)
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }

    fn open_options(&self) -> Map<String, Value> {
        let mut opts = Map::new();
        opts.insert("driver".into(), Value::from(self.driver_name));
        opts.insert("filename".into(), Value::from(self.filename.clone()));
        opts
    }

    fn describe_image(&self, image: &mut Map<String, Value>) {
        // QEMU's, for both drivers (its XFS extent size hint aside).
        image.insert(
            "format-specific".into(),
            serde_json::json!({"type": "file", "data": {}}),
        );
    }

    fn allocated_size(&self) -> Option<u64> {
        // SAFETY: fstat fills a plain stat struct for our open descriptor.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            (libc::fstat(self.fd.as_raw_fd(), &mut st) == 0).then(|| st.st_blocks as u64 * 512)
        }
    }

    fn cache_mode(&self) -> CacheMode {
        CacheMode {
            direct: self.direct.is_some(),
            no_flush: self.no_flush,
        }
    }

    /// Not with O_DIRECT (splice would go through the page cache anyway), nor for
    /// character devices.
    fn can_splice(&self) -> bool {
        self.direct.is_none() && self.kind != FileKind::CharDevice
    }

    fn splice_read(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        if !self.can_splice() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        nbd::splice::file_to_pipe(self.fd.as_fd(), offset, pipe, len)
    }

    fn send_file(&self, socket: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        if !self.can_splice() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        nbd::splice::file_to_socket(self.fd.as_fd(), offset, socket, len)
    }

    fn splice_write(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        if !self.can_splice() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        refuse_if_read_only(self.read_only)?;
        let result = nbd::splice::pipe_to_file(pipe, self.fd.as_fd(), offset, len);
        self.after_write(offset, len as u64, result)
    }

    /// Into the mapped page cache of a writable regular file on a filesystem that reserves
    /// space at the first write fault, without O_DIRECT, inside the file (see [`PageMap`]).
    fn receive_writes(
        &self,
        socket: BorrowedFd<'_>,
        writes: &[QueuedWrite],
        wait_all: bool,
    ) -> io::Result<usize> {
        let Some(page_map) = &self.page_map else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        // Up to the first write past the end of the file, which would extend it.
        let file_len = self.file_len.load(Ordering::Acquire);
        let inside = leading_writes(
            writes,
            |w| w.offset.saturating_add(w.len as u64) <= file_len,
            "past the end of the file",
        )?;
        page_map.receive(self.fd.as_fd(), socket, inside, wait_all)
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            let iov = iovecs_mut(bufs);
            if !Self::direct_aligned(direct, offset, &iov) {
                return self.read_bounced(direct, offset, bufs);
            }
            let done = transfer(self.raw_fd(), Direction::Read, iov, offset, true)?;
            zero_fill_from(bufs, done);
            return Ok(());
        }
        let done = transfer(
            self.raw_fd(),
            Direction::Read,
            iovecs_mut(bufs),
            offset,
            false,
        )?;
        zero_fill_from(bufs, done);
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        refuse_if_read_only(self.read_only)?;
        let iov = iovecs(bufs);
        if let Some(direct) = &self.direct {
            if !Self::direct_aligned(direct, offset, &iov) {
                return self.write_bounced(direct, offset, bufs);
            }
            let _shared = read_guard(&direct.rmw);
            let result = transfer(self.raw_fd(), Direction::Write, iov, offset, false).map(drop);
            return self.after_write(offset, byte_len(bufs), result);
        }
        let result = transfer(self.raw_fd(), Direction::Write, iov, offset, false).map(drop);
        self.after_write(offset, byte_len(bufs), result)
    }

    fn flush(&self) -> io::Result<()> {
        // Like QEMU, flushing a read-only node has nothing to do.
        if self.no_flush || self.read_only {
            return Ok(());
        }
        loop {
            // SAFETY: fdatasync has no memory effects.
            if unsafe { libc::fdatasync(self.raw_fd()) } == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        refuse_if_read_only(self.read_only)?;
        if self.discard == DiscardMode::Ignore || len == 0 {
            return Ok(());
        }
        let result = match self.kind {
            FileKind::Regular => self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            FileKind::BlockDevice => self.blkdiscard(offset, len),
            FileKind::CharDevice => Ok(()),
        };
        // Discard is a hint: storage that cannot do it still succeeds.
        match result {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
                ) =>
            {
                log::debug!(
                    "{}: discard not supported: {}",
                    self.filename,
                    errno_text(&e)
                );
                Ok(())
            }
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        refuse_if_read_only(self.read_only)?;
        if len == 0 {
            return Ok(());
        }
        let mut fast = Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        if self.kind != FileKind::CharDevice {
            if flags.may_unmap && self.discard == DiscardMode::Unmap {
                // Punching reads back as zeroes on files and on block devices.
                fast = self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                );
            }
            if fast.is_err() {
                fast = self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len);
            }
        }
        let result = match fast {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
                ) =>
            {
                if flags.fast_only {
                    return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
                }
                self.write_zero_buffers(offset, len)
            }
            Err(e) => Err(e),
        };
        // Zeroing past the end extends the file.
        self.refresh_file_len();
        result
    }

    /// Data and holes from SEEK_DATA/SEEK_HOLE; a file system without them,
    /// and any device, reports everything as data. Everything is allocated
    /// in this node (depth 1), as QEMU reports for protocol nodes.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let end = offset.saturating_add(len);
        let data = |length| Extent::data(length, 1);
        let hole = |length| Extent::hole(length, 1);
        if len == 0 {
            return Ok(data(0));
        }
        if self.kind != FileKind::Regular {
            return Ok(data(len));
        }
        match self.seek(offset, libc::SEEK_DATA) {
            Ok(next_data) if next_data > offset => Ok(hole(next_data.min(end) - offset)),
            Ok(_) => match self.seek(offset, libc::SEEK_HOLE) {
                Ok(next_hole) if next_hole > offset => Ok(data(next_hole.min(end) - offset)),
                // Raced with a punch or not supported: data is always a safe answer.
                _ => Ok(data(len)),
            },
            // ENXIO: no data from `offset` to end of file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(hole(len)),
            Err(_) => Ok(data(len)),
        }
    }

    fn resize(&self, new_size: u64) -> io::Result<()> {
        refuse_if_read_only(self.read_only)?;
        if self.kind != FileKind::Regular {
            // Devices cannot change size; shrinking just uses less of them.
            if new_size > self.byte_length()? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Cannot grow device files",
                ));
            }
            return Ok(());
        }
        let len = libc::off_t::try_from(new_size)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let fd = self.raw_fd();
        let resize_byte = LOCK_PERM_BASE + PERM_RESIZE.trailing_zeros() as i64;
        if self.locking {
            // Take the resize permission for the duration, as QEMU's block_resize does.
            lock_byte(fd, resize_byte, libc::F_RDLCK, libc::F_OFD_SETLK)?;
            if lock_conflicts(fd, LOCK_SHARED_BASE + PERM_RESIZE.trailing_zeros() as i64) {
                let _ = lock_byte(fd, resize_byte, libc::F_UNLCK, libc::F_OFD_SETLK);
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "Failed to get \"resize\" lock",
                ));
            }
        }
        // SAFETY: ftruncate has no memory effects.
        let result = if unsafe { libc::ftruncate(fd, len) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        if self.locking {
            let _ = lock_byte(fd, resize_byte, libc::F_UNLCK, libc::F_OFD_SETLK);
        }
        self.refresh_file_len();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockNode;
    use serde_json::json;
    use std::io::Write;
    use std::sync::Arc;

    fn no_nodes(_: &str) -> Option<Arc<BlockNode>> {
        None
    }

    /// A spawned child holds our descriptors between fork and exec, and with
    /// them our OFD locks: tests that reopen an image they just closed must
    /// not run while another test spawns QEMU tools.
    static SPAWNING: std::sync::RwLock<()> = std::sync::RwLock::new(());

    fn no_spawns() -> std::sync::RwLockReadGuard<'static, ()> {
        SPAWNING.read().unwrap_or_else(|p| p.into_inner())
    }

    fn spawns() -> std::sync::RwLockWriteGuard<'static, ()> {
        SPAWNING.write().unwrap_or_else(|p| p.into_inner())
    }

    fn open_with(opts: Value) -> Result<Box<dyn BlockDriver>, String> {
        let opts = opts.as_object().cloned().unwrap_or_default();
        let ctx = OpenContext::from_options(&opts, &no_nodes)?;
        open(&opts, &ctx)
    }

    fn open_file(path: &std::path::Path, extra: Value) -> Result<Box<dyn BlockDriver>, String> {
        let mut opts = json!({"driver": "file", "filename": path.to_str().unwrap()});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            opts[k] = v;
        }
        open_with(opts)
    }

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn read_at(drv: &dyn BlockDriver, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len];
        drv.read_vectored(offset, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        buf
    }

    #[test]
    fn open_errors_have_qemu_text() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = open_file(&missing, json!({})).err().unwrap();
        assert_eq!(
            err,
            format!(
                "Could not open '{}': No such file or directory",
                missing.display()
            )
        );
        let err = open_file(dir.path(), json!({})).err().unwrap();
        assert_eq!(
            err,
            format!("Could not open '{}': Is a directory", dir.path().display())
        );
        let err = open_file(dir.path(), json!({"read-only": true}))
            .err()
            .unwrap();
        assert_eq!(
            err,
            format!(
                "'file' driver requires '{}' to be a regular file",
                dir.path().display()
            )
        );
        let err = open_with(json!({"driver": "file", "filename": ""}))
            .err()
            .unwrap();
        assert_eq!(err, "The 'file' block driver requires a file name");
        let err = open_with(json!({"driver": "file"})).err().unwrap();
        assert_eq!(err, "Parameter 'filename' is missing");

        let img = image(4096);
        let err =
            open_with(json!({"driver": "host_device", "filename": img.path().to_str().unwrap()}))
                .err()
                .unwrap();
        assert_eq!(
            err,
            format!(
                "'host_device' driver requires '{}' to be either a character or block device",
                img.path().display()
            )
        );
        let err = open_file(img.path(), json!({"aio": "native"}))
            .err()
            .unwrap();
        assert_eq!(
            err,
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        );
        let err = open_file(img.path(), json!({"aio": "io_uring"}))
            .err()
            .unwrap();
        assert!(err.starts_with("aio=io_uring is not supported"), "{err}");
        let err = open_file(img.path(), json!({"pr-manager": "pr0"}))
            .err()
            .unwrap();
        assert_eq!(err, "No persistent reservation manager with id 'pr0'");
        let err = open_file(img.path(), json!({"force-share": true}))
            .err()
            .unwrap();
        assert_eq!(err, "force-share=on can only be used with read-only images");
    }

    #[test]
    fn host_device_accepts_character_devices() {
        let drv =
            open_with(json!({"driver": "host_device", "filename": "/dev/zero", "read-only": true}))
                .unwrap();
        assert_eq!(drv.driver_name(), "host_device");
        assert_eq!(
            drv.block_status(0, 4096).unwrap(),
            Extent {
                length: 4096,
                data: true,
                zero: false,
                depth: 1
            }
        );
        let err = open_with(json!({"driver": "file", "filename": "/dev/null"}))
            .err()
            .unwrap();
        assert_eq!(
            err,
            "'file' driver requires '/dev/null' to be a regular file"
        );
    }

    #[test]
    fn vectored_round_trip() {
        let img = image(1 << 20);
        let drv = open_file(img.path(), json!({})).unwrap();
        assert_eq!(drv.size(), 1 << 20);
        assert_eq!(
            drv.filename(),
            Some(img.path().to_str().unwrap().to_string())
        );
        let (a, b, c) = (pattern(1000, 1), pattern(3, 2), pattern(70_000, 3));
        drv.write_vectored(
            12_345,
            &[
                IoSlice::new(&a),
                IoSlice::new(&[]),
                IoSlice::new(&b),
                IoSlice::new(&c),
            ],
        )
        .unwrap();
        let (mut ra, mut rb, mut rc) = (vec![0u8; 1000], vec![0u8; 3], vec![0u8; 70_000]);
        drv.read_vectored(
            12_345,
            &mut [
                IoSliceMut::new(&mut ra),
                IoSliceMut::new(&mut rb),
                IoSliceMut::new(&mut rc),
            ],
        )
        .unwrap();
        assert_eq!((ra, rb, rc), (a.clone(), b.clone(), c.clone()));
        let on_disk = std::fs::read(img.path()).unwrap();
        assert_eq!(&on_disk[12_345..13_345], &a[..]);
        assert_eq!(&on_disk[13_348..13_348 + 70_000], &c[..]);
        drv.flush().unwrap();
    }

    #[test]
    fn reads_past_end_of_file_are_zeroes() {
        let mut img = tempfile::NamedTempFile::new().unwrap();
        img.write_all(&[0x5a; 1000]).unwrap();
        let drv = open_file(img.path(), json!({"read-only": true})).unwrap();
        // QEMU reports the length in whole sectors.
        assert_eq!(drv.size(), 1024);
        let mut head = vec![0xffu8; 600];
        let mut tail = vec![0xffu8; 424];
        drv.read_vectored(
            0,
            &mut [IoSliceMut::new(&mut head), IoSliceMut::new(&mut tail)],
        )
        .unwrap();
        assert!(head.iter().all(|&x| x == 0x5a));
        assert!(tail[..400].iter().all(|&x| x == 0x5a));
        assert!(tail[400..].iter().all(|&x| x == 0));
        let hole = drv.block_status(1000, 24).unwrap();
        assert_eq!(
            hole,
            Extent {
                length: 24,
                data: false,
                zero: true,
                depth: 1
            }
        );
    }

    #[test]
    fn block_status_reports_data_and_holes() {
        const K: u64 = 1024;
        let img = image(256 * K);
        let drv = open_file(img.path(), json!({})).unwrap();
        drv.write_vectored(0, &[IoSlice::new(&pattern(64 * 1024, 7))])
            .unwrap();
        drv.write_vectored(192 * K, &[IoSlice::new(&pattern(64 * 1024, 8))])
            .unwrap();
        let data = |length| Extent::data(length, 1);
        let hole = |length| Extent::hole(length, 1);
        assert_eq!(drv.block_status(0, 256 * K).unwrap(), data(64 * K));
        assert_eq!(drv.block_status(4 * K, 8 * K).unwrap(), data(8 * K));
        assert_eq!(drv.block_status(64 * K, 256 * K).unwrap(), hole(128 * K));
        assert_eq!(drv.block_status(100 * K, 8 * K).unwrap(), hole(8 * K));
        assert_eq!(drv.block_status(192 * K, 64 * K).unwrap(), data(64 * K));
        assert_eq!(read_at(drv.as_ref(), 64 * K, 4096), vec![0u8; 4096]);
    }

    #[test]
    fn discard_punches_holes_only_with_unmap() {
        let _guard = no_spawns();
        const K: u64 = 1024;
        let img = image(256 * K);
        let ignore = open_file(img.path(), json!({})).unwrap();
        ignore
            .write_vectored(0, &[IoSlice::new(&pattern(256 * 1024, 1))])
            .unwrap();
        ignore.discard(64 * K, 64 * K).unwrap();
        assert!(ignore.block_status(64 * K, 64 * K).unwrap().data);
        assert_eq!(
            read_at(ignore.as_ref(), 64 * K, 16),
            pattern(256 * 1024, 1)[64 * 1024..64 * 1024 + 16]
        );
        drop(ignore);

        let unmap = open_file(img.path(), json!({"discard": "unmap"})).unwrap();
        unmap.discard(64 * K, 64 * K).unwrap();
        let e = unmap.block_status(64 * K, 256 * K).unwrap();
        assert_eq!(
            e,
            Extent {
                length: 64 * K,
                data: false,
                zero: true,
                depth: 1
            }
        );
        assert!(unmap.block_status(0, 64 * K).unwrap().data);
        assert!(unmap.block_status(128 * K, 64 * K).unwrap().data);
        assert_eq!(unmap.size(), 256 * K, "punching keeps the size");
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        const K: u64 = 1024;
        let img = image(256 * K);
        let drv = open_file(img.path(), json!({"discard": "unmap"})).unwrap();
        drv.write_vectored(0, &[IoSlice::new(&pattern(256 * 1024, 3))])
            .unwrap();

        let plain = ZeroFlags::default();
        drv.write_zeroes(1000, 5000, plain).unwrap();
        assert_eq!(read_at(drv.as_ref(), 1000, 5000), vec![0u8; 5000]);
        assert_eq!(
            read_at(drv.as_ref(), 6000, 8),
            pattern(256 * 1024, 3)[6000..6008]
        );

        let unmap = ZeroFlags {
            may_unmap: true,
            fast_only: false,
        };
        drv.write_zeroes(64 * K, 64 * K, unmap).unwrap();
        assert_eq!(
            read_at(drv.as_ref(), 64 * K, 64 * 1024),
            vec![0u8; 64 * 1024]
        );
        assert!(
            !drv.block_status(64 * K, 64 * K).unwrap().data,
            "may_unmap with discard=unmap punches"
        );

        let fast = ZeroFlags {
            may_unmap: false,
            fast_only: true,
        };
        drv.write_zeroes(192 * K, 64 * K, fast).unwrap();
        assert_eq!(
            read_at(drv.as_ref(), 192 * K, 64 * 1024),
            vec![0u8; 64 * 1024]
        );
        assert_eq!(drv.size(), 256 * K);

        // Without discard=unmap, may_unmap must not deallocate.
        let img2 = image(64 * K);
        let keep = open_file(img2.path(), json!({})).unwrap();
        keep.write_vectored(0, &[IoSlice::new(&pattern(64 * 1024, 4))])
            .unwrap();
        keep.write_zeroes(0, 64 * K, unmap).unwrap();
        assert_eq!(read_at(keep.as_ref(), 0, 64 * 1024), vec![0u8; 64 * 1024]);
    }

    #[test]
    fn write_zeroes_fast_only_fails_on_character_devices() {
        let drv = open_with(json!({"driver": "host_device", "filename": "/dev/null"})).unwrap();
        let fast = ZeroFlags {
            may_unmap: false,
            fast_only: true,
        };
        assert_eq!(
            drv.write_zeroes(0, 4096, fast).unwrap_err().raw_os_error(),
            Some(libc::ENOTSUP)
        );
        drv.write_zeroes(0, 4096, ZeroFlags::default()).unwrap();
    }

    #[test]
    fn size_follows_writes_and_zeroing_past_the_end() {
        let img = image(4096);
        let drv = open_file(img.path(), json!({})).unwrap();
        assert_eq!(drv.size(), 4096);
        drv.write_vectored(8192, &[IoSlice::new(&[7u8; 512])])
            .unwrap();
        assert_eq!(drv.size(), 8704);
        assert_eq!(img.as_file().metadata().unwrap().len(), 8704);
        drv.write_zeroes(16384, 4096, ZeroFlags::default()).unwrap();
        assert_eq!(drv.size(), 20480);
        assert_eq!(img.as_file().metadata().unwrap().len(), 20480);
        drv.resize(1024).unwrap();
        assert_eq!(drv.size(), 1024);
    }

    #[test]
    fn resize_grows_and_shrinks() {
        let img = image(4096);
        let drv = open_file(img.path(), json!({})).unwrap();
        drv.resize(1 << 20).unwrap();
        assert_eq!(drv.size(), 1 << 20);
        assert_eq!(img.as_file().metadata().unwrap().len(), 1 << 20);
        drv.resize(8192).unwrap();
        assert_eq!(drv.size(), 8192);
    }

    #[test]
    fn read_only_nodes_refuse_changes() {
        let img = image(8192);
        let drv = open_file(img.path(), json!({"read-only": true})).unwrap();
        assert!(drv.read_only());
        let eperm = Some(libc::EPERM);
        assert_eq!(
            drv.write_vectored(0, &[IoSlice::new(&[1; 512])])
                .unwrap_err()
                .raw_os_error(),
            eperm
        );
        assert_eq!(drv.discard(0, 512).unwrap_err().raw_os_error(), eperm);
        assert_eq!(
            drv.write_zeroes(0, 512, ZeroFlags::default())
                .unwrap_err()
                .raw_os_error(),
            eperm
        );
        assert_eq!(drv.resize(4096).unwrap_err().raw_os_error(), eperm);
        drv.flush().unwrap();
        assert_eq!(read_at(drv.as_ref(), 0, 512), vec![0u8; 512]);
    }

    #[test]
    fn no_flush_still_writes() {
        let img = image(8192);
        let drv = open_file(img.path(), json!({"cache": {"no-flush": true}})).unwrap();
        drv.write_vectored(0, &[IoSlice::new(&[7; 512])]).unwrap();
        drv.flush().unwrap();
        assert_eq!(&std::fs::read(img.path()).unwrap()[..512], &[7u8; 512][..]);
    }

    #[test]
    fn direct_io_aligned_and_bounced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, pattern(64 * 1024, 9)).unwrap();
        let drv = match open_file(&path, json!({"cache": {"direct": true}})) {
            Ok(drv) => drv,
            Err(e) if e.contains("Invalid argument") => {
                eprintln!("skipped: the temp file system has no O_DIRECT ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let align = drv.request_alignment() as usize;
        assert!(align.is_power_of_two() && align >= 512, "alignment {align}");
        let mut expected = pattern(64 * 1024, 9);

        // Unaligned offset, length and buffer: read-modify-write through a bounce buffer.
        let data = pattern(5000, 10);
        drv.write_vectored(1001, &[IoSlice::new(&data[..1]), IoSlice::new(&data[1..])])
            .unwrap();
        expected[1001..6001].copy_from_slice(&data);
        // Aligned buffer and offset: straight to the device.
        let mut aligned = AlignedBuf::zeroed(2 * align, align).unwrap();
        aligned
            .as_mut_slice()
            .copy_from_slice(&pattern(2 * align, 11));
        drv.write_vectored(4 * align as u64, &[IoSlice::new(aligned.as_mut_slice())])
            .unwrap();
        expected[4 * align..6 * align].copy_from_slice(&pattern(2 * align, 11));

        assert_eq!(read_at(drv.as_ref(), 3, 64 * 1024 - 3), expected[3..]);
        let mut back = AlignedBuf::zeroed(2 * align, align).unwrap();
        drv.read_vectored(
            4 * align as u64,
            &mut [IoSliceMut::new(back.as_mut_slice())],
        )
        .unwrap();
        assert_eq!(back.as_mut_slice(), &expected[4 * align..6 * align]);
        drv.flush().unwrap();
        drop(drv);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn direct_io_reads_past_unaligned_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0x33u8; 1000]).unwrap();
        let Ok(drv) = open_file(&path, json!({"cache": {"direct": true}, "read-only": true}))
        else {
            eprintln!("skipped: no O_DIRECT here");
            return;
        };
        let got = read_at(drv.as_ref(), 0, 1024);
        assert!(got[..1000].iter().all(|&x| x == 0x33));
        assert!(got[1000..].iter().all(|&x| x == 0));
    }

    #[test]
    fn two_writers_conflict_through_ofd_locks() {
        let _guard = no_spawns();
        let img = image(4096);
        let writer = open_file(img.path(), json!({})).unwrap();
        let err = open_file(img.path(), json!({})).err().unwrap();
        assert_eq!(err, "Failed to get \"write\" lock");
        // Readers share with the writer, and the writer with readers.
        let reader = open_file(img.path(), json!({"read-only": true})).unwrap();
        assert!(open_file(img.path(), json!({"locking": "off"})).is_ok());
        drop(writer);
        let writer = open_file(img.path(), json!({})).unwrap();
        drop(reader);
        // The writer may resize: nobody else refuses it.
        writer.resize(8192).unwrap();
    }

    #[test]
    fn resize_respects_other_users_refusal() {
        let _guard = no_spawns();
        let img = image(4096);
        let writer = open_file(img.path(), json!({})).unwrap();
        // A second description that refuses resize, as a QEMU raw node does.
        let other = std::fs::File::open(img.path()).unwrap();
        lock_byte(
            other.as_raw_fd(),
            LOCK_SHARED_BASE + 3,
            libc::F_RDLCK,
            libc::F_OFD_SETLK,
        )
        .unwrap();
        let err = writer.resize(8192).unwrap_err();
        assert_eq!(err.to_string(), "Failed to get \"resize\" lock");
        drop(other);
        writer.resize(8192).unwrap();
    }

    fn have(tool: &str) -> bool {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok()
    }

    #[test]
    fn qemu_tools_see_our_write_lock() {
        let _guard = spawns();
        if !have("qemu-io") || !have("qemu-img") {
            eprintln!("skipped: qemu-io/qemu-img not installed");
            return;
        }
        let img = image(1 << 20);
        let path = img.path().to_str().unwrap();
        let _writer = open_file(img.path(), json!({})).unwrap();
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512", path])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Failed to get \"write\" lock"),
            "qemu-io: {stderr}"
        );
        let copy = tempfile::NamedTempFile::new().unwrap();
        let out = std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                path,
                copy.path().to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Failed to get shared \"write\" lock"),
            "qemu-img: {stderr}"
        );
        // Reading with -U (force share) is allowed, as with QEMU.
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-U", "-r", "-c", "read 0 512", path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn we_see_a_qemu_writers_lock() {
        let _guard = spawns();
        if !have("qemu-io") {
            eprintln!("skipped: qemu-io not installed");
            return;
        }
        let img = image(1 << 20);
        let mut child = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "sleep 10000",
                img.path().to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut last = Ok(());
        // Up to 30 s for qemu-io to start and lock: a loaded machine is slow.
        for _ in 0..600 {
            last = open_file(img.path(), json!({})).map(drop);
            if last.is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        // qemu-io takes write and shares everything, so what conflicts is
        // our refusal to share write, as between two QEMU processes.
        assert_eq!(
            last.err().as_deref(),
            Some("Failed to get shared \"write\" lock")
        );
    }

    /// Runs qemu-storage-daemon with a writable NBD export of `path`; returns
    /// the child once its options are all applied, or its stderr if it
    /// failed.
    fn qsd_writable_export(
        path: &str,
        dir: &std::path::Path,
    ) -> Result<std::process::Child, String> {
        let sock = dir.join("nbd.sock");
        let ready = dir.join("ready.sock");
        let _ = std::fs::remove_file(&ready);
        let mut child = std::process::Command::new("qemu-storage-daemon")
            .args(["--blockdev", &format!("file,node-name=f0,filename={path}")])
            .args(["--blockdev", "raw,node-name=r0,file=f0"])
            .args([
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", sock.display()),
            ])
            .args(["--export", "nbd,id=e0,node-name=r0,writable=on"])
            // QSD applies its options in order: this socket appears once the
            // export exists (the NBD socket comes before it).
            .args([
                "--chardev",
                &format!(
                    "socket,id=ready,path={},server=on,wait=off",
                    ready.display()
                ),
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        // Up to 30 s: QSD starts slowly on a loaded machine.
        for _ in 0..600 {
            if let Ok(Some(_)) = child.try_wait() {
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            if ready.exists() {
                return Ok(child);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("qemu-storage-daemon did not start".into())
    }

    #[test]
    fn locks_interoperate_with_qemu_storage_daemon() {
        let _guard = spawns();
        if !have("qemu-storage-daemon") {
            eprintln!("skipped: qemu-storage-daemon not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = image(1 << 20);
        let path = img.path().to_str().unwrap();

        // We hold the image writable: QSD cannot export it writable.
        let writer = open_file(img.path(), json!({})).unwrap();
        match qsd_writable_export(path, dir.path()) {
            Ok(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("qemu-storage-daemon exported an image blkd holds writable");
            }
            Err(stderr) => assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}"),
        }
        drop(writer);

        // QSD holds it writable: we cannot open it writable, but may read it.
        let mut child = qsd_writable_export(path, dir.path()).unwrap();
        // The socket comes before the export: wait for its lock.
        let mut writable = Ok(());
        for _ in 0..600 {
            writable = open_file(img.path(), json!({})).map(drop);
            if writable.is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let readable = open_file(img.path(), json!({"read-only": true})).map(drop);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            writable.err().as_deref(),
            Some("Failed to get shared \"write\" lock")
        );
        assert!(readable.is_ok());
    }
}
