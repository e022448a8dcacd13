//! Write payloads received from a socket straight into a file's page cache, through a
//! shared mapping of the file.
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

/// Bytes of the file one mapping covers, aligned to its size.
const WINDOW: u64 = 1 << 30;
/// Mappings kept per file, most recently used last.
const WINDOWS: usize = 4;

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

    /// Receive up to `len` bytes at file offset `offset` (inside the window, and `len` not
    /// past its end) from `socket`, retrying when a signal interrupts.
    fn recv(
        &self,
        socket: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        wait_all: bool,
    ) -> io::Result<usize> {
        loop {
            // SAFETY: the range is inside the live mapping, which nothing in this process
            // reads or writes except through system calls.
            match unsafe { nbd::splice::socket_to_memory(socket, self.at(offset), len, wait_all) } {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
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
    /// Receive up to `len` bytes from `socket` into the file `fd` at `offset`, where
    /// `offset + len` is inside the file (with `wait_all`, waiting for as many as it
    /// takes), stopping at the end of the window and before the first page not in the
    /// page cache. Returns how many bytes were taken from the socket, all of them now in
    /// the page cache (0: the peer has closed). An error means that nothing was taken, and
    /// the bytes must go by another path: `Unsupported` when the file cannot be mapped;
    /// otherwise the first page is not in the page cache, or the kernel could not make it
    /// writable.
    pub fn receive(
        &self,
        fd: BorrowedFd<'_>,
        socket: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        wait_all: bool,
    ) -> io::Result<usize> {
        let window = self.window(fd, offset)?;
        let len = len.min((window.base + WINDOW - offset) as usize);
        let len = cached_prefix(window.at(offset), len)?;
        if len == 0 {
            return Err(io::Error::other("not in the page cache"));
        }
        window.recv(socket, offset, len, wait_all)
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
            .receive(file.as_fd(), server.as_fd(), 4096, 8192, true)
            .unwrap_err();
        assert_eq!(err.to_string(), "not in the page cache");
        let mut left = [0u8; 8192];
        server.read_exact(&mut left).unwrap();
        assert_eq!(left, [0x5a; 8192]);

        // Written once, the pages are cached and the next bytes go straight in.
        file.write_all_at(&[1; 8192], 4096).unwrap();
        client.write_all(&[0xa5; 8192]).unwrap();
        let taken = map
            .receive(file.as_fd(), server.as_fd(), 4096, 8192, true)
            .unwrap();
        assert_eq!(taken, 8192);
        let mut back = [0u8; 8192];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, [0xa5; 8192]);
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
            let err = window.recv(server.as_fd(), offset, len, true).unwrap_err();
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

    /// A range that runs from cached pages into uncached ones is received up to the first
    /// uncached page.
    #[test]
    fn a_receive_stops_before_the_first_page_not_in_the_page_cache() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let file = open(img.path());
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[0; 8192], 0).unwrap();
        let map = PageMap::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(&[3; 12000]).unwrap();
        let taken = map
            .receive(file.as_fd(), server.as_fd(), 100, 12000, true)
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
            .receive(file.as_fd(), server.as_fd(), WINDOW - 10, 100, true)
            .unwrap();
        assert_eq!(first, 10, "the first window ends 10 bytes in");
        let rest = map
            .receive(file.as_fd(), server.as_fd(), WINDOW, 90, true)
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
                .receive(file.as_fd(), server.as_fd(), w * WINDOW, 4096, true)
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
