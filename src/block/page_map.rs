//! Write payloads received from a socket straight into a file's page cache, through a
//! shared mapping of the file: the pieces of a large payload, or a run of small WRITEs
//! queued on the socket, taken with one `recvmsg` whose buffers drop the request headers
//! and put each payload in its place.
//!
//! A write(2) or splice(2) into the page cache pays the filesystem's write path for every
//! call: on ext4, `ext4_block_write_begin` walks all the buffer heads of each large folio a
//! write touches, about a fifth of the CPU a 1 MiB write costs. `recv` into a mapping of the
//! cached pages copies the same bytes with none of that: once a page is mapped writable and
//! dirty, further writes to it take no fault and no filesystem call until writeback cleans
//! it. Measured on 1 MiB writes over TCP loopback: about 105 µs of CPU per MiB against
//! 145 µs for socket → pipe → file.
//!
//! Only the kernel touches the mapping (`recv` copies into it), so a page that cannot be
//! written (truncated away by someone else, no space for a hole, an I/O error) fails the
//! `recv` with `EFAULT` instead of raising `SIGBUS`, and the bytes stay in the socket for
//! the ordinary write path, which reports the real error. That takes a filesystem that
//! reserves space when a page is first made writable, as ext4, XFS, btrfs and tmpfs do
//! (see [`reserves_space_on_fault`]): elsewhere a hole could be acknowledged and fail
//! only at writeback. Pages not in the page cache are left to the ordinary path too: a
//! fault would have to read them from disk first.
//!
//! Mapped pages count in the process's resident size although they are page cache, so at
//! most [`WINDOWS`] windows of [`WINDOW`] bytes stay mapped per file node.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nbd::QueuedWrite;

/// Bytes of the file one mapping covers, aligned to its size.
const WINDOW: u64 = 1 << 30;
/// Mappings kept per file, most recently used last.
const WINDOWS: usize = 4;
/// Most bytes of a request header dropped in front of a payload (NBD's largest is 32).
const HEADER_MAX: usize = 64;

/// One window of a file, mapped shared and writable.
struct Window {
    base: u64,
    addr: NonNull<u8>,
}

// SAFETY: the mapping is plain memory shared with the page cache; it is only ever handed to
// system calls as a raw pointer, never read or written through a Rust reference.
unsafe impl Send for Window {}
// SAFETY: as above.
unsafe impl Sync for Window {}

impl Window {
    fn map(fd: BorrowedFd<'_>, base: u64) -> io::Result<Window> {
        let offset = libc::off_t::try_from(base).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a new mapping at an address of the kernel's choice; it aliases nothing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                WINDOW as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast()).ok_or(io::ErrorKind::AddrNotAvailable)?;
        Ok(Window { base, addr })
    }

    /// The address of file offset `offset`, which is inside the window.
    fn at(&self, offset: u64) -> *mut u8 {
        debug_assert!(offset >= self.base && offset - self.base < WINDOW);
        self.addr
            .as_ptr()
            .wrapping_add((offset - self.base) as usize)
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no pointer into it outlives the Arc.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), WINDOW as usize) };
    }
}

/// The windows mapped so far of one file: every call passes the same descriptor.
#[derive(Default)]
pub struct PageMap {
    windows: Mutex<Vec<Arc<Window>>>,
    /// Set when the file cannot be mapped at all (its filesystem does not map files, say).
    unmappable: AtomicBool,
}

impl PageMap {
    /// Receive the bytes of `writes` from `socket` (each its header, dropped, then its
    /// payload) with one `recvmsg`, every payload into the file `fd` at its offset, which
    /// is inside the file (with `wait_all`, waiting for as many as it takes). The receive
    /// stops at the end of a payload's window, before the first page not in the page
    /// cache, and before a payload that would need more than [`WINDOWS`] windows. Returns
    /// how many bytes were taken from the socket, headers included, all the payload bytes
    /// among them now in the page cache (0: the peer has closed). An error
    /// means that nothing was taken, and the bytes must go by another path: `Unsupported`
    /// when the file cannot be mapped; otherwise the first payload's first page is not in
    /// the page cache, or the kernel could not make it writable.
    pub fn receive(
        &self,
        fd: BorrowedFd<'_>,
        socket: BorrowedFd<'_>,
        writes: &[QueuedWrite],
        wait_all: bool,
    ) -> io::Result<usize> {
        let mut headers = [0u8; HEADER_MAX];
        let headers = headers.as_mut_ptr();
        // The windows of the run, kept mapped until the recv is done.
        let mut windows: Vec<Arc<Window>> = Vec::with_capacity(WINDOWS);
        let mut iov = Vec::with_capacity(2 * writes.len());
        for w in writes {
            if w.header > HEADER_MAX {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            // The run's own mapping of the window: another connection may have evicted
            // it from the list meanwhile. A run ends before it would need more windows
            // than stay mapped.
            let base = w.offset - w.offset % WINDOW;
            let window = match windows.iter().find(|held| held.base == base) {
                Some(held) => Arc::clone(held),
                None if windows.len() == WINDOWS => break,
                None => match self.window(fd, w.offset) {
                    Ok(window) => {
                        windows.push(Arc::clone(&window));
                        window
                    }
                    Err(e) if iov.is_empty() => return Err(e),
                    Err(_) => break,
                },
            };
            let len = match cached_len(&window, w) {
                Ok(len) => len,
                Err(e) if iov.is_empty() => return Err(e),
                Err(_) => break,
            };
            if w.header > 0 {
                iov.push(libc::iovec {
                    iov_base: headers.cast(),
                    iov_len: w.header,
                });
            }
            iov.push(libc::iovec {
                iov_base: window.at(w.offset).cast(),
                iov_len: len,
            });
            if len < w.len {
                break;
            }
        }
        loop {
            // SAFETY: the iovecs point into `headers` and into the live mappings held in
            // `windows`, which nothing in this process reads or writes except through
            // system calls.
            match unsafe { nbd::splice::socket_to_iovecs(socket, &iov, wait_all) } {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
    }

    /// The window holding `offset`, mapped now if it was not.
    fn window(&self, fd: BorrowedFd<'_>, offset: u64) -> io::Result<Arc<Window>> {
        if self.unmappable.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let base = offset - offset % WINDOW;
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = windows.iter().position(|w| w.base == base) {
            let window = windows.remove(i);
            windows.push(window.clone());
            return Ok(window);
        }
        let window = match Window::map(fd, base) {
            Ok(window) => Arc::new(window),
            // Short of memory or address space: maybe not later.
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => return Err(e),
            Err(e) => {
                log::debug!("cannot map the file to receive writes into it: {e}");
                self.unmappable.store(true, Ordering::Relaxed);
                return Err(io::ErrorKind::Unsupported.into());
            }
        };
        let evicted = (windows.len() == WINDOWS).then(|| windows.remove(0));
        windows.push(window.clone());
        drop(windows);
        // Unmapped (once no receive uses it) outside the lock.
        drop(evicted);
        Ok(window)
    }
}

/// How many bytes of the payload of `w`, from its start, go into pages of `window` that are
/// in the page cache (at least one).
fn cached_len(window: &Window, w: &QueuedWrite) -> io::Result<usize> {
    let len = w.len.min((window.base + WINDOW - w.offset) as usize);
    let len = cached_prefix(window.at(w.offset), len)?;
    if len == 0 {
        return Err(io::Error::other("not in the page cache"));
    }
    Ok(len)
}

/// How many of the `len` bytes at `addr` of a file mapping lie in pages that are in the
/// page cache, counting from `addr` up to the first page that is not.
fn cached_prefix(addr: *mut u8, len: usize) -> io::Result<usize> {
    // Pages asked about per mincore call: 1 MiB of 4 KiB pages, without an allocation.
    const BATCH: usize = 256;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let end = addr as usize + len;
    let mut at = addr as usize & !(page - 1);
    let mut resident = [0u8; BATCH];
    while at < end {
        let pages = (end - at).div_ceil(page).min(BATCH);
        // SAFETY: the pages are inside a live mapping; mincore writes one byte per page.
        let rc =
            unsafe { libc::mincore(at as *mut libc::c_void, pages * page, resident.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let cached = resident[..pages].iter().take_while(|b| *b & 1 != 0).count();
        at += cached * page;
        if cached < pages {
            break;
        }
    }
    // Below `addr` when its own page is not cached.
    Ok(at.min(end).saturating_sub(addr as usize))
}

/// Whether the filesystem holding `fd` reserves the space for a page when it is first made
/// writable through a mapping, so that the fault, not writeback, reports a full disk.
pub fn reserves_space_on_fault(fd: BorrowedFd<'_>) -> bool {
    const EXT4: i64 = 0xef53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683e;
    const TMPFS: i64 = 0x0102_1994;
    // SAFETY: fstatfs fills a plain struct for an open descriptor.
    let fs_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd.as_raw_fd(), &mut st) < 0 {
            return false;
        }
        st.f_type as i64
    };
    matches!(fs_type, EXT4 | XFS | BTRFS | TMPFS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    fn open(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn pages_not_in_the_page_cache_are_refused_with_the_bytes_left_in_the_socket() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        // A hole has no pages in the page cache.
        file.set_len(1 << 20).unwrap();
        let map = PageMap::default();
        let (mut client, mut server) = UnixStream::pair().unwrap();
        client.write_all(&[0x5a; 8192]).unwrap();
        let err = map
            .receive(
                file.as_fd(),
                server.as_fd(),
                &[QueuedWrite::payload_only(4096, 8192)],
                true,
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "not in the page cache");
        let mut left = [0u8; 8192];
        server.read_exact(&mut left).unwrap();
        assert_eq!(left, [0x5a; 8192]);

        // Written once, the pages are cached and the next bytes go straight in.
        file.write_all_at(&[1; 8192], 4096).unwrap();
        client.write_all(&[0xa5; 8192]).unwrap();
        let taken = map
            .receive(
                file.as_fd(),
                server.as_fd(),
                &[QueuedWrite::payload_only(4096, 8192)],
                true,
            )
            .unwrap();
        assert_eq!(taken, 8192);
        let mut back = [0u8; 8192];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, [0xa5; 8192]);
    }

    /// Receives into `iov` as [`PageMap::receive`] does.
    fn recv_into(socket: &UnixStream, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the tests' iovecs point into live mappings or buffers.
        unsafe { nbd::splice::socket_to_iovecs(socket.as_fd(), iov, true) }
    }

    fn iovec(base: *mut u8, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        }
    }

    /// What makes the mapping safe: a page the kernel cannot make writable (here, past the
    /// end of the file) fails the recv with EFAULT instead of a SIGBUS, and the bytes stay
    /// in the socket, also when the copy started on a good page.
    #[test]
    fn a_page_that_cannot_be_written_fails_the_recv_and_leaves_the_bytes() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        file.write_all_at(&[0; 4096], 0).unwrap();
        let window = Window::map(file.as_fd(), 0).unwrap();
        let (mut client, mut server) = UnixStream::pair().unwrap();
        for (offset, len) in [(8192, 100), (4000, 200)] {
            client.write_all(&vec![0x77; len]).unwrap();
            let err = recv_into(&server, &[iovec(window.at(offset), len)]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "at {offset}");
            let mut left = vec![0u8; len];
            server.read_exact(&mut left).unwrap();
            assert_eq!(
                left,
                vec![0x77; len],
                "at {offset}: the socket is as it was"
            );
        }
        assert_eq!(file.metadata().unwrap().len(), 4096);
    }

    /// The same inside a run of writes: the recv ends before the payload that faults
    /// (or fails, if nothing was taken), counts no byte it did not take, and what it did
    /// not take is still in the socket, in order.
    #[test]
    fn a_page_that_cannot_be_written_ends_a_run_where_it_is() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        file.write_all_at(&[0; 4096], 0).unwrap();
        let window = Window::map(file.as_fd(), 0).unwrap();
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let mut header = [0u8; 28];
        let first: Vec<u8> = [[0xee; 28].as_slice(), &[1; 100]].concat();
        let second: Vec<u8> = [[0xdd; 28].as_slice(), &[2; 100]].concat();
        // Two sends, as a client sends two requests.
        client.write_all(&first).unwrap();
        client.write_all(&second).unwrap();
        let iov = [
            iovec(header.as_mut_ptr(), 28),
            iovec(window.at(0), 100),
            iovec(header.as_mut_ptr(), 28),
            iovec(window.at(8192), 100),
        ];
        let taken = match recv_into(&server, &iov) {
            Ok(taken) => taken,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
                0
            }
        };
        assert!(taken <= 28 + 100 + 28, "took {taken} bytes");
        let stream = [first, second].concat();
        let mut left = vec![0u8; stream.len() - taken];
        server.read_exact(&mut left).unwrap();
        assert_eq!(
            left,
            &stream[taken..],
            "the socket holds what was not taken"
        );
        if taken >= 128 {
            let mut back = [0u8; 100];
            file.read_exact_at(&mut back, 0).unwrap();
            assert_eq!(back, [1; 100]);
        }
    }

    /// A run's headers are dropped and each payload lands at its own offset, in windows of
    /// their own.
    #[test]
    fn a_run_of_writes_lands_with_its_headers_dropped() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        file.set_len(WINDOW + 65536).unwrap();
        file.write_all_at(&[0; 65536], 0).unwrap();
        file.write_all_at(&[0; 65536], WINDOW).unwrap();
        let map = PageMap::default();
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let writes = [(8192, 4096, 1u8), (WINDOW + 100, 300, 2), (0, 4096, 3)];
        let mut queued = Vec::new();
        for (offset, len, fill) in writes {
            client.write_all(&[0xee; 32]).unwrap();
            client.write_all(&vec![fill; len]).unwrap();
            queued.push(QueuedWrite {
                header: 32,
                offset,
                len,
            });
        }
        client.write_all(b"next").unwrap();
        let taken = map
            .receive(file.as_fd(), server.as_fd(), &queued, true)
            .unwrap();
        assert_eq!(taken, 3 * 32 + 4096 + 300 + 4096);
        for (offset, len, fill) in writes {
            let mut back = vec![0u8; len];
            file.read_exact_at(&mut back, offset).unwrap();
            assert_eq!(back, vec![fill; len], "at {offset}");
        }
        let mut next = [0u8; 4];
        server.read_exact(&mut next).unwrap();
        assert_eq!(&next, b"next", "the run was taken, and nothing after it");
    }

    /// A run ends before a write that would need more windows than stay mapped.
    #[test]
    fn a_run_keeps_its_windows_mapped() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        let windows = WINDOWS as u64 + 2;
        file.set_len(windows * WINDOW).unwrap();
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut run = Vec::new();
        for w in 0..windows {
            file.write_all_at(&[0; 4096], w * WINDOW).unwrap();
            // Two in each window.
            for offset in [w * WINDOW, w * WINDOW + 200] {
                client.write_all(&[0xee; 28]).unwrap();
                client.write_all(&[w as u8 + 1; 100]).unwrap();
                run.push(QueuedWrite {
                    header: 28,
                    offset,
                    len: 100,
                });
            }
        }
        let map = PageMap::default();
        let taken = map
            .receive(file.as_fd(), server.as_fd(), &run, false)
            .unwrap();
        assert_eq!(taken, 2 * WINDOWS * 128, "the writes in the first windows");
    }

    /// A run stops before the header of the first write onto a page not in the page cache,
    /// and after the cached start of a payload that runs into one, with a header or not.
    #[test]
    fn a_run_stops_at_the_first_page_not_in_the_page_cache() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[0; 8192], 0).unwrap();
        let map = PageMap::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(&[9; 3 * (28 + 4096)]).unwrap();
        let at = |offset| QueuedWrite {
            header: 28,
            offset,
            len: 4096,
        };
        let taken = map
            .receive(
                file.as_fd(),
                server.as_fd(),
                &[at(0), at(65536), at(4096)],
                true,
            )
            .unwrap();
        assert_eq!(taken, 28 + 4096, "stops before the second header");
        let taken = map
            .receive(file.as_fd(), server.as_fd(), &[at(6144), at(0)], true)
            .unwrap();
        assert_eq!(taken, 28 + 2048, "stops where the cached pages end");
        let err = map
            .receive(file.as_fd(), server.as_fd(), &[at(65536)], true)
            .unwrap_err();
        assert_eq!(err.to_string(), "not in the page cache");
        // A payload on its own, no header.
        client.write_all(&[3; 12000]).unwrap();
        let taken = map
            .receive(
                file.as_fd(),
                server.as_fd(),
                &[QueuedWrite::payload_only(100, 12000)],
                true,
            )
            .unwrap();
        assert_eq!(taken, 8192 - 100);
    }

    #[test]
    fn a_receive_stops_at_the_end_of_its_window() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        file.set_len(WINDOW + 4096).unwrap();
        file.write_all_at(&[0; 8192], WINDOW - 4096).unwrap();
        let map = PageMap::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        let payload: Vec<u8> = (0..100u8).collect();
        client.write_all(&payload).unwrap();
        let first = map
            .receive(
                file.as_fd(),
                server.as_fd(),
                &[QueuedWrite::payload_only(WINDOW - 10, 100)],
                true,
            )
            .unwrap();
        assert_eq!(first, 10, "the first window ends 10 bytes in");
        let rest = map
            .receive(
                file.as_fd(),
                server.as_fd(),
                &[QueuedWrite::payload_only(WINDOW, 90)],
                true,
            )
            .unwrap();
        assert_eq!(rest, 90);
        let mut back = [0u8; 100];
        file.read_exact_at(&mut back, WINDOW - 10).unwrap();
        assert_eq!(back.as_slice(), payload.as_slice());
        assert_eq!(map.windows.lock().unwrap().len(), 2);
    }

    #[test]
    fn at_most_a_few_windows_stay_mapped() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        let windows = WINDOWS as u64 + 2;
        file.set_len(windows * WINDOW).unwrap();
        let map = PageMap::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        for w in 0..windows {
            file.write_all_at(&[0; 4096], w * WINDOW).unwrap();
            client.write_all(&[w as u8 + 1; 4096]).unwrap();
            let taken = map
                .receive(
                    file.as_fd(),
                    server.as_fd(),
                    &[QueuedWrite::payload_only(w * WINDOW, 4096)],
                    true,
                )
                .unwrap();
            assert_eq!(taken, 4096);
        }
        let kept: Vec<u64> = map.windows.lock().unwrap().iter().map(|w| w.base).collect();
        let expected: Vec<u64> = (2..windows).map(|w| w * WINDOW).collect();
        assert_eq!(kept, expected, "the most recently used windows");
        for w in 0..windows {
            let mut back = [0u8; 4096];
            file.read_exact_at(&mut back, w * WINDOW).unwrap();
            assert_eq!(back, [w as u8 + 1; 4096], "window {w}");
        }
    }
}
