//! Payloads that bypass the server's memory, with splice(2). Large reads go file → pipe →
//! socket, copied by no one but the client's kernel. Large writes go socket → pipe → file,
//! copied once (into the page cache) instead of twice (into a buffer, then into the page
//! cache). Used when the backend can splice ([`crate::ExportBackend::can_splice`]) and the
//! connection is a plain socket; a read that does not fit a pipe is copied as usual, and so
//! is a write the backend must look at ([`crate::ExportBackend::splice_in`]).

use std::io::{self, ErrorKind, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Payloads smaller than this are copied: for a few pages a copy costs less than the extra
/// system calls of the pipe.
pub(crate) const SPLICE_MIN: u64 = 128 * 1024;
/// The pipe size asked for: one 1 MiB payload, the default `fs.pipe-max-size`.
const PIPE_SIZE: libc::c_int = 1 << 20;

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A pipe that holds one READ payload on its way from a file to a socket.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two new descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ takes an int and changes nothing but the pipe's size.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        let capacity = check(size as isize)?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    pub(crate) fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }
}

/// One splice(2); `None` offsets for pipes and sockets, `Some` for files (positional: the
/// file's own offset is left alone).
fn splice_once(
    from: BorrowedFd<'_>,
    from_offset: Option<u64>,
    to: BorrowedFd<'_>,
    to_offset: Option<u64>,
    len: usize,
    flags: libc::c_uint,
) -> io::Result<usize> {
    let mut from_off = from_offset.unwrap_or(0) as libc::loff_t;
    let mut to_off = to_offset.unwrap_or(0) as libc::loff_t;
    let from_ptr = from_offset.map_or(std::ptr::null_mut(), |_| &mut from_off as *mut _);
    let to_ptr = to_offset.map_or(std::ptr::null_mut(), |_| &mut to_off as *mut _);
    // SAFETY: the offset pointers are null or point to live locals.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            from_ptr,
            to.as_raw_fd(),
            to_ptr,
            len,
            flags | libc::SPLICE_F_MOVE,
        )
    };
    check(n)
}

/// Move exactly `len` bytes from a file at `offset` into `pipe`, which has room for them
/// (a pipe that turns out too small is an error, not a wait: nobody would empty it).
pub fn file_to_pipe(
    file: BorrowedFd<'_>,
    offset: u64,
    pipe: BorrowedFd<'_>,
    len: usize,
) -> io::Result<()> {
    // A pipe holds a part of at most one page per slot: a range that starts inside a page
    // takes one slot more than its length in pages. Refuse before moving anything rather
    // than fill the pipe and fail on its last page.
    // SAFETY: sysconf and F_GETPIPE_SZ only return numbers.
    let (page, room) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ),
        )
    };
    let page = usize::try_from(page).unwrap_or(4096).max(1);
    let room = check(room as isize)?;
    let span = (offset % page as u64) as usize + len;
    if span.div_ceil(page) > room / page {
        return Err(io::Error::other("the pipe has too few pages for the data"));
    }
    let mut done = 0;
    while done < len {
        match splice_once(
            file,
            Some(offset + done as u64),
            pipe,
            None,
            len - done,
            libc::SPLICE_F_NONBLOCK,
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(io::Error::other("the pipe has no room left for the data"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Move the `len` bytes waiting in `pipe` into a file at `offset`. The pipe must hold them
/// all: an empty pipe is an error, not a wait.
pub fn pipe_to_file(
    pipe: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        match splice_once(
            pipe,
            None,
            file,
            Some(offset + done as u64),
            len - done,
            libc::SPLICE_F_NONBLOCK,
        ) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(io::Error::other(
                    "the pipe holds less than the data to write",
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Move what a (blocking) socket has, at least one byte and at most `max`, into an empty
/// `pipe`, waiting for it if need be; 0 at the end of the stream. Less may come than is
/// queued: the pipe also runs out of slots, one per page or piece of a page.
pub(crate) fn socket_to_pipe(
    socket: BorrowedFd<'_>,
    pipe: BorrowedFd<'_>,
    max: usize,
) -> io::Result<usize> {
    loop {
        match splice_once(socket, None, pipe, None, max, 0) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Read exactly `buf.len()` bytes waiting in `pipe` (an empty pipe is an error, not a wait).
pub(crate) fn drain_pipe(pipe: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    check(unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut queued) } as isize)?;
    if usize::try_from(queued).unwrap_or(0) < buf.len() {
        return Err(io::Error::other("the pipe holds less than expected"));
    }
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: reads into `rest`, which is valid for writes of its length.
        let n = unsafe { libc::read(pipe.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        match check(n) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Send `parts` on a socket, telling it that more follows (TCP then holds a small header
/// back until the data spliced after it fills the segment).
pub(crate) fn send_more(socket: BorrowedFd<'_>, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut slices: &mut [IoSlice<'_>] = &mut slices;
    while !slices.is_empty() {
        // SAFETY: msghdr is plain data; an all-zero value is valid before the fields are set.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = slices.as_mut_ptr().cast();
        msg.msg_iovlen = slices.len();
        // SAFETY: the iovecs (IoSlice is ABI-compatible with iovec) point to live slices.
        let n = unsafe {
            libc::sendmsg(
                socket.as_raw_fd(),
                &msg,
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        match check(n) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Send up to `len` bytes of a file at `offset` to a (blocking) socket with sendfile(2):
/// no pipe and no copy through the server. Returns the bytes sent, fewer than `len` if the
/// file ends first or an error stops the transfer midway; an error before the first byte is
/// returned as such.
pub fn file_to_socket(
    file: BorrowedFd<'_>,
    offset: u64,
    socket: BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    let end = offset.checked_add(len as u64);
    if end.is_none_or(|end| libc::off_t::try_from(end).is_err()) {
        return Err(ErrorKind::InvalidInput.into());
    }
    let mut done = 0;
    while done < len {
        // In range: checked above.
        let mut at = (offset + done as u64) as libc::off_t;
        // SAFETY: both descriptors are open for the call; sendfile only writes `at`.
        let n =
            unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut at, len - done) };
        match check(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if done == 0 => return Err(e),
            Err(e) => {
                log::debug!("sendfile stopped after {done} of {len} bytes: {e}");
                break;
            }
        }
    }
    Ok(done)
}

/// One recvmsg(2) from `socket` into the buffers of `iov`, in order, such as pieces of a
/// shared mapping of a file's page cache: the bytes received (0 at the end of the stream).
/// The kernel does the copy, so a page it cannot write fails the call with `EFAULT`
/// (nothing taken) or ends it early (fewer taken), never with a signal.
///
/// # Safety
///
/// Every buffer of `iov` must be valid for writes of its length, and nothing may hold a
/// Rust reference to them during the call.
pub unsafe fn socket_to_iovecs(
    socket: BorrowedFd<'_>,
    iov: &[libc::iovec],
    wait_all: bool,
) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // recvmsg only writes where the iovecs point, never to the array itself.
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len() as _;
    let flags = if wait_all { libc::MSG_WAITALL } else { 0 };
    // SAFETY: the caller vouches for the buffers; `msg` is valid for the call.
    check(unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags) })
}

/// One recv(2) of up to `len` bytes into `dst` with `flags`, with the safety rules of
/// [`socket_to_iovecs`].
pub(crate) unsafe fn recv_with(
    socket: BorrowedFd<'_>,
    dst: *mut u8,
    len: usize,
    flags: libc::c_int,
) -> io::Result<usize> {
    // SAFETY: the caller vouches for `dst`.
    check(unsafe { libc::recv(socket.as_raw_fd(), dst.cast(), len, flags) })
}

/// Move exactly `len` bytes waiting in `pipe` to a (blocking) socket.
pub(crate) fn pipe_to_socket(
    pipe: BorrowedFd<'_>,
    socket: BorrowedFd<'_>,
    len: usize,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        match splice_once(pipe, None, socket, None, len - done, 0) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_range_that_needs_more_pages_than_the_pipe_has_is_refused_untouched() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&vec![7u8; 3 << 20], 0).unwrap();
        // SAFETY: sysconf only returns a number.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let pipe = Pipe::new().unwrap();
        let len = pipe.capacity();
        // Starting inside a page, a whole pipe's worth spans one page more than it holds.
        let err = file_to_pipe(file.as_fd(), 512, pipe.write_end(), len).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Other);
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        assert_eq!(
            unsafe { libc::ioctl(pipe.read_end().as_raw_fd(), libc::FIONREAD, &mut queued) },
            0
        );
        assert_eq!(queued, 0, "nothing was moved");
        // Page-aligned, or a page shorter, it fits.
        file_to_pipe(file.as_fd(), page, pipe.write_end(), len).unwrap();
        let other = Pipe::new().unwrap();
        file_to_pipe(file.as_fd(), 512, other.write_end(), len - page as usize).unwrap();
    }
}
