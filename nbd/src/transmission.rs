//! Transmission phase. The reader thread decodes requests and serves the cheap ones (READ,
//! WRITE, BLOCK_STATUS) itself, one after the other: on a page-cache-backed export these take
//! microseconds, and a hand-off to another thread would cost more than the work. Their replies
//! are gathered and written together once the reader has no buffered request left (over TCP,
//! small replies wait a little longer for requests already on the socket). Requests
//! that may wait for the disk (FLUSH, FUA, TRIM, WRITE_ZEROES, CACHE) go to a bounded pool of
//! worker threads, and so does everything while the backend is seen to be slow (an inline
//! request that took long: O_DIRECT, uncached data, a busy host), until the workers see it fast
//! again, except runs of small WRITEs that the backend takes from the socket itself. Replies
//! are written whole under the connection's send lock, in completion order.
//! Before the reader sleeps on the socket it polls it for a while (see [`crate::poll`]);
//! large reads from files are spliced (see [`crate::splice`]); large writes are written while
//! their payload arrives (see [`Session::stream_write`]); small writes queued behind one
//! another go from the socket straight into the backend (see
//! [`Session::receive_queued_writes`]).

use std::io::{self, BufRead, BufReader, ErrorKind, IoSlice, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::poll::PollWindow;
use crate::proto::{self, Extent, RequestHeader};
use crate::server::{lock, Export};
use crate::splice::{self, Pipe, SPLICE_MIN};
use crate::{QueuedWrite, Stream};

/// Reply style negotiated for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Simple replies only.
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS (64-bit requests and reply chunks).
    Extended,
}

/// Reused I/O buffers larger than this are freed instead of kept.
const MAX_KEPT_BUFFER: usize = 2 * 1024 * 1024;
/// READ replies with more hole/data segments than this are sent as one data chunk.
const MAX_READ_SEGMENTS: usize = 64;
/// Read-ahead for request headers (and small WRITE payloads).
const READ_BUFFER: usize = 64 * 1024;
/// Replies up to this size are copied into the reader's batch; larger ones are written at
/// once (with the batch in front), sparing the copy.
const BATCH_COPY_MAX: usize = 16 * 1024;
/// The batch is written when it grows past this, even with more requests buffered, so that
/// the client gets replies while the reader works through a long queue.
const BATCH_FLUSH: usize = 64 * 1024;
/// Over TCP every send is a trip through the network stack on both ends (about 4 us on
/// loopback here), so a batch of small replies (to WRITEs and small READs served inline) up
/// to this size waits while a whole further request is already queued...
const HOLD_MAX_BYTES: usize = 512;
/// ... for at most this long, plus the service of the quick requests read meanwhile.
const HOLD_MAX_WAIT: Duration = Duration::from_micros(100);
/// Over TCP a streamed WRITE payload is read in pieces of this size, each waited for whole:
/// taking whatever has arrived means a wake-up, a read and a write for every few segments.
/// Measured at 1 MiB QD8 on loopback: 20-50% more MiB/s and 3-15% less CPU per MiB than
/// taking what is there, and better than 64 or 192 KiB. Over a unix socket waiting for
/// whole pieces halved the MiB/s, so there the reader takes what has arrived.
const TCP_PIECE: usize = 128 * 1024;
/// A cheap request taking longer than this (plus 1 ns per [`SLOW_BYTES_PER_NS`] bytes moved)
/// had to wait, not just work: the backend is slow, so the pool takes over.
const SLOW_BASE: Duration = Duration::from_micros(100);
/// 2 bytes per ns (2 GB/s) is slower than any page-cache copy.
const SLOW_BYTES_PER_NS: u64 = 2;
/// A request this slow (plus the time to move its bytes) is no accident of scheduling: the
/// pool takes over at once.
const VERY_SLOW: Duration = Duration::from_millis(10);
/// Largest READ the reader serves itself (WRITEs of any size are cheap: their payload is
/// already in hand, and a hand-off costs a wake-up per request for no gain in throughput)...
const INLINE_MAX: u64 = 256 * 1024;
/// ... or READ, when it is spliced (one pipe's worth).
const SPLICE_MAX_READ: u64 = 1024 * 1024;
/// WRITEs from this size on are written while their payload arrives. Smaller ones land
/// whole or not at all.
const STREAM_MIN: u64 = 256 * 1024;
/// WRITEs up to this size, queued on the socket behind one another, are received with one
/// system call straight into the backend's storage (see [`Session::receive_queued_writes`]).
/// Larger ones would leave few whole requests in a [`Peek`] of [`READ_BUFFER`] bytes.
const QUEUED_WRITE_MAX: u64 = 32 * 1024;
/// Most WRITEs taken in one call (two iovecs each, of the kernel's 1024).
const QUEUED_WRITES_MAX: usize = 256;
/// Requests read the ordinary way after the backend took none of a run, before the next
/// peek (see `peek_backoff` in [`run`]).
const PEEK_BACKOFF: u32 = 64;
/// The reader hands cheap requests to the pool once this many of the last 64 were slow...
const SLOW_TO_POOL: u32 = 4;
/// ... and serves them again once at most this many of the last 64 were.
const SLOW_TO_INLINE: u32 = 1;
/// A client whose request the reader waited this long for (polling the socket or asleep on
/// it) had nothing else to send: it is likely asleep until the reply comes (see
/// [`Session::flush_batch`]). Requests queued behind others arrive within a few
/// microseconds, and those already in the read buffer are not waited for at all.
const CLIENT_ASLEEP: Duration = Duration::from_micros(10);
/// How far past a read a `base:allocation` query looks, so that one answer covers many
/// reads of allocated data.
const STATUS_LOOKAHEAD: u64 = 1 << 30;

struct Request {
    header: RequestHeader,
    payload: Vec<u8>,
}

/// What the reader took off the socket.
enum Incoming {
    /// A request with its whole payload.
    Whole(Request),
    /// A WRITE whose whole payload is the start of the reader's buffer: served from there,
    /// it is not copied on its way to the backend.
    Buffered(RequestHeader),
    /// A large WRITE whose payload is still on the socket: it is written piece by piece as
    /// it arrives (see [`Session::stream_write`]).
    LargeWrite(RequestHeader),
}

type CommandError = (u32, String);

/// Where the reply to one request goes.
enum Sink<'a> {
    /// Straight to the socket, under the send lock (worker threads).
    Socket,
    /// Into the reader's batch of replies, written by [`Session::flush_batch`].
    Batch(&'a mut Batch),
}

/// The replies the reader has gathered, to be written together.
struct Batch {
    /// Bytes `..len` are the replies. The rest were replies before: they stay so that a
    /// READ can be served into them without zeroing them first.
    buf: Vec<u8>,
    len: usize,
    /// Where the data starts when the batch holds one READ reply and nothing else, to a
    /// client that seemed asleep (see [`Session::flush_batch`]).
    lone_read_data: Option<usize>,
    /// Whether the client seemed asleep when the request being served was read: the
    /// reader waited at least [`CLIENT_ASLEEP`] for it, nothing came after it, and no
    /// other request is being served (so a reply sent at once holds up no other).
    client_asleep: bool,
}

impl Batch {
    fn with_capacity(capacity: usize) -> Self {
        Batch {
            buf: Vec::with_capacity(capacity),
            len: 0,
            lone_read_data: None,
            client_asleep: false,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, bytes: &[u8]) {
        self.grow(bytes.len()).copy_from_slice(bytes);
    }

    /// `n` more bytes at the end, for the caller to fill: whatever they held before.
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let start = self.len;
        self.len += n;
        if self.buf.len() < self.len {
            self.buf.resize(self.len, 0);
        }
        self.lone_read_data = None;
        &mut self.buf[start..self.len]
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.lone_read_data = None;
    }

    fn clear(&mut self) {
        self.truncate(0);
    }
}

struct Session {
    id: u64,
    export: Arc<Export>,
    mode: Mode,
    contexts: Vec<usize>,
    size: u64,
    writer: Mutex<Box<dyn Stream>>,
    broken: AtomicBool,
    buffers: Mutex<Vec<Vec<u8>>>,
    max_kept_buffers: usize,
    /// Whether large READ payloads are spliced (see [`crate::splice`]); cleared for good
    /// when a pipe cannot be made (the user's pipe quota is spent).
    splicing: AtomicBool,
    /// Set once the backend refused a spliced WRITE piece: the rest are copied.
    splice_in_refused: AtomicBool,
    /// Set once the backend refused to receive a WRITE payload itself
    /// ([`crate::ExportBackend::receive_writes`]): the rest are spliced or copied.
    receive_refused: AtomicBool,
    pipes: Mutex<Vec<Pipe>>,
    /// A range recently reported as allocated data by `base:allocation`: reads inside it are
    /// answered with one data chunk without asking again. Only this connection's TRIM and
    /// WRITE_ZEROES clear it; if another client punches a hole meanwhile, the reply is still
    /// right (the zeroes are read and sent as data), merely not sparse.
    known_data: Mutex<Range<u64>>,
    /// Which of the last 64 cheap requests were slow (bit 0: the latest). A lone slow one
    /// is usually the host's noise (a preempted thread); several mean a waiting backend.
    slow_history: AtomicU64,
    /// Whether the connection is TCP, where every send and every wake-up of the reader
    /// costs a trip through the network stack (see [`HOLD_MAX_BYTES`], [`TCP_PIECE`]).
    tcp: bool,
    /// Whether a lone READ reply to a client that seemed asleep is sent head first (see
    /// [`Session::flush_batch`]), and from the file when the backend splices (see
    /// [`Session::send_lone_read`]): on plain sockets other than TCP.
    head_first: bool,
}

struct InFlight {
    count: Mutex<usize>,
    changed: Condvar,
}

impl InFlight {
    fn start_one(&self) -> usize {
        let mut count = lock(&self.count);
        *count += 1;
        *count
    }

    fn finish_one(&self) {
        let mut count = lock(&self.count);
        *count = count.saturating_sub(1);
        // Only the reader waits, and only for a free slot or for everything to finish.
        self.changed.notify_all();
    }

    fn idle(&self) -> bool {
        *lock(&self.count) == 0
    }

    fn is_below(&self, limit: usize) -> bool {
        *lock(&self.count) < limit
    }

    fn wait_below(&self, limit: usize) {
        let mut count = lock(&self.count);
        while *count >= limit {
            count = self.changed.wait(count).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Requests whose service is normally a short memory copy or a metadata lookup. The others
/// may wait for the disk (or are rare) and always go to the pool; so do large reads, which
/// gain from copying on one thread while another sends. Except spliced reads: no copy at
/// all, and several threads would only take turns at the socket.
fn is_cheap(h: &RequestHeader, splicing: bool) -> bool {
    match h.command {
        proto::CMD_READ if h.length > INLINE_MAX => {
            splicing && h.length <= SPLICE_MAX_READ && h.flags & proto::CMD_FLAG_FUA == 0
        }
        proto::CMD_READ | proto::CMD_WRITE => h.flags & proto::CMD_FLAG_FUA == 0,
        proto::CMD_BLOCK_STATUS => true,
        _ => false,
    }
}

/// Whether serving a request of `len` bytes in `elapsed` means that the backend had to wait.
fn was_slow(elapsed: Duration, len: u64) -> bool {
    elapsed > SLOW_BASE + Duration::from_nanos(len / SLOW_BYTES_PER_NS)
}

/// Serve requests on `stream` until the client disconnects, breaks the protocol, or the
/// socket is shut down from outside. Returns when every request has been answered.
pub(crate) fn run(
    id: u64,
    export: Arc<Export>,
    stream: Box<dyn Stream>,
    mode: Mode,
    contexts: Vec<usize>,
    max_in_flight: usize,
) {
    if let Some(on_serve) = &export.config.on_serve {
        on_serve();
    }
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("NBD client {id}: cannot duplicate the socket for replies: {e}");
            return;
        }
    };
    let size = export.backend.size();
    let plain = writer.plain_socket().is_some();
    let splicing = export.backend.can_splice() && plain;
    let tcp = match writer.plain_socket() {
        Some(socket) if is_tcp(socket) => {
            if let Err(e) = limit_unsent(socket) {
                debug!("NBD client {id}: cannot limit unsent bytes: {e}");
            }
            true
        }
        _ => false,
    };
    let session = Arc::new(Session {
        id,
        export,
        mode,
        contexts,
        size,
        writer: Mutex::new(writer),
        broken: AtomicBool::new(false),
        buffers: Mutex::new(Vec::new()),
        max_kept_buffers: max_in_flight + 2,
        splicing: AtomicBool::new(splicing),
        splice_in_refused: AtomicBool::new(false),
        receive_refused: AtomicBool::new(false),
        pipes: Mutex::new(Vec::new()),
        known_data: Mutex::new(0..0),
        slow_history: AtomicU64::new(0),
        tcp,
        head_first: plain && !tcp,
    });
    let in_flight = Arc::new(InFlight {
        count: Mutex::new(0),
        changed: Condvar::new(),
    });
    let (sender, receiver) = mpsc::sync_channel::<Request>(max_in_flight);
    let receiver = Arc::new(Mutex::new(receiver));
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let stream = RequestStream {
        stream,
        dont_wait: false,
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
    let mut batch = Batch::with_capacity(BATCH_FLUSH + BATCH_COPY_MAX);
    // Serve cheap requests on this thread (see the module comment).
    let mut inline = true;
    let poll_max = session.export.config.poll_max;
    let mut poll = (!poll_max.is_zero()).then(|| PollWindow::new(poll_max));
    let mut after_large_payload = false;
    // When the reply batch began to wait for requests queued behind it.
    let mut held_since: Option<Instant> = None;
    // While the requests read are small WRITEs, the next are looked at on the socket first,
    // so that their payloads can go straight to the backend (see `receive_queued_writes`).
    let mut peek_for_writes = false;
    let mut peek = Peek::default();
    // Requests to read the ordinary way before peeking again, after the backend took none
    // of a run: each peek copies what is queued, in vain while it cannot take them.
    let mut peek_backoff = 0u32;

    loop {
        // Reading may block: the client must have every reply it can get first.
        if batch.is_empty() {
            held_since = None;
        } else if !in_flight.is_below(max_in_flight) {
            session.flush_batch(&mut batch);
            held_since = None;
        } else if reader.buffer().is_empty() {
            let hold = session.tcp
                && inline
                && batch.len() <= HOLD_MAX_BYTES
                && !after_large_payload
                && held_since.is_none_or(|since| since.elapsed() < HOLD_MAX_WAIT)
                && match reader.get_ref().stream.plain_socket() {
                    Some(socket) if peek_for_writes => {
                        peek.fill(socket, false) > 0
                            && session.starts_with_whole_request(peek.bytes())
                    }
                    _ => {
                        read_queued(&mut reader)
                            && session.starts_with_whole_request(reader.buffer())
                    }
                };
            if hold {
                held_since.get_or_insert_with(Instant::now);
            } else {
                session.flush_batch(&mut batch);
                held_since = None;
            }
        }
        in_flight.wait_below(max_in_flight);
        let waiting_since = Instant::now();
        if let (Some(poll), Some(socket)) = (poll.as_mut(), reader.get_ref().stream.plain_socket())
        {
            if reader.buffer().is_empty() {
                // An error here shows again on the read below.
                let _ = poll.wait_readable(socket);
            }
        }
        // Also while the pool serves the rest: the backend takes only what it can without
        // waiting (a file, pages in the page cache), and a slow write path is what it spares.
        if peek_for_writes && reader.buffer().is_empty() {
            if let Some(socket) = reader.get_ref().stream.plain_socket() {
                if peek.is_empty() {
                    peek.fill(socket, true);
                }
                let run = session.queued_writes(peek.bytes());
                if !run.is_empty() {
                    peek.clear();
                    match session.receive_queued_writes(socket, &run, &mut batch) {
                        Ok(true) if session.broken.load(Ordering::SeqCst) => break,
                        Ok(true) => continue,
                        Ok(false) => peek_backoff = PEEK_BACKOFF,
                        Err(e) => {
                            debug!("NBD client {id}: connection lost inside a WRITE: {e}");
                            break;
                        }
                    }
                }
            }
        }
        peek.clear();
        // The payload bytes at the start of the reader's buffer, if served from there.
        let mut buffered = 0;
        let exact = peek_for_writes;
        let mut request =
            match session.read_request(&mut reader, &mut after_large_payload, inline, exact) {
                Ok(Some(Incoming::Whole(r))) => r,
                Ok(Some(Incoming::Buffered(header))) => {
                    buffered = header.length as usize;
                    Request {
                        header,
                        payload: Vec::new(),
                    }
                }
                Ok(Some(Incoming::LargeWrite(header))) => {
                    peek_for_writes = false;
                    match session.stream_write(&mut reader, &header, Sink::Batch(&mut batch)) {
                        Ok(busy) => session.note_service(busy, header.length),
                        Err(e) => {
                            debug!("NBD client {id}: connection lost inside a WRITE payload: {e}");
                            break;
                        }
                    }
                    after_large_payload = true;
                    continue;
                }
                Ok(None) => break,
                Err(e) => {
                    if !session.broken.load(Ordering::SeqCst) {
                        match e.kind() {
                            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => {
                                debug!("NBD client {id}: connection closed: {e}")
                            }
                            _ => warn!("NBD client {id}: disconnecting: {e}"),
                        }
                    }
                    break;
                }
            };
        peek_backoff = peek_backoff.saturating_sub(1);
        peek_for_writes = plain && peek_backoff == 0 && session.is_queued_write(&request.header);
        let cheap = is_cheap(&request.header, session.splicing.load(Ordering::Relaxed));
        if cheap {
            let slow = session.slow_history.load(Ordering::Relaxed).count_ones();
            if inline && slow >= SLOW_TO_POOL {
                debug!("NBD client {id}: backend is slow, serving from the pool");
                inline = false;
                // Come back only after a run of quick requests.
                session.slow_history.store(u64::MAX, Ordering::Relaxed);
            } else if !inline && slow <= SLOW_TO_INLINE {
                debug!("NBD client {id}: backend is quick again, serving inline");
                inline = true;
            }
        }
        // Alone (nothing running, nothing more queued), a request gains nothing from a
        // hand-off.
        // A payload read exactly, past the buffer, may have more requests behind it, unseen.
        let unseen = exact && !request.payload.is_empty();
        let alone = !unseen && reader.buffer().len() == buffered && in_flight.idle();
        batch.client_asleep = alone && waiting_since.elapsed() >= CLIENT_ASLEEP;
        if alone || (inline && cheap) {
            if !cheap {
                // It may wait for the disk: earlier replies must not wait with it.
                session.flush_batch(&mut batch);
            }
            let len = request.header.length;
            let busy = if buffered > 0 {
                let payload = &reader.buffer()[..buffered];
                let busy = session.serve(request.header, payload, Sink::Batch(&mut batch));
                reader.consume(buffered);
                busy
            } else {
                session.handle(request, Sink::Batch(&mut batch))
            };
            if cheap {
                session.note_service(busy, len);
            }
        } else {
            if buffered > 0 {
                // Another thread serves it: it needs a copy.
                let mut payload = session.take_buffer(buffered);
                payload.copy_from_slice(&reader.buffer()[..buffered]);
                reader.consume(buffered);
                request.payload = payload;
            }
            if in_flight.start_one() > workers.len() {
                match spawn_worker(&session, &receiver, &in_flight, workers.len()) {
                    Ok(w) => workers.push(w),
                    Err(e) if workers.is_empty() => {
                        warn!("NBD client {id}: cannot start a worker thread: {e}");
                        in_flight.finish_one();
                        session.handle(request, Sink::Batch(&mut batch));
                        continue;
                    }
                    Err(e) => debug!("NBD client {id}: cannot start another worker: {e}"),
                }
            }
            if let Err(mpsc::SendError(request)) = sender.send(request) {
                in_flight.finish_one();
                session.handle(request, Sink::Batch(&mut batch));
            }
        }
        if session.broken.load(Ordering::SeqCst) {
            break;
        }
    }
    session.flush_batch(&mut batch);
    drop(sender);
    for worker in workers {
        let _ = worker.join();
    }
    let _ = lock(&session.writer).shutdown();
    debug!("NBD client {id}: connection finished");
}

fn spawn_worker(
    session: &Arc<Session>,
    receiver: &Arc<Mutex<Receiver<Request>>>,
    in_flight: &Arc<InFlight>,
    n: usize,
) -> io::Result<JoinHandle<()>> {
    let session = Arc::clone(session);
    let receiver = Arc::clone(receiver);
    let in_flight = Arc::clone(in_flight);
    std::thread::Builder::new()
        .name(format!("nbd-{}-w{n}", session.id))
        .spawn(move || {
            if let Some(on_serve) = &session.export.config.on_serve {
                on_serve();
            }
            loop {
                let next = lock(&receiver).recv();
                let Ok(request) = next else {
                    return;
                };
                let cheap = is_cheap(&request.header, session.splicing.load(Ordering::Relaxed));
                let len = request.header.length;
                let busy = session.handle(request, Sink::Socket);
                if cheap {
                    session.note_service(busy, len);
                }
                in_flight.finish_one();
            }
        })
}

/// The outcome of a WRITE written piece by piece: the first error stops the writing (the
/// rest of the payload is still read), and the time spent in the backend.
struct Written {
    result: io::Result<()>,
    busy: Duration,
}

impl Written {
    fn write(&mut self, backend: &dyn crate::ExportBackend, piece: &[u8], offset: u64) {
        if self.result.is_ok() {
            let start = Instant::now();
            self.result = backend.write_at(piece, offset, false);
            self.busy += start.elapsed();
        }
    }
}

fn left_inside_write(done: usize, len: usize) -> io::Error {
    io::Error::new(
        ErrorKind::UnexpectedEof,
        format!("the client left {done} bytes into a {len}-byte WRITE"),
    )
}

/// Fills `buf` with what `reader` holds, then straight from the socket: the tail of a large
/// payload must not be read ahead into the buffer along with the next request.
fn read_unbuffered(reader: &mut Reader, buf: &mut [u8]) -> io::Result<()> {
    let held = take_held(reader, buf);
    match reader.get_ref().stream.plain_socket() {
        Some(socket) => recv_all(socket, &mut buf[held..]),
        None => reader.get_mut().read_exact(&mut buf[held..]),
    }
}

/// The connection's receiving side, whose reads either wait for data or, while
/// `dont_wait` is set, take only what is already queued (failing with `WouldBlock`).
struct RequestStream {
    stream: Box<dyn Stream>,
    dont_wait: bool,
}

impl Read for RequestStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.dont_wait {
            return self.stream.read(buf);
        }
        // Without the socket itself (TLS), nothing can be read without waiting.
        match self.stream.plain_socket() {
            Some(socket) => recv_some(socket, buf, libc::MSG_DONTWAIT),
            None => Err(ErrorKind::WouldBlock.into()),
        }
    }
}

type Reader = BufReader<RequestStream>;

/// Fills `reader`'s empty buffer with what the socket already holds, without waiting.
/// Whether anything came (an error or the end of the stream shows again on the next read).
fn read_queued(reader: &mut Reader) -> bool {
    reader.get_mut().dont_wait = true;
    let got = matches!(reader.fill_buf(), Ok(b) if !b.is_empty());
    reader.get_mut().dont_wait = false;
    got
}

/// A copy of the bytes queued on the socket, taken with `MSG_PEEK`, which leaves them
/// there: the headers of the WRITEs among them say where their payloads go before the
/// payloads are received (see [`Session::receive_queued_writes`]). Always a prefix of
/// what the socket holds, since only the reader takes bytes from it.
#[derive(Default)]
struct Peek {
    /// Allocated at the first peek: most connections never peek.
    buf: Vec<u8>,
    len: usize,
}

impl Peek {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Copy what the socket holds (waiting for something if `wait`); how much is held now
    /// (0 also at the end of the stream or on an error, which show again on the next read).
    fn fill(&mut self, socket: BorrowedFd<'_>, wait: bool) -> usize {
        let flags = libc::MSG_PEEK | if wait { 0 } else { libc::MSG_DONTWAIT };
        if self.buf.is_empty() {
            self.buf = vec![0; READ_BUFFER];
        }
        self.len = loop {
            match recv_some(socket, &mut self.buf, flags) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                result => break result.unwrap_or(0),
            }
        };
        self.len
    }
}

/// One recv(2) into `buf` with `flags`: the bytes received (0 at the end of the stream).
fn recv_some(socket: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: receives into `buf`, which is valid for writes of its length.
    unsafe { splice::recv_with(socket, buf.as_mut_ptr(), buf.len(), flags) }
}

/// The most a TCP connection queues beyond what it may send (`TCP_NOTSENT_LOWAT`).
pub const TCP_UNSENT_MAX: libc::c_int = 32 * 1024;

/// Keep the bytes waiting for the client's window few. Whatever waits is sent by the CPU
/// that handles the client's next ACK, not by the replying thread. Over loopback each CPU
/// delivers what it sends through its own queue, so two senders reorder the stream. The
/// client then answers with duplicate ACKs and the server retransmits: about a thousand
/// segments a second in 1M reads, which ran at 0.75x nbdkit. With this limit almost none
/// are.
fn limit_unsent(socket: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&TCP_UNSENT_MAX as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `socket` is a TCP connection.
fn is_tcp(socket: BorrowedFd<'_>) -> bool {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `domain` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && (domain == libc::AF_INET || domain == libc::AF_INET6)
}

/// Moves what `reader` already holds (at most `buf.len()` bytes) to the start of `buf`.
fn take_held(reader: &mut Reader, buf: &mut [u8]) -> usize {
    let held = reader.buffer().len().min(buf.len());
    buf[..held].copy_from_slice(&reader.buffer()[..held]);
    reader.consume(held);
    held
}

/// Fills `buf` from `socket` with MSG_WAITALL: one system call for a whole payload instead
/// of one per socket buffer's worth (measured: 2-6% less CPU time per MiB written).
fn recv_all(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match recv_some(socket, &mut buf[done..], libc::MSG_WAITALL) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed inside a request payload",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_exact_or_eof(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "truncated request header",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg)
}

impl Session {
    /// Record how long a cheap request kept the backend busy (see `slow_history`).
    fn note_service(&self, busy: Duration, len: u64) {
        if busy >= VERY_SLOW + Duration::from_nanos(len / SLOW_BYTES_PER_NS) {
            self.slow_history.store(u64::MAX, Ordering::Relaxed);
            return;
        }
        let slow = u64::from(was_slow(busy, len));
        let _ = self
            .slow_history
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h << 1 | slow)
            });
    }

    fn extended(&self) -> bool {
        self.mode == Mode::Extended
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = lock(&self.buffers).pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give_buffer(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > MAX_KEPT_BUFFER {
            return;
        }
        let mut buffers = lock(&self.buffers);
        if buffers.len() < self.max_kept_buffers {
            buffers.push(buf);
        }
    }

    /// Next request with its payload; `None` on a clean end (EOF between requests, DISC).
    /// After a large payload (`after_large_payload`, updated here) the header is read on its
    /// own: read-ahead would mostly catch the next large payload, which then costs a second
    /// copy out of the buffer. With `stream_writes` (the reader serves cheap requests
    /// itself), a large valid WRITE is returned with its payload still to be read. With
    /// `exact`, a request that the buffer holds only the start of is finished without
    /// reading ahead, so that the requests after it are left on the socket (see
    /// [`Peek`]).
    fn read_request(
        &self,
        reader: &mut Reader,
        after_large_payload: &mut bool,
        stream_writes: bool,
        exact: bool,
    ) -> io::Result<Option<Incoming>> {
        let held = reader.buffer().len();
        let unbuffered = std::mem::take(after_large_payload) && held == 0;
        let mut b = [0u8; proto::EXTENDED_REQUEST_SIZE];
        let b = &mut b[..self.header_size()];
        let got = if unbuffered {
            read_exact_or_eof(reader.get_mut(), b)?
        } else if exact && held > 0 && held < b.len() {
            read_unbuffered(reader, b)?;
            true
        } else {
            read_exact_or_eof(reader, b)?
        };
        if !got {
            return Ok(None);
        }
        let Some(header) = self.decode_header(b) else {
            return Err(self.refuse_bad_magic(b));
        };
        if header.command == proto::CMD_DISC {
            debug!("NBD client {}: disconnect requested", self.id);
            return Ok(None);
        }
        if !self.has_payload(&header) {
            return Ok(Some(Incoming::Whole(Request {
                header,
                payload: Vec::new(),
            })));
        }
        if header.length > u64::from(proto::MAX_PAYLOAD) {
            // The stream cannot be trusted to stay in sync: say why, then hang up.
            let msg = format!(
                "len ({}) is larger than max len ({})",
                header.length,
                proto::MAX_PAYLOAD
            );
            self.send_error(Sink::Socket, &header, proto::EINVAL, &msg);
            return Err(invalid(msg));
        }
        // Only onto a plain file range: a format driver would allocate (and fill) a cluster
        // for the first piece and rewrite it for the next.
        if stream_writes
            && self.export.backend.can_splice()
            && header.command == proto::CMD_WRITE
            && header.flags & proto::CMD_FLAG_FUA == 0
            && header.length >= STREAM_MIN
            && self.validate(&header).is_ok()
        {
            return Ok(Some(Incoming::LargeWrite(header)));
        }
        if header.command == proto::CMD_WRITE && reader.buffer().len() as u64 >= header.length {
            return Ok(Some(Incoming::Buffered(header)));
        }
        let mut payload = self.take_buffer(header.length as usize);
        if payload.len() >= READ_BUFFER {
            read_unbuffered(reader, &mut payload)?;
            *after_large_payload = true;
        } else if exact {
            read_unbuffered(reader, &mut payload)?;
        } else {
            reader.read_exact(&mut payload)?;
        }
        Ok(Some(Incoming::Whole(Request { header, payload })))
    }

    /// Answer a request header with the wrong magic as QEMU does, with EINVAL under the
    /// cookie its bytes carry (the client may be waiting on it); the connection is lost.
    fn refuse_bad_magic(&self, b: &[u8]) -> io::Error {
        let be_u32 = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let be_u64 = |at: usize| (u64::from(be_u32(at)) << 32) | u64::from(be_u32(at + 4));
        let expected = if self.extended() {
            proto::EXTENDED_REQUEST_MAGIC
        } else {
            proto::REQUEST_MAGIC
        };
        let msg = format!(
            "invalid magic (got {:#x}, expected {expected:#x})",
            be_u32(0)
        );
        let h = RequestHeader {
            flags: 0,
            command: proto::CMD_READ,
            cookie: be_u64(8),
            offset: be_u64(16),
            length: 0,
        };
        self.send_error(Sink::Socket, &h, proto::EINVAL, &msg);
        invalid(msg)
    }

    /// Bytes in this connection's request headers.
    fn header_size(&self) -> usize {
        if self.extended() {
            proto::EXTENDED_REQUEST_SIZE
        } else {
            proto::REQUEST_SIZE
        }
    }

    /// The request header at the start of `b`, if whole and valid.
    fn decode_header(&self, b: &[u8]) -> Option<RequestHeader> {
        let b = b.get(..self.header_size())?;
        if self.extended() {
            RequestHeader::decode_extended(b.try_into().ok()?)
        } else {
            RequestHeader::decode_compact(b.try_into().ok()?)
        }
    }

    fn has_payload(&self, h: &RequestHeader) -> bool {
        h.command == proto::CMD_WRITE
            || (self.extended() && h.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0)
    }

    /// Whether `b` starts with a whole request, payload included, so that reading it cannot
    /// wait for the client.
    fn starts_with_whole_request(&self, b: &[u8]) -> bool {
        self.decode_header(b).is_some_and(|h| {
            !self.has_payload(&h) || (b.len() - self.header_size()) as u64 >= h.length
        })
    }

    /// Serve a large, valid WRITE while its payload arrives: every piece read goes to the
    /// backend at once, so the client refills the socket while the backend copies, and the
    /// piece is still in the CPU's cache when it is copied again. Measured against reading
    /// the whole payload first, this costs about a quarter less CPU time per MiB and moves
    /// more MiB/s. Where the backend takes them, the pieces go from the socket straight into
    /// its storage ([`crate::ExportBackend::receive_writes`]), or else are spliced from the
    /// socket into the file, copied only by the kernel's page-cache write (measured over TCP
    /// at 1 MiB QD8: 23-40% more MiB per CPU-second than copying). The price: when the
    /// client vanishes halfway, what had arrived has landed (a torn write, as on a disk
    /// losing power; the write was never acknowledged). A failed piece does not stop the
    /// reading: the stream must stay in step, and the reply carries the error. Returns how
    /// long the backend was busy.
    fn stream_write(
        &self,
        reader: &mut Reader,
        h: &RequestHeader,
        sink: Sink<'_>,
    ) -> io::Result<Duration> {
        let len = h.length as usize;
        let mut buf = self.take_buffer(len.min(MAX_KEPT_BUFFER));
        // Any pipe will do: each piece is at most what it holds.
        let mut pipe = if self.splice_in_refused.load(Ordering::Relaxed) {
            None
        } else {
            self.take_pipe(0)
        };
        let mut done = 0;
        let mut offering = true;
        let mut written = Written {
            result: Ok(()),
            busy: Duration::ZERO,
        };
        while done < len {
            let offset = h.offset + done as u64;
            let want = len - done;
            let piece = want.min(buf.len());
            let socket = reader.get_ref().stream.plain_socket();
            let n = if !reader.buffer().is_empty() {
                let n = take_held(reader, &mut buf[..piece]);
                written.write(&*self.export.backend, &buf[..n], offset);
                n
            } else if let Some(n) =
                self.receive_in_place(socket, offset, want, &written, &mut offering)
            {
                if n == 0 {
                    return Err(left_inside_write(done, len));
                }
                n
            } else if let (Some(p), Some(socket), true) = (&pipe, socket, written.result.is_ok()) {
                let n = splice::socket_to_pipe(socket, p.write_end(), want.min(p.capacity()))?;
                if n == 0 {
                    return Err(left_inside_write(done, len));
                }
                let start = Instant::now();
                let spliced = self.export.backend.splice_in(p.read_end(), offset, n);
                written.busy += start.elapsed();
                match spliced {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Unsupported => {
                        // The backend looks at what it writes: copy from now on.
                        self.splice_in_refused.store(true, Ordering::Relaxed);
                        splice::drain_pipe(p.read_end(), &mut buf[..n])?;
                        written.write(&*self.export.backend, &buf[..n], offset);
                        if let Some(p) = pipe.take() {
                            self.give_pipe(p);
                        }
                    }
                    Err(e) => {
                        // What is left in the pipe is lost with it; the rest of the payload
                        // is read and dropped.
                        written.result = Err(e);
                        pipe = None;
                    }
                }
                n
            } else {
                let read = match socket {
                    Some(socket) if self.tcp => {
                        recv_some(socket, &mut buf[..want.min(TCP_PIECE)], libc::MSG_WAITALL)
                    }
                    _ => reader.get_mut().read(&mut buf[..piece]),
                };
                let n = match read {
                    Ok(0) => return Err(left_inside_write(done, len)),
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                written.write(&*self.export.backend, &buf[..n], offset);
                n
            };
            done += n;
        }
        self.give_buffer(buf);
        if let Some(p) = pipe {
            self.give_pipe(p);
        }
        self.reply_to_command(sink, h, written.result);
        Ok(written.busy)
    }

    /// Let the backend take the next bytes of a WRITE payload from the socket itself, if it
    /// can (see [`crate::ExportBackend::receive_writes`]); `None`: they go by another path,
    /// as the rest of this payload does once the backend has refused a piece of it
    /// (`offering` is cleared), so that it is not asked again for every piece. Not counted
    /// as the backend's busy time, which would include waiting for the client.
    fn receive_in_place(
        &self,
        socket: Option<BorrowedFd<'_>>,
        offset: u64,
        want: usize,
        written: &Written,
        offering: &mut bool,
    ) -> Option<usize> {
        let socket = socket?;
        if !*offering || written.result.is_err() || self.receive_refused.load(Ordering::Relaxed) {
            return None;
        }
        let payload = QueuedWrite::payload_only(offset, want);
        match self
            .export
            .backend
            .receive_writes(socket, &[payload], self.tcp)
        {
            Ok(n) => Some(n),
            Err(e) => {
                if e.kind() == ErrorKind::Unsupported {
                    self.receive_refused.store(true, Ordering::Relaxed);
                }
                *offering = false;
                None
            }
        }
    }

    /// Whether a WRITE can be received straight into the backend among others queued
    /// behind it (see [`Session::receive_queued_writes`]).
    fn is_queued_write(&self, h: &RequestHeader) -> bool {
        h.command == proto::CMD_WRITE
            && h.flags & proto::CMD_FLAG_FUA == 0
            && h.length > 0
            && h.length <= QUEUED_WRITE_MAX
            && self.export.backend.can_splice()
            && !self.receive_refused.load(Ordering::Relaxed)
            && self.validate(h).is_ok()
    }

    /// The WRITEs at the start of `queued` that are there whole and can be received
    /// straight into the backend, up to the first request that cannot. One still arriving
    /// is left to the ordinary path, which reads it whole before it writes: received in
    /// place, it would be torn if the client went away halfway.
    fn queued_writes(&self, mut queued: &[u8]) -> Vec<(RequestHeader, QueuedWrite)> {
        let header = self.header_size();
        let mut run = Vec::new();
        while run.len() < QUEUED_WRITES_MAX {
            let Some(h) = self.decode_header(queued) else {
                break;
            };
            // Checked first: it bounds the length.
            if !self.is_queued_write(&h) {
                break;
            }
            let whole = header + h.length as usize;
            if queued.len() < whole {
                break;
            }
            let write = QueuedWrite {
                header,
                offset: h.offset,
                len: h.length as usize,
            };
            run.push((h, write));
            queued = &queued[whole..];
        }
        run
    }

    /// Receive a run of small WRITEs queued on the socket (`run`, from
    /// [`Session::queued_writes`]) with one call into the backend, which puts each payload
    /// in place as it leaves the socket: on a file, straight into its page cache, sparing a
    /// copy into the reader's buffer and the filesystem's write path for each of them.
    /// Replies go into `batch`. Returns false when the backend took nothing (the requests
    /// are still on the socket, for the ordinary path). A payload the backend took only the
    /// start of is finished here with an ordinary write. Errors: the connection is lost.
    fn receive_queued_writes(
        &self,
        socket: BorrowedFd<'_>,
        run: &[(RequestHeader, QueuedWrite)],
        batch: &mut Batch,
    ) -> io::Result<bool> {
        let writes: Vec<QueuedWrite> = run.iter().map(|(_, w)| *w).collect();
        let start = Instant::now();
        // Everything is already queued: waiting for all of it costs nothing.
        let taken = match self.export.backend.receive_writes(socket, &writes, true) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(taken) => taken,
            Err(e) => {
                if e.kind() == ErrorKind::Unsupported {
                    self.receive_refused.store(true, Ordering::Relaxed);
                }
                return Ok(false);
            }
        };
        let busy = start.elapsed();
        let mut at = 0;
        let mut served = 0;
        for (h, w) in run {
            let end = at + w.header + w.len;
            served += 1;
            if taken < end {
                self.finish_queued_write(socket, h, w, taken - at, batch)?;
                break;
            }
            self.reply_to_command(Sink::Batch(batch), h, Ok(()));
            at = end;
        }
        // Each WRITE taken counts as one request of the average share.
        for _ in 0..served {
            self.note_service(busy / served, (taken / served as usize) as u64);
        }
        Ok(true)
    }

    /// Take the rest of a WRITE whose first `done` bytes (header included) the backend
    /// took, write what is left of its payload the ordinary way and reply.
    fn finish_queued_write(
        &self,
        socket: BorrowedFd<'_>,
        h: &RequestHeader,
        w: &QueuedWrite,
        done: usize,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let mut header = [0u8; proto::EXTENDED_REQUEST_SIZE];
        recv_all(socket, &mut header[..w.header.saturating_sub(done)])?;
        let landed = done.saturating_sub(w.header);
        let mut rest = self.take_buffer(w.len - landed);
        recv_all(socket, &mut rest)?;
        let result = self
            .export
            .backend
            .write_at(&rest, h.offset + landed as u64, false);
        self.give_buffer(rest);
        self.reply_to_command(Sink::Batch(batch), h, result);
        Ok(())
    }

    /// A pipe with room for `len` bytes, if payloads are spliced on this connection.
    fn take_pipe(&self, len: usize) -> Option<Pipe> {
        if !self.splicing.load(Ordering::Relaxed) {
            return None;
        }
        let pipe = match lock(&self.pipes).pop() {
            Some(pipe) => pipe,
            None => match Pipe::new() {
                Ok(pipe) => pipe,
                Err(e) => {
                    debug!("NBD client {}: copying payloads, no pipe: {e}", self.id);
                    self.splicing.store(false, Ordering::Relaxed);
                    return None;
                }
            },
        };
        if pipe.capacity() < len {
            self.give_pipe(pipe);
            return None;
        }
        Some(pipe)
    }

    /// Keep an empty pipe for later. Only two: spliced reads and writes are served on the
    /// reader thread one after another, and every pipe kept counts against the user's pipe
    /// quota, which all connections share.
    fn give_pipe(&self, pipe: Pipe) {
        let mut pipes = lock(&self.pipes);
        if pipes.len() < 2 {
            pipes.push(pipe);
        }
    }

    /// Serve one request and send its reply; returns the time spent in the backend.
    fn handle(&self, request: Request, sink: Sink<'_>) -> Duration {
        let busy = self.serve(request.header, &request.payload, sink);
        self.give_buffer(request.payload);
        busy
    }

    /// Serve one request whose payload (if any) is `payload`; returns the time spent in
    /// the backend.
    fn serve(&self, mut h: RequestHeader, payload: &[u8], sink: Sink<'_>) -> Duration {
        let mut contexts = None;
        let with_payload = self.extended() && h.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0;
        if with_payload && !matches!(h.command, proto::CMD_WRITE | proto::CMD_BLOCK_STATUS) {
            // The payload was read and is ignored: the flag alone fails the request, whatever
            // the length said (QEMU).
            h.length = 0;
        }
        if h.command == proto::CMD_BLOCK_STATUS && with_payload {
            match self.status_payload(payload) {
                Ok((effect_length, subset)) => {
                    h.length = effect_length;
                    h.flags &= !proto::CMD_FLAG_PAYLOAD_LEN;
                    contexts = Some(subset);
                }
                Err(msg) => {
                    self.send_error(sink, &h, proto::EINVAL, &msg);
                    return Duration::ZERO;
                }
            }
        }
        match self.validate(&h) {
            Err((errno, msg)) => {
                debug!(
                    "NBD client {}: {} request refused: {msg}",
                    self.id,
                    proto::command_name(h.command)
                );
                self.send_error(sink, &h, errno, &msg);
                Duration::ZERO
            }
            Ok(()) => match h.command {
                proto::CMD_READ => self.read(sink, &h),
                proto::CMD_BLOCK_STATUS => {
                    self.block_status(sink, &h, contexts.as_deref().unwrap_or(&self.contexts))
                }
                _ => {
                    let start = Instant::now();
                    let result = self.execute(&h, payload);
                    let busy = start.elapsed();
                    self.reply_to_command(sink, &h, result);
                    busy
                }
            },
        }
    }

    fn reply_to_command(&self, sink: Sink<'_>, h: &RequestHeader, result: io::Result<()>) {
        match result {
            Ok(()) => self.send_done(sink, h),
            Err(e) => {
                let mut errno = proto::errno_of(&e);
                if errno == proto::ENOTSUP && h.flags & proto::CMD_FLAG_FAST_ZERO == 0 {
                    // ENOTSUP is reserved for refused fast zeroing.
                    errno = proto::EIO;
                }
                let msg = format!(
                    "{} of export '{}' failed: {e}",
                    proto::command_name(h.command),
                    self.export.config.name
                );
                debug!("NBD client {}: {msg}", self.id);
                self.send_error(sink, h, errno, &msg);
            }
        }
    }

    /// Decode a BLOCK_STATUS payload (extended headers): effect length, then the selected
    /// contexts (by wire id) wanted in the reply. Each must be selected and named once
    /// (as QEMU checks); the error is logged here and answered with QEMU's one text.
    fn status_payload(&self, payload: &[u8]) -> Result<(u64, Vec<usize>), String> {
        let decoded = (|| {
            let mut c = proto::Cursor::new(payload);
            let effect_length = c
                .u64()
                .ok_or_else(|| "shorter than its effect length".to_string())?;
            let mut wanted = Vec::new();
            while let Some(id) = c.u32() {
                let index = self
                    .contexts
                    .iter()
                    .copied()
                    .find(|&i| self.export.context_id(i) == Some(id))
                    .ok_or_else(|| format!("context id {id} is not selected"))?;
                if wanted.contains(&index) {
                    return Err(format!("context id {id} is named twice"));
                }
                wanted.push(index);
            }
            if !c.remaining().is_empty() || wanted.is_empty() {
                return Err(format!("{} bytes is not a valid length", payload.len()));
            }
            // Replies go in the selection's order, whatever the payload's.
            wanted.sort_unstable();
            Ok((effect_length, wanted))
        })();
        decoded.map_err(|why: String| {
            debug!("NBD client {}: block status payload: {why}", self.id);
            "CMD_BLOCK_STATUS payload not valid".to_string()
        })
    }

    /// Check a request in QEMU's order, so that a request with several faults gets QEMU's
    /// answer: length limit, read-only, bounds, flags, then what each command needs. The
    /// errnos are the spec's (EPERM read-only, ENOSPC writing past the end), where QEMU
    /// sends EINVAL for every refusal.
    fn validate(&self, h: &RequestHeader) -> Result<(), CommandError> {
        let name = proto::command_name(h.command);
        let (writes, limited) = match h.command {
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {
                (true, h.command == proto::CMD_WRITE)
            }
            proto::CMD_READ | proto::CMD_CACHE => (false, true),
            _ => (false, false),
        };
        if limited && h.length > u64::from(proto::MAX_PAYLOAD) {
            return Err((
                proto::EINVAL,
                format!(
                    "len ({}) is larger than max len ({})",
                    h.length,
                    proto::MAX_PAYLOAD
                ),
            ));
        }
        if writes && self.export.config.read_only {
            return Err((proto::EPERM, "Export is read-only".to_string()));
        }
        if h.offset > self.size || h.length > self.size - h.offset {
            let errno = if matches!(h.command, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES) {
                proto::ENOSPC
            } else {
                proto::EINVAL
            };
            return Err((
                errno,
                format!(
                    "operation past EOF; From: {}, Len: {}, Size: {}",
                    h.offset, h.length, self.size
                ),
            ));
        }
        let mut allowed = proto::CMD_FLAG_FUA;
        match h.command {
            proto::CMD_READ if self.mode != Mode::Simple => allowed |= proto::CMD_FLAG_DF,
            proto::CMD_WRITE if self.extended() => allowed |= proto::CMD_FLAG_PAYLOAD_LEN,
            proto::CMD_WRITE_ZEROES => {
                allowed |= proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
            }
            proto::CMD_BLOCK_STATUS => allowed |= proto::CMD_FLAG_REQ_ONE,
            _ => {}
        }
        if h.flags & !allowed != 0 {
            return Err((
                proto::EINVAL,
                format!("unsupported flags for command {name} (got {:#x})", h.flags),
            ));
        }
        match h.command {
            proto::CMD_BLOCK_STATUS if h.length == 0 => {
                Err((proto::EINVAL, "need non-zero length".to_string()))
            }
            proto::CMD_BLOCK_STATUS if self.contexts.is_empty() => {
                Err((proto::EINVAL, "CMD_BLOCK_STATUS not negotiated".to_string()))
            }
            proto::CMD_READ
            | proto::CMD_WRITE
            | proto::CMD_FLUSH
            | proto::CMD_TRIM
            | proto::CMD_CACHE
            | proto::CMD_WRITE_ZEROES
            | proto::CMD_BLOCK_STATUS => Ok(()),
            other => Err((
                proto::EINVAL,
                format!("invalid request type ({other}) received"),
            )),
        }
    }

    fn execute(&self, h: &RequestHeader, payload: &[u8]) -> io::Result<()> {
        let backend = &self.export.backend;
        let fua = h.flags & proto::CMD_FLAG_FUA != 0;
        match h.command {
            proto::CMD_WRITE => backend.write_at(payload, h.offset, fua),
            proto::CMD_FLUSH => backend.flush(),
            proto::CMD_TRIM => {
                let trimmed = backend.trim(h.offset, h.length);
                self.forget_data(h.offset, h.length);
                trimmed?;
                if fua {
                    backend.flush()?;
                }
                Ok(())
            }
            proto::CMD_WRITE_ZEROES => {
                let may_trim = h.flags & proto::CMD_FLAG_NO_HOLE == 0;
                let fast_only = h.flags & proto::CMD_FLAG_FAST_ZERO != 0;
                let zeroed = backend.write_zeroes(h.offset, h.length, may_trim, fast_only);
                self.forget_data(h.offset, h.length);
                zeroed?;
                if fua {
                    backend.flush()?;
                }
                Ok(())
            }
            proto::CMD_CACHE => backend.cache(h.offset, h.length),
            _ => Err(io::Error::new(
                ErrorKind::InvalidInput,
                "unexpected command",
            )),
        }
    }

    /// Send one reply (all its parts), never interleaved with other replies.
    fn send(&self, sink: Sink<'_>, parts: &[&[u8]]) {
        match sink {
            Sink::Socket => self.write_parts(&[], parts),
            Sink::Batch(batch) => {
                let len: usize = parts.iter().map(|p| p.len()).sum();
                if len <= BATCH_COPY_MAX {
                    for part in parts {
                        batch.push(part);
                    }
                    if batch.len() >= BATCH_FLUSH {
                        self.flush_batch(batch);
                    }
                } else {
                    self.write_parts(batch.bytes(), parts);
                    batch.clear();
                }
            }
        }
    }

    /// Write the replies gathered in `batch`. A lone READ reply to a client that seemed
    /// asleep (at QD1) goes out in two sends on a unix socket, the bytes before its data
    /// first: the first send wakes the client, and on a virtual machine that wake-up is an
    /// interrupt between CPUs that takes 10-20 us to land, while the second send copies the
    /// data. Over TCP every send is a trip through the network stack, and it gained nothing.
    fn flush_batch(&self, batch: &mut Batch) {
        if batch.is_empty() || self.broken.load(Ordering::SeqCst) {
            batch.clear();
            return;
        }
        let bytes = batch.bytes();
        let (first, rest) = match batch.lone_read_data {
            Some(at) => bytes.split_at(at),
            None => (bytes, &[][..]),
        };
        let mut writer = lock(&self.writer);
        if self.write_whole(&mut writer, [first]) {
            self.write_whole(&mut writer, [rest]);
        }
        batch.clear();
    }

    /// Write `head` then `parts`, whole and together, under the send lock.
    fn write_parts(&self, head: &[u8], parts: &[&[u8]]) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let all = std::iter::once(head).chain(parts.iter().copied());
        self.write_whole(&mut lock(&self.writer), all);
    }

    /// Write all of `parts` to `writer` (held under the send lock), gathered into as few
    /// writes as the socket takes. False if the connection broke.
    fn write_whole<'a>(
        &self,
        writer: &mut Box<dyn Stream>,
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> bool {
        let mut slices: Vec<IoSlice<'_>> = parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(IoSlice::new)
            .collect();
        let mut slices: &mut [IoSlice<'_>] = &mut slices;
        while !slices.is_empty() {
            match writer.write_vectored(slices) {
                Ok(0) => {
                    self.fail_send(writer, io::Error::from(ErrorKind::WriteZero));
                    return false;
                }
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail_send(writer, e);
                    return false;
                }
            }
        }
        true
    }

    fn fail_send(&self, writer: &mut Box<dyn Stream>, e: io::Error) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            debug!("NBD client {}: cannot send reply: {e}", self.id);
        }
        // Wake the reader so the connection winds down.
        let _ = writer.shutdown();
    }

    fn chunk(
        &self,
        flags: u16,
        chunk_type: u16,
        h: &RequestHeader,
        payload_len: u64,
    ) -> ([u8; 32], usize) {
        proto::chunk_header(
            self.extended(),
            flags,
            chunk_type,
            h.cookie,
            h.offset,
            payload_len,
        )
    }

    /// Successful reply without data.
    fn send_done(&self, sink: Sink<'_>, h: &RequestHeader) {
        if self.extended() {
            let (b, n) = self.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, h, 0);
            self.send(sink, &[&b[..n]]);
        } else {
            self.send(sink, &[&proto::simple_reply(0, h.cookie)]);
        }
    }

    fn send_error(&self, sink: Sink<'_>, h: &RequestHeader, errno: u32, message: &str) {
        if self.mode == Mode::Simple {
            self.send(sink, &[&proto::simple_reply(errno, h.cookie)]);
        } else {
            let payload = proto::error_payload(errno, message);
            let (b, n) = self.chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR,
                h,
                payload.len() as u64,
            );
            self.send(sink, &[&b[..n], &payload]);
        }
    }

    /// Serve a READ; returns the time spent in the backend.
    fn read(&self, sink: Sink<'_>, h: &RequestHeader) -> Duration {
        let start = Instant::now();
        let backend = &self.export.backend;
        if h.flags & proto::CMD_FLAG_FUA != 0 {
            // QEMU flushes before a FUA read; keep its behaviour.
            if let Err(e) = backend.flush() {
                let busy = start.elapsed();
                self.send_error(
                    sink,
                    h,
                    proto::errno_of(&e),
                    &format!("flush before read failed: {e}"),
                );
                return busy;
            }
        }
        let len = h.length as usize;
        if self.mode != Mode::Simple && len == 0 {
            let (b, n) = self.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, h, 0);
            self.send(sink, &[&b[..n]]);
            return start.elapsed();
        }
        let segments = if self.mode == Mode::Simple || h.flags & proto::CMD_FLAG_DF != 0 {
            None
        } else {
            self.zero_segments(h.offset, h.length)
        };
        if segments.is_none() && h.length >= SPLICE_MIN {
            if let Some(pipe) = self.take_pipe(len) {
                match backend.splice_out(pipe.write_end(), h.offset, len) {
                    Ok(()) => {
                        let busy = start.elapsed();
                        self.send_from_pipe(sink, h, pipe);
                        return busy;
                    }
                    // The copying path below reports the error if it is real.
                    Err(e) => debug!("NBD client {}: read not spliced: {e}", self.id),
                }
            }
        }
        let sink = match sink {
            Sink::Batch(batch) if segments.is_none() && len <= BATCH_COPY_MAX => {
                if self.head_first && batch.is_empty() && batch.client_asleep {
                    if let Some(busy) = self.send_lone_read(h, start) {
                        return busy;
                    }
                }
                return self.read_into_batch(batch, h, start);
            }
            sink => sink,
        };
        let mut buf = self.take_buffer(len);
        let result = match &segments {
            None => backend.read_at(&mut buf, h.offset),
            Some(segments) => segments.iter().filter(|s| !s.zero).try_for_each(|s| {
                backend.read_at(
                    &mut buf[s.start..s.start + s.len],
                    h.offset + s.start as u64,
                )
            }),
        };
        let busy = start.elapsed();
        match (result, segments) {
            (Err(e), _) => self.read_failed(sink, h, &e),
            (Ok(()), None) => {
                let (head, n) = self.data_reply_head(h);
                self.send(sink, &[&head[..n], &buf]);
            }
            (Ok(()), Some(segments)) => self.send_sparse(sink, h, &segments, &buf),
        }
        self.give_buffer(buf);
        busy
    }

    /// Serve a small READ of data straight into the reply batch, after its reply header:
    /// one copy less than reading into a buffer and appending that.
    fn read_into_batch(&self, batch: &mut Batch, h: &RequestHeader, start: Instant) -> Duration {
        let len = h.length as usize;
        let reply_at = batch.len();
        let (head, n) = self.data_reply_head(h);
        batch.push(&head[..n]);
        let data_at = batch.len();
        let result = self.export.backend.read_at(batch.grow(len), h.offset);
        let busy = start.elapsed();
        match result {
            Ok(()) if batch.len() >= BATCH_FLUSH => self.flush_batch(batch),
            Ok(()) => {
                if reply_at == 0 && batch.client_asleep && self.head_first {
                    batch.lone_read_data = Some(data_at);
                }
            }
            Err(e) => {
                batch.truncate(reply_at);
                self.read_failed(Sink::Batch(batch), h, &e);
            }
        }
        busy
    }

    /// Send a lone READ reply to a client that seemed asleep (see [`Session::flush_batch`])
    /// straight from the file: the bytes before the data first, which wake the client, then
    /// the data with sendfile(2). No copy through the server and one system call less than
    /// reading the data first (4k QD1 over a unix socket: about 10% more IOPS and 15% more
    /// reads per CPU-second on the test VM). Whatever the file did not send is read and
    /// sent; if that read fails, the reply cannot be finished or turned into an error, and
    /// the connection is closed.
    ///
    /// `None` (nothing sent) when the backend cannot send this range from its file now: it
    /// no longer splices, or the range is past its end (a node that follows a file which
    /// shrank). Then the read is served the usual way, and its error replied.
    fn send_lone_read(&self, h: &RequestHeader, start: Instant) -> Option<Duration> {
        let len = h.length as usize;
        let backend = &self.export.backend;
        if !backend.can_splice() || h.offset + h.length > backend.size() {
            return None;
        }
        let (head, n) = self.data_reply_head(h);
        let mut writer = lock(&self.writer);
        // The time spent on the backend, as for other reads: not the header's send.
        let mut busy = start.elapsed();
        if !self.write_whole(&mut writer, [&head[..n]]) {
            return Some(busy);
        }
        let reading = Instant::now();
        let sent = match writer.plain_socket() {
            Some(socket) => match backend.send_file(socket, h.offset, len) {
                Ok(sent) => sent.min(len),
                Err(e) => {
                    debug!("NBD client {}: read not sent from the file: {e}", self.id);
                    0
                }
            },
            None => 0,
        };
        if sent < len {
            let mut rest = self.take_buffer(len - sent);
            let result = backend.read_at(&mut rest, h.offset + sent as u64);
            busy += reading.elapsed();
            match result {
                Ok(()) => {
                    self.write_whole(&mut writer, [&rest[..]]);
                }
                Err(e) => {
                    warn!(
                        "NBD client {}: reading export '{}' failed after its reply began, \
                         closing the connection: {e}",
                        self.id, self.export.config.name
                    );
                    self.fail_send(&mut writer, e);
                }
            }
            self.give_buffer(rest);
            return Some(busy);
        }
        Some(busy + reading.elapsed())
    }

    /// What goes before a READ's data sent whole in one reply: the simple reply, or the
    /// final OFFSET_DATA chunk's header and offset.
    fn data_reply_head(&self, h: &RequestHeader) -> ([u8; 40], usize) {
        let mut head = [0u8; 40];
        if self.mode == Mode::Simple {
            head[..16].copy_from_slice(&proto::simple_reply(0, h.cookie));
            return (head, 16);
        }
        let (chunk, n) = self.chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            h,
            8 + h.length,
        );
        head[..n].copy_from_slice(&chunk[..n]);
        head[n..n + 8].copy_from_slice(&h.offset.to_be_bytes());
        (head, n + 8)
    }

    fn read_failed(&self, sink: Sink<'_>, h: &RequestHeader, e: &io::Error) {
        let msg = format!(
            "reading from export '{}' failed: {e}",
            self.export.config.name
        );
        debug!("NBD client {}: {msg}", self.id);
        self.send_error(sink, h, proto::errno_of(e), &msg);
    }

    /// Send a READ's data reply whose data waits in `pipe`.
    fn send_from_pipe(&self, sink: Sink<'_>, h: &RequestHeader, pipe: Pipe) {
        let len = h.length as usize;
        let (head, n) = self.data_reply_head(h);
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut writer = lock(&self.writer);
        let queued = match &sink {
            Sink::Batch(batch) => batch.bytes(),
            Sink::Socket => &[],
        };
        let sent = match writer.plain_socket() {
            Some(socket) => splice::send_more(socket, &[queued, &head[..n]])
                .and_then(|()| splice::pipe_to_socket(pipe.read_end(), socket, len)),
            None => Err(ErrorKind::Unsupported.into()),
        };
        if let Sink::Batch(batch) = sink {
            batch.clear();
        }
        match sent {
            Ok(()) => self.give_pipe(pipe),
            Err(e) => self.fail_send(&mut writer, e),
        }
    }

    fn send_sparse(&self, sink: Sink<'_>, h: &RequestHeader, segments: &[Segment], buf: &[u8]) {
        let mut heads: Vec<Vec<u8>> = Vec::with_capacity(segments.len());
        for (i, s) in segments.iter().enumerate() {
            let flags = if i + 1 == segments.len() {
                proto::REPLY_FLAG_DONE
            } else {
                0
            };
            let offset = h.offset + s.start as u64;
            let (chunk_type, payload_len) = if s.zero {
                (proto::REPLY_TYPE_OFFSET_HOLE, 12)
            } else {
                (proto::REPLY_TYPE_OFFSET_DATA, 8 + s.len as u64)
            };
            let (b, n) = self.chunk(flags, chunk_type, h, payload_len);
            let mut head = b[..n].to_vec();
            head.extend_from_slice(&offset.to_be_bytes());
            if s.zero {
                head.extend_from_slice(&(s.len as u32).to_be_bytes());
            }
            heads.push(head);
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(segments.len() * 2);
        for (s, head) in segments.iter().zip(&heads) {
            parts.push(head);
            if !s.zero {
                parts.push(&buf[s.start..s.start + s.len]);
            }
        }
        self.send(sink, &parts);
    }

    /// Split a read into zero and data segments from `base:allocation`, or `None` when the
    /// whole range is data (or the status is unknown, or too fragmented to be worth it).
    fn zero_segments(&self, offset: u64, len: u64) -> Option<Vec<Segment>> {
        let end = offset + len;
        let known = lock(&self.known_data).clone();
        if known.start <= offset && end <= known.end {
            return None;
        }
        // Look past the read: allocated data usually comes in long runs.
        let ahead = len.max(STATUS_LOOKAHEAD).min(self.size - offset);
        let first = self.export.backend.block_status(0, offset, ahead).ok()?;
        if let Some(e) = first.first() {
            if e.flags & proto::STATE_ZERO == 0 && e.length >= len {
                self.learn_data(offset, offset + e.length.min(ahead));
                return None;
            }
        }
        let extents = self
            .collect_extents(0, offset, len, MAX_READ_SEGMENTS + 1, Some(first))
            .ok()?;
        let mut segments: Vec<Segment> = Vec::new();
        let mut start = 0usize;
        for e in extents {
            let zero = e.flags & proto::STATE_ZERO != 0;
            let len = e.length as usize;
            match segments.last_mut() {
                Some(last) if last.zero == zero => last.len += len,
                _ => segments.push(Segment { start, len, zero }),
            }
            start += len;
        }
        let covered = start as u64 == len;
        let useful = segments.iter().any(|s| s.zero);
        (covered && useful && segments.len() <= MAX_READ_SEGMENTS).then_some(segments)
    }

    /// Remember that `[start, end)` is allocated data (see `Session::known_data`).
    fn learn_data(&self, start: u64, end: u64) {
        let mut known = lock(&self.known_data);
        if !known.is_empty() && start <= known.end && known.start <= end {
            *known = known.start.min(start)..known.end.max(end);
        } else {
            *known = start..end;
        }
    }

    /// Forget what is known about `[offset, offset + len)`, which may now be a hole.
    fn forget_data(&self, offset: u64, len: u64) {
        let mut known = lock(&self.known_data);
        if offset < known.end && known.start < offset.saturating_add(len) {
            *known = 0..0;
        }
    }

    /// Extents of context `index` over `[offset, offset + len)`: merged, clipped to the range,
    /// at most `limit` of them (the last one may then cover less than the rest of the range).
    /// `first`: the backend's answer for `offset`, when already asked.
    fn collect_extents(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        limit: usize,
        mut first: Option<Vec<Extent>>,
    ) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<Extent> = Vec::new();
        'outer: while pos < end {
            let got = match first.take() {
                Some(got) => got,
                None => self.export.backend.block_status(index, pos, end - pos)?,
            };
            let before = pos;
            for e in got {
                let length = e.length.min(end - pos);
                if length == 0 {
                    break;
                }
                let count = out.len();
                match out.last_mut() {
                    Some(last) if last.flags == e.flags => last.length += length,
                    _ if count == limit => break 'outer,
                    _ => out.push(Extent {
                        length,
                        flags: e.flags,
                    }),
                }
                pos += length;
                if pos == end {
                    break;
                }
            }
            if pos == before {
                if out.is_empty() {
                    return Err(io::Error::other(format!(
                        "block status of context {index} at offset {pos} returned no extent"
                    )));
                }
                break;
            }
        }
        Ok(out)
    }

    /// Serve a BLOCK_STATUS; returns the time spent in the backend.
    fn block_status(&self, sink: Sink<'_>, h: &RequestHeader, contexts: &[usize]) -> Duration {
        let start = Instant::now();
        let limit = if h.flags & proto::CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            proto::MAX_EXTENTS
        };
        let chunk_type = if self.extended() {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        let mut chunks = Vec::with_capacity(contexts.len());
        for (i, &index) in contexts.iter().enumerate() {
            let extents = match self.collect_extents(index, h.offset, h.length, limit, None) {
                Ok(e) => e,
                Err(e) => {
                    let msg = format!(
                        "block status of export '{}' failed: {e}",
                        self.export.config.name
                    );
                    debug!("NBD client {}: {msg}", self.id);
                    let busy = start.elapsed();
                    self.send_error(sink, h, proto::errno_of(&e), &msg);
                    return busy;
                }
            };
            let id = self.export.context_id(index).unwrap_or_default();
            let payload = proto::block_status_payload(self.extended(), id, &extents);
            let flags = if i + 1 == contexts.len() {
                proto::REPLY_FLAG_DONE
            } else {
                0
            };
            let (b, n) = self.chunk(flags, chunk_type, h, payload.len() as u64);
            let mut chunk = b[..n].to_vec();
            chunk.extend_from_slice(&payload);
            chunks.push(chunk);
        }
        let busy = start.elapsed();
        let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        self.send(sink, &parts);
        busy
    }
}

struct Segment {
    start: usize,
    len: usize,
    zero: bool,
}

#[cfg(test)]
mod tests {
    use std::io::{self, IoSlice, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, BorrowedFd};
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::was_slow;
    use crate::client::Client;
    use crate::proto;
    use crate::test_utils::{FileBackend, MemBackend};
    use crate::{ExportBackend, ExportConfig, Server, ServerConfig, Stream};

    const MIB: u64 = 1024 * 1024;

    fn connect(backend: Arc<MemBackend>, max_in_flight: usize) -> Client {
        let server = Server::new(ServerConfig {
            max_in_flight,
            ..ServerConfig::default()
        });
        let config = ExportConfig {
            name: "e".into(),
            ..ExportConfig::default()
        };
        server.add_export(config, backend).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        server.serve_client(Box::new(theirs), Box::new(|| {}));
        Client::connect(Box::new(ours), "e", false, &[]).unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    /// How long a test client idles before a request, as at QD1: long enough for the
    /// server to be waiting however loaded the machine.
    const IDLE: Duration = Duration::from_millis(20);

    /// What [`TestStream`] needs from the socket under it.
    trait TestSocket: Read + Write + AsFd + Send + Sized + 'static {
        fn duplicate(&self) -> io::Result<Self>;
        fn shut_down(&self) -> io::Result<()>;
        fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()>;
    }

    /// TCP and unix streams have the same inherent methods, but no trait for them.
    macro_rules! impl_test_socket {
        ($($socket:ty),*) => {$(
            impl TestSocket for $socket {
                fn duplicate(&self) -> io::Result<Self> {
                    self.try_clone()
                }

                fn shut_down(&self) -> io::Result<()> {
                    self.shutdown(std::net::Shutdown::Both)
                }

                fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
                    self.set_read_timeout(timeout)?;
                    self.set_write_timeout(timeout)
                }
            }
        )*};
    }

    impl_test_socket!(TcpStream, UnixStream);

    /// A socket that records the bytes given to each write (shared by its clones) and,
    /// while `corked` holds a buffer, gathers its writes there instead.
    struct TestStream<S> {
        inner: S,
        writes: Arc<Mutex<Vec<usize>>>,
        corked: Arc<Mutex<Option<Vec<u8>>>>,
    }

    impl<S> TestStream<S> {
        fn new(inner: S) -> Self {
            TestStream {
                inner,
                writes: Arc::default(),
                corked: Arc::default(),
            }
        }
    }

    impl<S: TestSocket> Read for TestStream<S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl<S: TestSocket> Write for TestStream<S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if let Some(held) = self.corked.lock().unwrap().as_mut() {
                bufs.iter().for_each(|b| held.extend_from_slice(b));
                return Ok(bufs.iter().map(|b| b.len()).sum());
            }
            // Noted before the bytes can reach the peer, which may check at once.
            let len = bufs.iter().map(|b| b.len()).sum();
            self.writes.lock().unwrap().push(len);
            self.inner.write_vectored(bufs)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<S: TestSocket> Stream for TestStream<S> {
        fn try_clone(&self) -> io::Result<Box<dyn Stream>> {
            Ok(Box::new(TestStream {
                inner: self.inner.duplicate()?,
                writes: Arc::clone(&self.writes),
                corked: Arc::clone(&self.corked),
            }))
        }

        fn shutdown(&self) -> io::Result<()> {
            self.inner.shut_down()
        }

        fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
            self.inner.set_timeouts(timeout)
        }

        fn plain_socket(&self) -> Option<BorrowedFd<'_>> {
            Some(self.inner.as_fd())
        }
    }

    /// A client to a server on one export "e"; with the server's count of writes, and a
    /// way to send several requests in one write: while the cork holds a buffer, requests
    /// gather there, and `raw` sends them.
    struct RecordedClient<S> {
        c: Client,
        server_writes: Arc<Mutex<Vec<usize>>>,
        cork: Arc<Mutex<Option<Vec<u8>>>>,
        raw: S,
    }

    impl RecordedClient<TcpStream> {
        fn over_tcp(backend: Arc<dyn ExportBackend>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let theirs = listener.accept().unwrap().0;
            Self::serve(backend, Duration::ZERO, ours, theirs)
        }
    }

    impl RecordedClient<UnixStream> {
        fn over_unix(backend: Arc<dyn ExportBackend>, poll_max: Duration) -> Self {
            let (ours, theirs) = UnixStream::pair().unwrap();
            Self::serve(backend, poll_max, ours, theirs)
        }
    }

    impl<S: TestSocket> RecordedClient<S> {
        fn serve(backend: Arc<dyn ExportBackend>, poll_max: Duration, ours: S, theirs: S) -> Self {
            let server = Server::new(ServerConfig::default());
            let config = ExportConfig {
                name: "e".into(),
                poll_max,
                ..ExportConfig::default()
            };
            server.add_export(config, backend).unwrap();
            let theirs = TestStream::new(theirs);
            let server_writes = Arc::clone(&theirs.writes);
            server.serve_client(Box::new(theirs), Box::new(|| {}));
            let ours = TestStream::new(ours);
            let (raw, cork) = (ours.inner.duplicate().unwrap(), Arc::clone(&ours.corked));
            let c = Client::connect(Box::new(ours), "e", false, &[]).unwrap();
            RecordedClient {
                c,
                server_writes,
                cork,
                raw,
            }
        }

        /// The bytes of the requests `send` makes, gathered instead of sent.
        fn gather(&mut self, send: impl FnOnce(&mut Client)) -> Vec<u8> {
            *self.cork.lock().unwrap() = Some(Vec::new());
            send(&mut self.c);
            self.cork.lock().unwrap().take().unwrap()
        }

        /// Send the requests `send` makes in one write, counting the server's writes from
        /// now on.
        fn send_together(&mut self, send: impl FnOnce(&mut Client)) {
            let burst = self.gather(send);
            self.server_writes.lock().unwrap().clear();
            self.raw.write_all(&burst).unwrap();
        }

        /// The server's writes so far.
        fn writes(&self) -> Vec<usize> {
            self.server_writes.lock().unwrap().clone()
        }

        /// Two reads of `data`'s first 8 KiB that arrive together are answered together,
        /// in one write.
        fn check_reads_together_answered_together(&mut self, data: &[u8]) {
            let mut first = 0;
            self.send_together(|c| {
                first = c.send_request(0, proto::CMD_READ, 0, 4096, &[]).unwrap();
                c.send_request(0, proto::CMD_READ, 4096, 4096, &[]).unwrap();
            });
            for _ in 0..2 {
                let r = self.c.receive_reply().unwrap();
                let at = if r.cookie == first { 0 } else { 4096 };
                assert_eq!(r.data, &data[at..at + 4096]);
            }
            assert_eq!(self.writes(), vec![2 * (20 + 8 + 4096)]);
        }
    }

    #[test]
    fn small_replies_wait_for_requests_already_queued_over_tcp() {
        let backend = Arc::new(MemBackend::new(4 * MIB));
        let mut t = RecordedClient::over_tcp(backend.clone());
        let data = pattern(100 * 1024, 3);
        // After a payload this large the server reads the next header straight from the
        // socket, never more.
        t.c.write(0, &data, 0).unwrap();
        // So the first READ is read alone, and the second waits on the socket when the
        // first one's reply is ready.
        let (mut first, mut second) = (0, 0);
        t.send_together(|c| {
            first = c.send_request(0, proto::CMD_READ, 0, 8, &[]).unwrap();
            second = c.send_request(0, proto::CMD_READ, 8, 8, &[]).unwrap();
        });
        let mut cookies = Vec::new();
        for _ in 0..2 {
            let r = t.c.receive_reply().unwrap();
            assert_eq!(r.error, None);
            let at = if r.cookie == first { 0 } else { 8 };
            assert_eq!(r.data, &data[at..at + 8]);
            cookies.push(r.cookie);
        }
        cookies.sort_unstable();
        assert_eq!(cookies, vec![first, second]);
        // Both replies in one send.
        assert_eq!(t.server_writes.lock().unwrap().len(), 1);
    }

    #[test]
    fn replies_do_not_wait_for_a_request_still_arriving() {
        let backend = Arc::new(MemBackend::new(4 * MIB));
        let mut t = RecordedClient::over_tcp(backend.clone());
        let data = pattern(100 * 1024, 4);
        t.c.write(0, &data, 0).unwrap();
        // The first READ whole, but only the start of the second one's header.
        let (mut first, mut second) = (0, 0);
        let burst = t.gather(|c| {
            first = c.send_request(0, proto::CMD_READ, 0, 8, &[]).unwrap();
            second = c.send_request(0, proto::CMD_READ, 8, 8, &[]).unwrap();
        });
        let split = proto::REQUEST_SIZE + 10;
        t.raw.write_all(&burst[..split]).unwrap();
        // A reply held for the second READ would never come: fail instead of hanging.
        t.raw
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let r = t.c.receive_reply().unwrap();
        assert_eq!((r.cookie, r.error), (first, None));
        assert_eq!(r.data, &data[..8]);
        t.raw.write_all(&burst[split..]).unwrap();
        let r = t.c.receive_reply().unwrap();
        assert_eq!((r.cookie, r.error), (second, None));
        assert_eq!(r.data, &data[8..16]);
    }

    #[test]
    fn replies_do_not_wait_for_a_slow_request_served_after_them() {
        let delay = Duration::from_secs(1);
        let backend = Arc::new(MemBackend::new(4 * MIB).with_flush_delay(delay));
        let mut t = RecordedClient::over_tcp(backend.clone());
        let data = pattern(4096, 9);
        // Read together: the WRITE is served, then the FLUSH, which waits for the disk.
        let (mut write, mut flush) = (0, 0);
        let sent = Instant::now();
        t.send_together(|c| {
            write = c.send_request(0, proto::CMD_WRITE, 0, 0, &data).unwrap();
            flush = c.send_request(0, proto::CMD_FLUSH, 0, 0, &[]).unwrap();
        });
        let r = t.c.receive_reply().unwrap();
        assert_eq!((r.cookie, r.error), (write, None));
        let waited = sent.elapsed();
        assert!(waited < delay / 2, "the WRITE's reply waited {waited:?}");
        let r = t.c.receive_reply().unwrap();
        assert_eq!((r.cookie, r.error), (flush, None));
        assert_eq!(backend.flushes(), 1);
        assert_eq!(&backend.contents()[..data.len()], &data[..]);
    }

    #[test]
    fn slowness_allows_for_the_bytes_moved() {
        assert!(!was_slow(Duration::from_micros(20), 4096));
        assert!(was_slow(Duration::from_micros(150), 4096));
        // 1 MiB may take 100 us + 524 us.
        assert!(!was_slow(Duration::from_micros(600), MIB));
        assert!(was_slow(Duration::from_micros(700), MIB));
    }

    #[test]
    fn pipelined_requests_all_get_their_replies() {
        let backend = Arc::new(MemBackend::new(4 * MIB));
        let mut c = connect(Arc::clone(&backend), 32);
        let data = pattern(4 * MIB as usize, 5);
        c.write(0, &data, 0).unwrap();
        // Far more replies than one batch holds, sent before any reply is read.
        let cookies: Vec<u64> = (0..300u64)
            .map(|i| {
                c.send_request(0, proto::CMD_READ, i * 8192, 8192, &[])
                    .unwrap()
            })
            .collect();
        for _ in 0..cookies.len() {
            let r = c.receive_reply().unwrap();
            assert_eq!(r.error, None);
            let i = cookies.iter().position(|&k| k == r.cookie).unwrap();
            let at = i * 8192;
            assert_eq!(r.data, &data[at..at + 8192], "reply to read {i}");
        }
    }

    #[test]
    fn data_learned_from_status_is_forgotten_on_trim() {
        let backend = Arc::new(MemBackend::new(4 * MIB));
        let mut c = connect(backend, 32);
        c.write(0, &pattern(65536, 1), 0).unwrap();
        // Learns that the first 64 KiB are data...
        let r = c.read_reply(0, 4096, 0).unwrap();
        assert_eq!(r.chunk_types, vec![proto::REPLY_TYPE_OFFSET_DATA]);
        // ... which a hole in the middle undoes.
        c.trim(8192, 8192, 0).unwrap();
        let r = c.read_reply(0, 32768, 0).unwrap();
        assert_eq!(
            r.chunk_types,
            vec![
                proto::REPLY_TYPE_OFFSET_DATA,
                proto::REPLY_TYPE_OFFSET_HOLE,
                proto::REPLY_TYPE_OFFSET_DATA
            ]
        );
        let mut expect = pattern(65536, 1)[..32768].to_vec();
        expect[8192..16384].fill(0);
        assert_eq!(r.data, expect);
    }

    /// Writes on both sides of the read-ahead size, sent back to back with reads between
    /// them before any reply is read, so that headers and payloads straddle the reader's
    /// buffer in every way; with compact and with extended headers.
    #[test]
    fn pipelined_writes_of_any_size_land_intact() {
        for extended in [false, true] {
            let backend = Arc::new(MemBackend::new(8 * MIB));
            let server = Server::new(ServerConfig::default());
            let config = ExportConfig {
                name: "e".into(),
                ..ExportConfig::default()
            };
            server
                .add_export(config, Arc::clone(&backend) as _)
                .unwrap();
            let (ours, theirs) = UnixStream::pair().unwrap();
            server.serve_client(Box::new(theirs), Box::new(|| {}));
            let mut c = Client::connect(Box::new(ours), "e", extended, &[]).unwrap();
            let sizes = [
                65536,
                3,
                MIB as usize,
                4096,
                65537,
                200_000,
                65535,
                2 * MIB as usize,
            ];
            let mut expected = vec![0u8; 8 * MIB as usize];
            let mut offset = 0usize;
            let mut writes = Vec::new();
            for (i, &len) in sizes.iter().enumerate() {
                let data = pattern(len, i as u8 + 1);
                expected[offset..offset + len].copy_from_slice(&data);
                let cookie = c
                    .send_request(0, proto::CMD_WRITE, offset as u64, len as u64, &data)
                    .unwrap();
                writes.push(cookie);
                c.send_request(0, proto::CMD_READ, 0, 512, &[]).unwrap();
                offset += len + 1000;
            }
            for _ in 0..2 * sizes.len() {
                let r = c.receive_reply().unwrap();
                assert_eq!(r.error, None, "extended {extended}");
            }
            assert_eq!(
                c.read(0, 8 * MIB as u32 - 1, 0).unwrap(),
                expected[..8 * MIB as usize - 1]
            );
            assert_eq!(backend.contents(), expected, "extended {extended}");
        }
    }

    #[test]
    fn large_writes_are_served_by_the_reader() {
        let backend = Arc::new(MemBackend::new(8 * MIB));
        let mut c = connect(Arc::clone(&backend), 32);
        // A client at QD8: no hand-off to worker threads, whose wake-ups would cost more
        // CPU time than they save.
        for round in 0..4u64 {
            let cookies: Vec<u64> = (0..8u64)
                .map(|i| {
                    let data = pattern(MIB as usize, (round * 8 + i) as u8);
                    c.send_request(0, proto::CMD_WRITE, i * MIB, MIB, &data)
                        .unwrap()
                })
                .collect();
            for _ in &cookies {
                assert_eq!(c.receive_reply().unwrap().error, None);
            }
        }
        let threads = backend.write_threads();
        assert_eq!(threads.len(), 1, "writes served by {threads:?}");
        assert!(threads[0].starts_with("nbd-client-"), "{threads:?}");
    }

    #[test]
    fn slow_backend_moves_reads_to_the_pool() {
        // Long enough that overlapped service stays far below the bound on a loaded machine.
        let delay = Duration::from_millis(100);
        let backend = Arc::new(MemBackend::new(MIB).with_read_delay(delay));
        let mut c = connect(backend, 32);
        let start = Instant::now();
        for i in 0..10 {
            c.send_request(proto::CMD_FLAG_DF, proto::CMD_READ, i * 4096, 4096, &[])
                .unwrap();
        }
        for _ in 0..10 {
            assert_eq!(c.receive_reply().unwrap().error, None);
        }
        // Served one after the other, 10 reads would take 1 s; once the first has shown
        // the backend slow, the others overlap.
        let took = start.elapsed();
        assert!(took < Duration::from_millis(800), "{took:?}");
    }

    #[test]
    fn a_lone_read_to_a_waiting_client_is_sent_head_first() {
        lone_reads_to_a_waiting_client_are_sent_head_first(Duration::ZERO);
    }

    #[test]
    fn a_lone_read_to_a_waiting_client_is_sent_head_first_when_polling() {
        lone_reads_to_a_waiting_client_are_sent_head_first(Duration::from_micros(64));
    }

    fn lone_reads_to_a_waiting_client_are_sent_head_first(poll_max: Duration) {
        let backend = Arc::new(MemBackend::new(4 * MIB));
        let mut t = RecordedClient::over_unix(backend, poll_max);
        let data = pattern(8192, 5);
        t.c.write(0, &data, 0).unwrap();
        let head = 20 + 8; // structured reply chunk header, then the offset
        for len in [1, 4096, 8192] {
            // The client idles before each request, as at QD1.
            std::thread::sleep(IDLE);
            t.server_writes.lock().unwrap().clear();
            assert_eq!(t.c.read(0, len as u32, 0).unwrap(), &data[..len]);
            assert_eq!(t.writes(), vec![head, len]);
        }
        std::thread::sleep(IDLE);
        t.check_reads_together_answered_together(&data);
        // A WRITE's reply has no data to send after it.
        std::thread::sleep(IDLE);
        t.server_writes.lock().unwrap().clear();
        t.c.write(0, &data[..512], 0).unwrap();
        assert_eq!(t.writes().len(), 1);
    }

    #[test]
    fn a_lone_read_to_a_waiting_client_is_sent_from_the_file() {
        // The file ends before the export does: past its end, reads are zeroes.
        let file_len = 64 * 1024;
        let data = pattern(file_len, 9);
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&data, 0).unwrap();
        let backend = Arc::new(FileBackend::new(file, 4 * MIB));
        let mut t = RecordedClient::over_unix(backend.clone(), Duration::ZERO);
        let head = 20 + 8;
        let mut expected_from_file = 0;
        // (offset, length, bytes the file holds there)
        for (offset, len, in_file) in [
            (0, 4096, 4096),
            (8192 + 1, 1000, 1000),
            (file_len - 1000, 4096, 1000),
            (MIB as usize, 4096, 0),
        ] {
            std::thread::sleep(IDLE);
            t.server_writes.lock().unwrap().clear();
            let got = t.c.read(offset as u64, len as u32, 0).unwrap();
            let mut want = vec![0u8; len];
            want[..in_file].copy_from_slice(&data[offset.min(file_len)..][..in_file]);
            assert_eq!(got, want, "read of {len} at {offset}");
            expected_from_file += in_file;
            assert_eq!(backend.sent_from_file(), expected_from_file);
            // Only the head and what the file could not send went through the server.
            let mut writes = vec![head];
            if in_file < len {
                writes.push(len - in_file);
            }
            assert_eq!(t.writes(), writes, "read at {offset}");
        }
        // Reads that arrive together are still answered together, from the batch.
        std::thread::sleep(IDLE);
        t.check_reads_together_answered_together(&data);
        assert_eq!(backend.sent_from_file(), expected_from_file);
    }

    /// A disk whose reads all fail, and that would send them straight from its file; its
    /// size can shrink under its clients.
    struct FailingDisk {
        size: std::sync::atomic::AtomicU64,
    }

    impl FailingDisk {
        fn new() -> Self {
            FailingDisk { size: MIB.into() }
        }
    }

    impl ExportBackend for FailingDisk {
        fn size(&self) -> u64 {
            self.size.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn can_splice(&self) -> bool {
            true
        }
        fn send_file(&self, _: BorrowedFd<'_>, _: u64, _: usize) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }

    #[test]
    fn a_lone_read_past_a_shrunk_end_gets_its_error_reply() {
        let disk = Arc::new(FailingDisk::new());
        let mut t = RecordedClient::over_unix(disk.clone(), Duration::ZERO);
        // Answered once the connection serves requests, with the size it started with.
        t.c.write(0, &[1; 512], 0).unwrap();
        disk.size.store(0, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(IDLE);
        // Known before the reply begins: an error reply, and the connection goes on.
        let err = t.c.read(0, 4096, 0).unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::Command {
                    errno: proto::EIO,
                    ..
                }
            ),
            "{err:?}"
        );
        t.c.flush().unwrap();
    }

    #[test]
    fn a_lone_read_while_another_request_is_served_is_sent_whole() {
        let backend = Arc::new(MemBackend::new(MIB).with_flush_delay(Duration::from_millis(200)));
        let mut t = RecordedClient::over_unix(backend, Duration::ZERO);
        // Sent together, so that the flush goes to a pool worker.
        let mut flush = 0;
        t.send_together(|c| {
            flush = c.send_request(0, proto::CMD_FLUSH, 0, 0, &[]).unwrap();
            c.send_request(0, proto::CMD_WRITE, 0, 512, &[1; 512])
                .unwrap();
        });
        assert_ne!(t.c.receive_reply().unwrap().cookie, flush);
        std::thread::sleep(IDLE);
        t.server_writes.lock().unwrap().clear();
        let read = t.c.send_request(0, proto::CMD_READ, 0, 4096, &[]).unwrap();
        let r = t.c.receive_reply().unwrap();
        assert_eq!(r.cookie, read, "the read is answered while the flush runs");
        // Not head first: a pool worker may be waiting for the send lock.
        assert_eq!(t.writes(), vec![20 + 8 + 4096]);
        assert_eq!(t.c.receive_reply().unwrap().cookie, flush);
    }

    #[test]
    fn a_read_that_fails_after_its_reply_began_closes_only_its_connection() {
        let server = Server::new(ServerConfig::default());
        let config = ExportConfig {
            name: "e".into(),
            ..ExportConfig::default()
        };
        server
            .add_export(config, Arc::new(FailingDisk::new()))
            .unwrap();
        let connect = || {
            let (ours, theirs) = UnixStream::pair().unwrap();
            server.serve_client(Box::new(theirs), Box::new(|| {}));
            Client::connect(Box::new(ours), "e", false, &[]).unwrap()
        };
        let mut other = connect();
        let mut c = connect();
        std::thread::sleep(IDLE);
        // The head is already out when the read fails: nothing can follow it but the end.
        assert!(c.read(0, 4096, 0).is_err());
        assert!(c.flush().is_err(), "the connection was closed");
        // The other client is served on: its writes still land.
        other.write(0, &[1; 512], 0).unwrap();
        other.flush().unwrap();
    }
}
