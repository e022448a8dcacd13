//! An NBD (Network Block Device) protocol server and client.
//!
//! The server speaks the fixed newstyle handshake with structured replies, extended headers
//! (64-bit requests and replies, as QEMU 10 negotiates them), metadata contexts
//! (`base:allocation` plus whatever extra contexts an export offers, such as
//! `qemu:allocation-depth` or `qemu:dirty-bitmap:NAME`) and a STARTTLS hook. It mirrors the
//! behaviour of QEMU's NBD server (flags, block sizes, error texts).
//!
//! The crate knows nothing of the block layer behind an export: the embedding daemon
//! implements [`ExportBackend`] for each export and hands connected sockets (anything
//! implementing [`Stream`]) to [`Server::serve_client`]. Everything is synchronous: each
//! connection has a reader thread that decodes requests and a small, bounded pool of worker
//! threads that serve them and write replies, possibly out of order, under one send lock.

pub mod client;
mod poll;
pub mod proto;
mod server;
pub mod splice;
pub mod test_utils;
mod transmission;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub use proto::Extent;
pub use server::{RemoveMode, Server, ServerConfig};
pub use transmission::TCP_UNSENT_MAX;

/// A connected byte stream (unix socket, TCP socket, later TLS session).
///
/// The server reads requests on one handle and writes replies through another obtained with
/// [`Stream::try_clone`], and keeps a third one to [`Stream::shutdown`] the connection from
/// outside (export removal, server stop).
pub trait Stream: Read + Write + Send {
    /// Another handle on the same connection, usable from another thread.
    fn try_clone(&self) -> io::Result<Box<dyn Stream>>;
    /// Shut down both directions, waking up any thread blocked on the stream.
    fn shutdown(&self) -> io::Result<()>;
    /// Bound how long one read or write may block (`None`: forever). Used for the
    /// handshake timeout, which a client that stops reading must not escape either.
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// The socket itself, when the bytes on it are the protocol's own (not TLS records):
    /// READ payloads are spliced into it and it is polled for requests.
    fn plain_socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Stream for UnixStream {
    fn try_clone(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(UnixStream::try_clone(self)?))
    }

    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, std::net::Shutdown::Both)
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)?;
        UnixStream::set_write_timeout(self, timeout)
    }

    fn plain_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl Stream for TcpStream {
    fn try_clone(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(TcpStream::try_clone(self)?))
    }

    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)?;
        TcpStream::set_write_timeout(self, timeout)
    }

    fn plain_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// Upgrades a plain connection to TLS after NBD_OPT_STARTTLS has been acknowledged.
///
/// When a server has one, TLS is required: before STARTTLS every option except STARTTLS and
/// ABORT is refused with NBD_REP_ERR_TLS_REQD (as QEMU does when `tls-creds` is set).
pub trait TlsUpgrade: Send + Sync {
    /// Run the server side of the TLS handshake (and any client authorisation) on `plain`.
    /// An error closes the connection; its text is logged.
    fn upgrade(&self, plain: Box<dyn Stream>) -> io::Result<Box<dyn Stream>>;
}

/// The storage behind one export. Offsets and lengths are already checked against
/// [`ExportBackend::size`] and the protocol limits when these are called.
pub trait ExportBackend: Send + Sync {
    /// Size of the export in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` with the data at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`; with `fua`, the data must be durable when this returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discard a range (a hint: the data may stay or read back as anything).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make a range read as zeroes. `may_trim`: the range may be deallocated.
    /// `fast_only`: fail with `ErrorKind::Unsupported` (NBD ENOTSUP), changing nothing, unless
    /// this is faster than writing zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> io::Result<()>;
    /// Whether [`ExportBackend::splice_out`] and [`ExportBackend::send_file`] work: the
    /// export's bytes are a plain file range in the page cache. Then large READ payloads go
    /// from the file to the socket without being copied through the server, and so do lone
    /// small ones over unix sockets; large WRITE payloads are written piece by piece as they
    /// arrive (spliced too, unless [`ExportBackend::splice_in`] refuses).
    fn can_splice(&self) -> bool {
        false
    }
    /// Move the `len` bytes at `offset` into `pipe`, which has room for them (see
    /// [`splice::file_to_pipe`]). On error the pipe is dropped and the request is served by
    /// [`ExportBackend::read_at`] instead.
    fn splice_out(&self, _pipe: BorrowedFd<'_>, _offset: u64, _len: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Send up to `len` bytes at `offset` straight from the file to `socket`, for a READ
    /// whose reply header is already on it (see [`splice::file_to_socket`]). `Ok(n)`: exactly
    /// `n` bytes were sent, and the server sends the rest from [`ExportBackend::read_at`];
    /// an error means that nothing was. The server calls it only while
    /// [`ExportBackend::can_splice`] is true and the range is inside
    /// [`ExportBackend::size`]; a failure after that ends the connection, since the reply
    /// has begun.
    fn send_file(&self, _socket: BorrowedFd<'_>, _offset: u64, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Write the `len` bytes waiting in `pipe` at `offset` (see [`splice::pipe_to_file`]),
    /// as [`ExportBackend::write_at`] would write them. `ErrorKind::Unsupported` means that
    /// nothing was taken from the pipe and the data must go through `write_at`: the backend
    /// has to look at it (to detect zeroes, say). After any other error the pipe's content is
    /// undefined.
    fn splice_in(&self, _pipe: BorrowedFd<'_>, _offset: u64, _len: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Take the bytes of `writes` from `socket`, in order (each its request header, which
    /// is dropped, then its payload), writing every payload at its offset straight into the
    /// storage, as [`ExportBackend::write_at`] would (with `wait_all`, waiting for as many
    /// as it takes). Returns how many bytes were taken, headers included, maybe fewer than
    /// all of them and ending anywhere (the caller takes the rest by the other paths; see
    /// [`QueuedWrite::landed`]); 0: the client has closed the connection. An error means
    /// that nothing was taken: `ErrorKind::Unsupported` if the backend never can on this
    /// export, anything else if it cannot for the first of these writes now. Called, like
    /// [`ExportBackend::splice_in`], only while [`ExportBackend::can_splice`] is true, with
    /// every write valid and inside [`ExportBackend::size`].
    fn receive_writes(
        &self,
        _socket: BorrowedFd<'_>,
        _writes: &[QueuedWrite],
        _wait_all: bool,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Prefetch a range; the default does nothing, which is always correct.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Status of a range for metadata context `context` (0 = `base:allocation`, `i` =
    /// `ExportConfig::meta_contexts[i - 1]`, whatever its wire id). Returns extents covering at least a non-empty
    /// prefix of the range; the server calls again for the rest. Also used with context 0 to
    /// send holes ([`proto::STATE_ZERO`] extents) instead of data in READ replies.
    /// The default reports everything as allocated data.
    fn block_status(&self, _context: usize, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
}

/// A WRITE whose bytes are next on the socket, for [`ExportBackend::receive_writes`]:
/// `header` bytes (its request header, already decoded, or none when the payload is
/// received on its own), then `len` payload bytes that belong at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuedWrite {
    pub header: usize,
    pub offset: u64,
    pub len: usize,
}

impl QueuedWrite {
    /// A payload received on its own, with no header in front.
    pub fn payload_only(offset: u64, len: usize) -> Self {
        QueuedWrite {
            header: 0,
            offset,
            len,
        }
    }

    /// The payload ranges (offset, length) that the first `taken` bytes of `writes` put in
    /// place: whole payloads, then the start of the one where `taken` ends (empty ones are
    /// left out).
    pub fn landed(writes: &[QueuedWrite], taken: usize) -> impl Iterator<Item = (u64, usize)> + '_ {
        let mut at = 0usize;
        writes
            .iter()
            .map_while(move |w| {
                let payload_start = at.saturating_add(w.header);
                if taken < payload_start {
                    return None;
                }
                at = payload_start.saturating_add(w.len);
                Some((w.offset, (taken - payload_start).min(w.len)))
            })
            .filter(|&(_, len)| len > 0)
    }
}

/// Run by every thread that starts serving an export: the connection's reader once the
/// client has chosen the export, and each of its pool workers.
pub type ServeHook = std::sync::Arc<dyn Fn() + Send + Sync>;

/// How one export is presented to clients.
#[derive(Clone, Default)]
pub struct ExportConfig {
    /// Export name clients ask for ("" is the default export).
    pub name: String,
    /// Free-text description sent with NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    pub description: Option<String>,
    /// Refuse writes (EPERM) and advertise READ_ONLY.
    pub read_only: bool,
    /// Advertise CAN_MULTI_CONN (QEMU does unless the server allows a single connection).
    pub multi_conn: bool,
    /// Metadata contexts besides `base:allocation`, in the order replies list them.
    pub meta_contexts: Vec<MetaContextConfig>,
    /// Places the threads that serve this export, e.g. on an iothread's CPUs.
    pub on_serve: Option<ServeHook>,
    /// How long a connection's reader may poll its socket for the next request before it
    /// sleeps (QEMU's iothread `poll-max-ns`); zero never polls.
    pub poll_max: Duration,
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .field("multi_conn", &self.multi_conn)
            .field("meta_contexts", &self.meta_contexts)
            .field("on_serve", &self.on_serve.is_some())
            .field("poll_max", &self.poll_max)
            .finish()
    }
}

/// A metadata context an export offers besides `base:allocation` (which has id 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextConfig {
    /// The id SET_META_CONTEXT assigns and BLOCK_STATUS replies carry: unique, not 0.
    /// Fixed per context rather than counted, as QEMU does (`qemu:allocation-depth` is 1
    /// and `qemu:dirty-bitmap:NAME`s are 2 on, whether or not the other is offered).
    pub id: u32,
    /// The full context name, e.g. `qemu:dirty-bitmap:b0`.
    pub name: String,
}

/// Errors of the server's management API and of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Adding an export whose name is taken.
    #[error("NBD server already has export named '{0}'")]
    ExportExists(String),
    /// Removing an export that does not exist.
    #[error("Export '{0}' is not found")]
    ExportNotFound(String),
    /// Safe removal of an export with connected clients.
    #[error("export '{0}' still in use")]
    ExportInUse(String),
    /// Invalid export configuration.
    #[error("invalid NBD export '{name}': {reason}")]
    InvalidExport { name: String, reason: String },
    /// I/O failure on the connection.
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server refused an option during negotiation.
    #[error("server replied with error {reply_type:#x} to option {option} ({}): {message}", proto::option_name(*option))]
    OptionRefused {
        option: u32,
        reply_type: u32,
        message: String,
    },
    /// The server failed a command.
    #[error("NBD {command} failed with error {errno}: {message}")]
    Command {
        command: &'static str,
        errno: u32,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::QueuedWrite;

    #[test]
    fn landed_names_the_payload_bytes_taken() {
        let w = |header, offset, len| QueuedWrite {
            header,
            offset,
            len,
        };
        let run = [w(28, 100, 10), w(28, 500, 0), w(28, 900, 20), w(0, 2000, 5)];
        let landed = |taken| QueuedWrite::landed(&run, taken).collect::<Vec<_>>();
        assert_eq!(landed(0), []);
        assert_eq!(landed(28), [], "a header alone lands nothing");
        assert_eq!(landed(33), [(100, 5)]);
        assert_eq!(landed(38), [(100, 10)]);
        assert_eq!(
            landed(38 + 28 + 28 + 1),
            [(100, 10), (900, 1)],
            "past an empty one"
        );
        assert_eq!(landed(38 + 56 + 20), [(100, 10), (900, 20)]);
        assert_eq!(landed(38 + 56 + 23), [(100, 10), (900, 20), (2000, 3)]);
        assert_eq!(
            landed(usize::MAX),
            [(100, 10), (900, 20), (2000, 5)],
            "no more than the run"
        );
    }
}
