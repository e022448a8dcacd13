//! Export backends for tests (of this crate and of its users): one in memory, one on a file
//! that can splice.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use crate::proto::{Extent, STATE_HOLE, STATE_ZERO};
use crate::server::lock;
use crate::{splice, ExportBackend, QueuedWrite};

/// Allocation granularity of [`MemBackend`].
pub const BLOCK: u64 = 4096;

struct Disk {
    data: Vec<u8>,
    /// One flag per [`BLOCK`]: allocated (written) or a hole (reads as zeroes).
    allocated: Vec<bool>,
}

/// A RAM disk that tracks allocation per 4 KiB block, so that block status, sparse reads,
/// trim and write-zeroes have something real to report. Extra metadata contexts (index 1..)
/// report fixed extent maps given at construction.
pub struct MemBackend {
    disk: RwLock<Disk>,
    extra_maps: Vec<Vec<Extent>>,
    read_delay: Option<Duration>,
    flush_delay: Option<Duration>,
    /// Reads that touch this range fail with EIO (a bad spot on the disk).
    bad_range: Option<std::ops::Range<u64>>,
    flushes: AtomicUsize,
    fua_writes: AtomicUsize,
    /// Names of the threads that served writes, one entry per thread.
    write_threads: Mutex<Vec<String>>,
}

fn range_error(offset: u64, len: u64, size: usize) -> io::Error {
    io::Error::new(
        ErrorKind::InvalidInput,
        format!("range {offset}+{len} outside the {size}-byte memory disk"),
    )
}

impl MemBackend {
    /// An unallocated (all-hole) disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(BLOCK) as usize;
        Self {
            disk: RwLock::new(Disk {
                data: vec![0; size as usize],
                allocated: vec![false; blocks],
            }),
            extra_maps: Vec::new(),
            read_delay: None,
            flush_delay: None,
            bad_range: None,
            flushes: AtomicUsize::new(0),
            fua_writes: AtomicUsize::new(0),
            write_threads: Mutex::new(Vec::new()),
        }
    }

    /// Add a context (index = previous count + 1) answering with this fixed extent map.
    pub fn with_context_map(mut self, extents: Vec<Extent>) -> Self {
        self.extra_maps.push(extents);
        self
    }

    /// Make every read sleep first (to observe concurrent, out-of-order service).
    pub fn with_read_delay(mut self, delay: Duration) -> Self {
        self.read_delay = Some(delay);
        self
    }

    /// Make reads that touch `range` fail with EIO.
    pub fn with_bad_range(mut self, range: std::ops::Range<u64>) -> Self {
        self.bad_range = Some(range);
        self
    }

    /// Make every flush sleep first (a disk that takes its time).
    pub fn with_flush_delay(mut self, delay: Duration) -> Self {
        self.flush_delay = Some(delay);
        self
    }

    /// Flushes seen so far.
    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Writes received with FUA so far.
    pub fn fua_writes(&self) -> usize {
        self.fua_writes.load(Ordering::SeqCst)
    }

    /// Names of the threads that have served writes (each once).
    pub fn write_threads(&self) -> Vec<String> {
        self.write_threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A copy of the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        self.disk
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .data
            .clone()
    }

    fn checked(&self, offset: u64, len: u64, size: usize) -> io::Result<(usize, usize)> {
        let end = offset.checked_add(len).filter(|&e| e <= size as u64);
        match end {
            Some(end) => Ok((offset as usize, end as usize)),
            None => Err(range_error(offset, len, size)),
        }
    }

    /// Zero a range, deallocating the whole blocks inside it if `deallocate`.
    fn zero(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        let mut disk = self.disk.write().unwrap_or_else(|p| p.into_inner());
        let (start, end) = self.checked(offset, len, disk.data.len())?;
        disk.data[start..end].fill(0);
        let first = offset.div_ceil(BLOCK) as usize;
        let last = ((offset + len) / BLOCK) as usize;
        let size = disk.data.len() as u64;
        for b in first..last {
            disk.allocated[b] = !deallocate;
        }
        // A partial block at the end of the disk counts as whole.
        if deallocate
            && offset + len == size
            && !size.is_multiple_of(BLOCK)
            && offset <= size - size % BLOCK
        {
            if let Some(tail) = disk.allocated.last_mut() {
                *tail = false;
            }
        }
        if !deallocate {
            let lo = (offset / BLOCK) as usize;
            let hi = (offset + len).div_ceil(BLOCK) as usize;
            disk.allocated[lo..hi].fill(true);
        }
        Ok(())
    }
}

impl ExportBackend for MemBackend {
    fn size(&self) -> u64 {
        self.disk
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .data
            .len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(delay) = self.read_delay {
            std::thread::sleep(delay);
        }
        let disk = self.disk.read().unwrap_or_else(|p| p.into_inner());
        let (start, end) = self.checked(offset, buf.len() as u64, disk.data.len())?;
        if let Some(bad) = &self.bad_range {
            if bad.start < end as u64 && (start as u64) < bad.end {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        buf.copy_from_slice(&disk.data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let mut disk = self.disk.write().unwrap_or_else(|p| p.into_inner());
        let (start, end) = self.checked(offset, buf.len() as u64, disk.data.len())?;
        disk.data[start..end].copy_from_slice(buf);
        if !buf.is_empty() {
            let lo = start / BLOCK as usize;
            let hi = end.div_ceil(BLOCK as usize);
            disk.allocated[lo..hi].fill(true);
        }
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        let name = std::thread::current().name().unwrap_or("").to_owned();
        let mut threads = self.write_threads.lock().unwrap_or_else(|p| p.into_inner());
        if !threads.contains(&name) {
            threads.push(name);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(delay) = self.flush_delay {
            std::thread::sleep(delay);
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, true)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        if fast_only && !may_trim {
            return Err(io::Error::new(
                ErrorKind::Unsupported,
                "zeroing without deallocation is not fast on a memory disk",
            ));
        }
        self.zero(offset, len, may_trim)
    }

    fn block_status(&self, context: usize, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if context > 0 {
            let map = self.extra_maps.get(context - 1).ok_or_else(|| {
                io::Error::new(ErrorKind::InvalidInput, format!("no context {context}"))
            })?;
            let mut pos = 0u64;
            let mut out = Vec::new();
            for e in map {
                let (s, t) = (pos, pos + e.length);
                pos = t;
                if t <= offset || s >= offset + len {
                    continue;
                }
                let length = t.min(offset + len) - s.max(offset);
                out.push(Extent {
                    length,
                    flags: e.flags,
                });
            }
            if out.is_empty() {
                out.push(Extent {
                    length: len,
                    flags: 0,
                });
            }
            return Ok(out);
        }
        let disk = self.disk.read().unwrap_or_else(|p| p.into_inner());
        self.checked(offset, len, disk.data.len())?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = (pos / BLOCK) as usize;
            let block_end = ((block as u64 + 1) * BLOCK).min(end);
            let flags = if disk.allocated[block] {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += block_end - pos,
                _ => out.push(Extent {
                    length: block_end - pos,
                    flags,
                }),
            }
            pos = block_end;
        }
        Ok(out)
    }
}

/// Whether a [`FileBackend`] takes WRITE payloads from the socket itself
/// ([`ExportBackend::receive_writes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receive {
    /// Never (`Unsupported`), as most backends.
    Never,
    /// Every piece it is offered.
    Take,
    /// At most this many bytes (headers included) of what each call offers, stopping
    /// wherever that ends, as a backend does that meets a page it cannot write.
    Upto(usize),
    /// Not now: each piece is refused as a range the backend cannot take at the moment.
    NotNow,
}

/// A file as an export of a given size, with zero-copy reads and writes (the file may be
/// shorter than the export: reads past its end return zeroes and are not spliced). Counts
/// the requests that took the splice path (and the bytes sent with sendfile) and records
/// the size of every write (or spliced or received piece of one).
pub struct FileBackend {
    file: File,
    size: u64,
    spliced_out: AtomicUsize,
    spliced_in: AtomicUsize,
    sent_from_file: AtomicUsize,
    copy_writes: AtomicBool,
    write_sizes: Mutex<Vec<usize>>,
    receive: Mutex<Receive>,
    /// Calls to `receive_writes` (taken or not), and calls that took bytes.
    receive_offers: AtomicUsize,
    received: AtomicUsize,
    /// The most WRITEs offered in one call that took bytes.
    longest_run: AtomicUsize,
    /// How long each ordinary write sleeps first (a slow write path).
    write_delay: Mutex<Duration>,
}

impl FileBackend {
    pub fn new(file: File, size: u64) -> Self {
        FileBackend {
            file,
            size,
            spliced_out: AtomicUsize::new(0),
            spliced_in: AtomicUsize::new(0),
            sent_from_file: AtomicUsize::new(0),
            copy_writes: AtomicBool::new(false),
            write_sizes: Mutex::new(Vec::new()),
            receive: Mutex::new(Receive::Never),
            receive_offers: AtomicUsize::new(0),
            received: AtomicUsize::new(0),
            longest_run: AtomicUsize::new(0),
            write_delay: Mutex::new(Duration::ZERO),
        }
    }

    /// Make every ordinary write ([`ExportBackend::write_at`]) sleep this long first.
    pub fn set_write_delay(&self, delay: Duration) {
        *lock(&self.write_delay) = delay;
    }

    /// Whether WRITE payloads are taken from the socket by the backend from now on.
    pub fn set_receive(&self, receive: Receive) {
        *lock(&self.receive) = receive;
    }

    /// Calls to [`ExportBackend::receive_writes`] so far, taken or not.
    pub fn receive_offers(&self) -> usize {
        self.receive_offers.load(Ordering::SeqCst)
    }

    /// Calls to [`ExportBackend::receive_writes`] that took bytes from the socket so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    /// The most WRITEs offered in one call to [`ExportBackend::receive_writes`] that took
    /// bytes from the socket.
    pub fn longest_run(&self) -> usize {
        self.longest_run.load(Ordering::SeqCst)
    }

    /// The sizes of the writes so far, in order; clears the record.
    pub fn take_write_sizes(&self) -> Vec<usize> {
        std::mem::take(&mut *lock(&self.write_sizes))
    }

    /// READ payloads spliced from the file so far.
    pub fn spliced_out(&self) -> usize {
        self.spliced_out.load(Ordering::SeqCst)
    }

    /// WRITE pieces spliced into the file so far.
    pub fn spliced_in(&self) -> usize {
        self.spliced_in.load(Ordering::SeqCst)
    }

    /// READ payload bytes sent straight from the file to the socket so far.
    pub fn sent_from_file(&self) -> usize {
        self.sent_from_file.load(Ordering::SeqCst)
    }

    /// Refuse spliced writes from now on, as a backend that looks at its data does.
    pub fn refuse_splice_in(&self) {
        self.copy_writes.store(true, Ordering::SeqCst);
    }

    /// Take spliced writes again.
    pub fn accept_splice_in(&self) {
        self.copy_writes.store(false, Ordering::SeqCst);
    }
}

impl ExportBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        std::thread::sleep(*lock(&self.write_delay));
        lock(&self.write_sizes).push(buf.len());
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        if fast_only {
            return Err(ErrorKind::Unsupported.into());
        }
        self.file.write_all_at(&vec![0; len as usize], offset)
    }

    fn can_splice(&self) -> bool {
        true
    }

    fn splice_out(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        splice::file_to_pipe(self.file.as_fd(), offset, pipe, len)?;
        self.spliced_out.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn send_file(&self, socket: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        // Counted before the bytes can reach the peer, which may check at once.
        self.sent_from_file.fetch_add(len, Ordering::SeqCst);
        let result = splice::file_to_socket(self.file.as_fd(), offset, socket, len);
        let unsent = len - *result.as_ref().unwrap_or(&0);
        self.sent_from_file.fetch_sub(unsent, Ordering::SeqCst);
        result
    }

    fn receive_writes(
        &self,
        socket: BorrowedFd<'_>,
        writes: &[QueuedWrite],
        wait_all: bool,
    ) -> io::Result<usize> {
        self.receive_offers.fetch_add(1, Ordering::SeqCst);
        let most = match *lock(&self.receive) {
            Receive::Never => return Err(ErrorKind::Unsupported.into()),
            Receive::NotNow => return Err(io::Error::other("not now")),
            Receive::Take => usize::MAX,
            Receive::Upto(n) => n,
        };
        // Headers into one scratch buffer, payloads one after another into `payloads`.
        let mut scratch = [0u8; 64];
        let total: usize = writes.iter().map(|w| w.len).sum();
        let mut payloads = vec![0u8; total];
        assert!(
            writes.iter().all(|w| w.header <= scratch.len()),
            "test headers fit the scratch buffer"
        );
        let (headers, payload_base) = (scratch.as_mut_ptr(), payloads.as_mut_ptr());
        let mut iov = Vec::new();
        let (mut left, mut at) = (most, 0);
        for w in writes {
            for (base, len) in [(headers, w.header), (payload_base.wrapping_add(at), w.len)] {
                let len = len.min(left);
                if len > 0 {
                    iov.push(libc::iovec {
                        iov_base: base.cast(),
                        iov_len: len,
                    });
                }
                left -= len;
            }
            at += w.len;
        }
        // SAFETY: every iovec points into `scratch` or `payloads`, which outlive the call.
        let n = unsafe { splice::socket_to_iovecs(socket, &iov, wait_all)? };
        // The bytes have left the socket: failing now would break the contract.
        let mut at = 0;
        for (offset, len) in QueuedWrite::landed(writes, n) {
            self.file
                .write_all_at(&payloads[at..at + len], offset)
                .expect("the test file takes writes");
            lock(&self.write_sizes).push(len);
            at += len;
        }
        if n > 0 {
            self.received.fetch_add(1, Ordering::SeqCst);
            self.longest_run.fetch_max(writes.len(), Ordering::SeqCst);
        }
        Ok(n)
    }

    fn splice_in(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        if self.copy_writes.load(Ordering::SeqCst) {
            return Err(ErrorKind::Unsupported.into());
        }
        splice::pipe_to_file(pipe, self.file.as_fd(), offset, len)?;
        lock(&self.write_sizes).push(len);
        self.spliced_in.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_tracking() {
        let m = MemBackend::new(16 * BLOCK);
        m.write_at(&[1; 10], BLOCK + 5, false).unwrap();
        let e = m.block_status(0, 0, 16 * BLOCK).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    length: BLOCK,
                    flags: 3
                },
                Extent {
                    length: BLOCK,
                    flags: 0
                },
                Extent {
                    length: 14 * BLOCK,
                    flags: 3
                },
            ]
        );
        m.write_zeroes(0, 4 * BLOCK, true, true).unwrap();
        assert_eq!(
            m.block_status(0, 0, 4 * BLOCK).unwrap(),
            vec![Extent {
                length: 4 * BLOCK,
                flags: 3
            }]
        );
        assert!(m.write_zeroes(0, BLOCK, false, true).is_err());
        m.write_zeroes(0, BLOCK, false, false).unwrap();
        assert_eq!(
            m.block_status(0, 0, BLOCK).unwrap(),
            vec![Extent {
                length: BLOCK,
                flags: 0
            }]
        );
        let mut buf = [9u8; 8];
        m.read_at(&mut buf, BLOCK + 4).unwrap();
        assert_eq!(buf, [0; 8]);
        assert!(m.read_at(&mut buf, 16 * BLOCK - 4).is_err());
    }
}
