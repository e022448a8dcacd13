//! Transmission phase: a reader thread decodes requests and serves them itself when nothing
//! else is pending, or hands them to a bounded pool of worker threads; replies are written
//! whole (one vectored write each) under the connection's send lock, in completion order.

use std::io::{self, BufReader, ErrorKind, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use log::{debug, warn};

use crate::proto::{self, Extent, RequestHeader};
use crate::server::{lock, Export};
use crate::Stream;

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

struct Request {
    header: RequestHeader,
    payload: Vec<u8>,
}

type CommandError = (u32, String);

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
}

struct InFlight {
    count: Mutex<usize>,
    changed: Condvar,
}

impl InFlight {
    fn finish_one(&self) {
        let mut count = lock(&self.count);
        *count = count.saturating_sub(1);
        self.changed.notify_all();
    }

    fn wait_below(&self, limit: usize) {
        let mut count = lock(&self.count);
        while *count >= limit {
            count = self.changed.wait(count).unwrap_or_else(|p| p.into_inner());
        }
    }
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
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("NBD client {id}: cannot duplicate the socket for replies: {e}");
            return;
        }
    };
    let size = export.backend.size();
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
    });
    let in_flight = Arc::new(InFlight {
        count: Mutex::new(0),
        changed: Condvar::new(),
    });
    let (sender, receiver) = mpsc::sync_channel::<Request>(max_in_flight);
    let receiver = Arc::new(Mutex::new(receiver));
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);

    loop {
        in_flight.wait_below(max_in_flight);
        let request = match session.read_request(&mut reader) {
            Ok(Some(r)) => r,
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
        // Fast path: nothing running and nothing more queued, so serve it here without a
        // thread hand-off; otherwise let the pool overlap it with the others.
        let idle = *lock(&in_flight.count) == 0;
        if idle && reader.buffer().is_empty() {
            session.handle(request);
        } else {
            let busy = {
                let mut count = lock(&in_flight.count);
                *count += 1;
                *count
            };
            if busy > workers.len() {
                match spawn_worker(&session, &receiver, &in_flight, workers.len()) {
                    Ok(w) => workers.push(w),
                    Err(e) if workers.is_empty() => {
                        warn!("NBD client {id}: cannot start a worker thread: {e}");
                        in_flight.finish_one();
                        session.handle(request);
                        continue;
                    }
                    Err(e) => debug!("NBD client {id}: cannot start another worker: {e}"),
                }
            }
            if let Err(mpsc::SendError(request)) = sender.send(request) {
                in_flight.finish_one();
                session.handle(request);
            }
        }
        if session.broken.load(Ordering::SeqCst) {
            break;
        }
    }
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
        .spawn(move || loop {
            let next = lock(&receiver).recv();
            let Ok(request) = next else {
                return;
            };
            session.handle(request);
            in_flight.finish_one();
        })
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
    fn read_request(&self, reader: &mut BufReader<Box<dyn Stream>>) -> io::Result<Option<Request>> {
        let header = if self.extended() {
            let mut b = [0u8; proto::EXTENDED_REQUEST_SIZE];
            if !read_exact_or_eof(reader, &mut b)? {
                return Ok(None);
            }
            RequestHeader::decode_extended(&b).ok_or_else(|| {
                invalid(format!(
                    "invalid magic (got {:#x})",
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
                ))
            })?
        } else {
            let mut b = [0u8; proto::REQUEST_SIZE];
            if !read_exact_or_eof(reader, &mut b)? {
                return Ok(None);
            }
            RequestHeader::decode_compact(&b).ok_or_else(|| {
                invalid(format!(
                    "invalid magic (got {:#x})",
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
                ))
            })?
        };
        if header.command == proto::CMD_DISC {
            debug!("NBD client {}: disconnect requested", self.id);
            return Ok(None);
        }
        let has_payload = header.command == proto::CMD_WRITE
            || (self.extended() && header.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0);
        if !has_payload {
            return Ok(Some(Request {
                header,
                payload: Vec::new(),
            }));
        }
        if header.length > u64::from(proto::MAX_PAYLOAD) {
            // The stream cannot be trusted to stay in sync: say why, then hang up.
            let msg = format!(
                "len ({}) is larger than max len ({})",
                header.length,
                proto::MAX_PAYLOAD
            );
            self.send_error(&header, proto::EINVAL, &msg);
            return Err(invalid(msg));
        }
        let mut payload = self.take_buffer(header.length as usize);
        reader.read_exact(&mut payload)?;
        Ok(Some(Request { header, payload }))
    }

    fn handle(&self, request: Request) {
        let mut h = request.header;
        let mut contexts = None;
        if h.command == proto::CMD_BLOCK_STATUS && h.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0 {
            match self.status_payload(&request.payload) {
                Ok((effect_length, subset)) => {
                    h.length = effect_length;
                    h.flags &= !proto::CMD_FLAG_PAYLOAD_LEN;
                    contexts = Some(subset);
                }
                Err(msg) => {
                    self.send_error(&h, proto::EINVAL, &msg);
                    return self.give_buffer(request.payload);
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
                self.send_error(&h, errno, &msg);
            }
            Ok(()) => match h.command {
                proto::CMD_READ => self.read(&h),
                proto::CMD_BLOCK_STATUS => {
                    self.block_status(&h, contexts.as_deref().unwrap_or(&self.contexts))
                }
                _ => match self.execute(&h, &request.payload) {
                    Ok(()) => self.send_done(&h),
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
                        self.send_error(&h, errno, &msg);
                    }
                },
            },
        }
        self.give_buffer(request.payload);
    }

    /// Decode a BLOCK_STATUS payload (extended headers): effect length, then the ids of the
    /// selected contexts wanted in the reply.
    fn status_payload(&self, payload: &[u8]) -> Result<(u64, Vec<usize>), String> {
        let mut c = proto::Cursor::new(payload);
        let effect_length = c.u64().ok_or("block status payload too short")?;
        let mut wanted = Vec::new();
        while let Some(id) = c.u32() {
            let id = id as usize;
            if !self.contexts.contains(&id) {
                return Err(format!("block status payload names unknown context {id}"));
            }
            if !wanted.contains(&id) {
                wanted.push(id);
            }
        }
        if !c.remaining().is_empty() || wanted.is_empty() {
            return Err("block status payload has an invalid length".to_string());
        }
        Ok((effect_length, wanted))
    }

    fn validate(&self, h: &RequestHeader) -> Result<(), CommandError> {
        let name = proto::command_name(h.command);
        let mut allowed = proto::CMD_FLAG_FUA;
        match h.command {
            proto::CMD_READ if self.mode != Mode::Simple => allowed |= proto::CMD_FLAG_DF,
            proto::CMD_WRITE if self.extended() => allowed |= proto::CMD_FLAG_PAYLOAD_LEN,
            proto::CMD_WRITE_ZEROES => {
                allowed |= proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
            }
            proto::CMD_BLOCK_STATUS => allowed |= proto::CMD_FLAG_REQ_ONE,
            proto::CMD_READ
            | proto::CMD_WRITE
            | proto::CMD_FLUSH
            | proto::CMD_TRIM
            | proto::CMD_CACHE => {}
            other => {
                return Err((
                    proto::EINVAL,
                    format!("invalid request type ({other}) received"),
                ))
            }
        }
        if h.flags & !allowed != 0 {
            return Err((
                proto::EINVAL,
                format!("unsupported flags for command {name} (got {:#x})", h.flags),
            ));
        }
        if h.command == proto::CMD_READ && h.length > u64::from(proto::MAX_PAYLOAD) {
            return Err((
                proto::EINVAL,
                format!(
                    "len ({}) is larger than max len ({})",
                    h.length,
                    proto::MAX_PAYLOAD
                ),
            ));
        }
        let writes = matches!(
            h.command,
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
        );
        if writes && self.export.config.read_only {
            return Err((proto::EPERM, "Export is read-only".to_string()));
        }
        if h.command != proto::CMD_FLUSH
            && (h.offset > self.size || h.length > self.size - h.offset)
        {
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
        if h.command == proto::CMD_BLOCK_STATUS {
            if self.contexts.is_empty() {
                return Err((proto::EINVAL, "CMD_BLOCK_STATUS not negotiated".to_string()));
            }
            if h.length == 0 {
                return Err((proto::EINVAL, "need non-zero length".to_string()));
            }
        }
        Ok(())
    }

    fn execute(&self, h: &RequestHeader, payload: &[u8]) -> io::Result<()> {
        let backend = &self.export.backend;
        let fua = h.flags & proto::CMD_FLAG_FUA != 0;
        match h.command {
            proto::CMD_WRITE => backend.write_at(payload, h.offset, fua),
            proto::CMD_FLUSH => backend.flush(),
            proto::CMD_TRIM => {
                backend.trim(h.offset, h.length)?;
                if fua {
                    backend.flush()?;
                }
                Ok(())
            }
            proto::CMD_WRITE_ZEROES => {
                let may_trim = h.flags & proto::CMD_FLAG_NO_HOLE == 0;
                let fast_only = h.flags & proto::CMD_FLAG_FAST_ZERO != 0;
                backend.write_zeroes(h.offset, h.length, may_trim, fast_only)?;
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

    /// Write one reply (all its parts) without interleaving with other replies.
    fn send(&self, parts: &[&[u8]]) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        let mut slices: &mut [IoSlice<'_>] = &mut slices;
        let mut writer = lock(&self.writer);
        while !slices.is_empty() {
            match writer.write_vectored(slices) {
                Ok(0) => {
                    self.fail_send(&mut writer, io::Error::from(ErrorKind::WriteZero));
                    return;
                }
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail_send(&mut writer, e);
                    return;
                }
            }
        }
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
    fn send_done(&self, h: &RequestHeader) {
        if self.extended() {
            let (b, n) = self.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, h, 0);
            self.send(&[&b[..n]]);
        } else {
            self.send(&[&proto::simple_reply(0, h.cookie)]);
        }
    }

    fn send_error(&self, h: &RequestHeader, errno: u32, message: &str) {
        if self.mode == Mode::Simple {
            self.send(&[&proto::simple_reply(errno, h.cookie)]);
        } else {
            let payload = proto::error_payload(errno, message);
            let (b, n) = self.chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR,
                h,
                payload.len() as u64,
            );
            self.send(&[&b[..n], &payload]);
        }
    }

    fn read(&self, h: &RequestHeader) {
        let backend = &self.export.backend;
        if h.flags & proto::CMD_FLAG_FUA != 0 {
            // QEMU flushes before a FUA read; keep its behaviour.
            if let Err(e) = backend.flush() {
                return self.send_error(
                    h,
                    proto::errno_of(&e),
                    &format!("flush before read failed: {e}"),
                );
            }
        }
        let len = h.length as usize;
        if self.mode != Mode::Simple && len == 0 {
            let (b, n) = self.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, h, 0);
            return self.send(&[&b[..n]]);
        }
        let mut buf = self.take_buffer(len);
        let segments = if self.mode == Mode::Simple || h.flags & proto::CMD_FLAG_DF != 0 {
            None
        } else {
            self.zero_segments(h.offset, h.length)
        };
        let result = match &segments {
            None => backend.read_at(&mut buf, h.offset),
            Some(segments) => segments.iter().filter(|s| !s.zero).try_for_each(|s| {
                backend.read_at(
                    &mut buf[s.start..s.start + s.len],
                    h.offset + s.start as u64,
                )
            }),
        };
        match (result, segments) {
            (Err(e), _) => {
                let msg = format!(
                    "reading from export '{}' failed: {e}",
                    self.export.config.name
                );
                debug!("NBD client {}: {msg}", self.id);
                self.send_error(h, proto::errno_of(&e), &msg);
            }
            (Ok(()), None) if self.mode == Mode::Simple => {
                self.send(&[&proto::simple_reply(0, h.cookie), &buf]);
            }
            (Ok(()), None) => {
                let (b, n) = self.chunk(
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    h,
                    8 + len as u64,
                );
                self.send(&[&b[..n], &h.offset.to_be_bytes(), &buf]);
            }
            (Ok(()), Some(segments)) => self.send_sparse(h, &segments, &buf),
        }
        self.give_buffer(buf);
    }

    fn send_sparse(&self, h: &RequestHeader, segments: &[Segment], buf: &[u8]) {
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
        self.send(&parts);
    }

    /// Split a read into zero and data segments from `base:allocation`, or `None` when the
    /// whole range is data (or the status is unknown, or too fragmented to be worth it).
    fn zero_segments(&self, offset: u64, len: u64) -> Option<Vec<Segment>> {
        let extents = self
            .collect_extents(0, offset, len, MAX_READ_SEGMENTS + 1)
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

    /// Extents of context `index` over `[offset, offset + len)`: merged, clipped to the range,
    /// at most `limit` of them (the last one may then cover less than the rest of the range).
    fn collect_extents(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        limit: usize,
    ) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<Extent> = Vec::new();
        'outer: while pos < end {
            let got = self.export.backend.block_status(index, pos, end - pos)?;
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

    fn block_status(&self, h: &RequestHeader, contexts: &[usize]) {
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
            let extents = match self.collect_extents(index, h.offset, h.length, limit) {
                Ok(e) => e,
                Err(e) => {
                    let msg = format!(
                        "block status of export '{}' failed: {e}",
                        self.export.config.name
                    );
                    debug!("NBD client {}: {msg}", self.id);
                    return self.send_error(h, proto::errno_of(&e), &msg);
                }
            };
            let payload = proto::block_status_payload(self.extended(), index as u32, &extents);
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
        let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        self.send(&parts);
    }
}

struct Segment {
    start: usize,
    len: usize,
    zero: bool,
}
