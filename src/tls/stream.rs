//! A TLS session usable from several threads as an [`nbd::Stream`].
//!
//! The NBD server reads requests on one handle while worker threads write replies on clones.
//! The rustls session is behind one mutex that is only held to encrypt or decrypt, never
//! across a blocking socket call, so a reader waiting for data never holds up writers:
//! - the reader waits for ciphertext on its own socket handle without the session lock, then
//!   takes the lock to decrypt;
//! - a writer encrypts under the session lock into a queue of ciphertext records, then sends
//!   the queue in order under a separate socket-output lock. Records are queued in the order
//!   they were encrypted (TLS sequence numbers) and only popped under the output lock, so
//!   whoever holds that lock sends them in order; a writer returns once the queue it joined
//!   has been sent.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use rustls::ServerConnection;

/// Ciphertext read from the socket but not yet handed to rustls.
const RAW_BUFFER: usize = 32 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Session {
    conn: ServerConnection,
    /// Encrypted records waiting to be sent, oldest first.
    outgoing: VecDeque<Vec<u8>>,
}

impl Session {
    fn queue_output(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut record = Vec::new();
            self.conn.write_tls(&mut record)?;
            self.outgoing.push_back(record);
        }
        Ok(())
    }
}

struct RawInput {
    socket: Box<dyn nbd::Stream>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

struct Shared {
    session: Mutex<Session>,
    /// Lock order: `input` before `session` and before `output`; `output` before `session`.
    input: Mutex<RawInput>,
    output: Mutex<Box<dyn nbd::Stream>>,
    /// For shutdown and timeouts, which must not wait for the reader or a writer.
    control: Mutex<Box<dyn nbd::Stream>>,
}

/// One handle on a TLS session; clones share it.
pub struct TlsStream(Arc<Shared>);

impl TlsStream {
    /// Wraps an established session. `conn` may still have handshake output queued.
    pub fn new(conn: ServerConnection, socket: Box<dyn nbd::Stream>) -> io::Result<Self> {
        let output = socket.try_clone()?;
        let control = socket.try_clone()?;
        let mut session = Session {
            conn,
            outgoing: VecDeque::new(),
        };
        session.queue_output()?;
        let stream = TlsStream(Arc::new(Shared {
            session: Mutex::new(session),
            input: Mutex::new(RawInput {
                socket,
                buf: vec![0; RAW_BUFFER].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            output: Mutex::new(output),
            control: Mutex::new(control),
        }));
        stream.send_queued()?;
        Ok(stream)
    }

    /// Sends every queued record, in order.
    fn send_queued(&self) -> io::Result<()> {
        let mut output = lock(&self.0.output);
        self.send_locked(&mut output)
    }

    fn send_locked(&self, output: &mut Box<dyn nbd::Stream>) -> io::Result<()> {
        loop {
            let Some(record) = lock(&self.0.session).outgoing.pop_front() else {
                return Ok(());
            };
            output.write_all(&record)?;
        }
    }

    /// Sends queued records unless another thread is sending (it will send them too).
    fn send_queued_if_idle(&self) -> io::Result<()> {
        match self.0.output.try_lock() {
            Ok(mut output) => self.send_locked(&mut output),
            Err(TryLockError::Poisoned(p)) => self.send_locked(&mut p.into_inner()),
            Err(TryLockError::WouldBlock) => Ok(()),
        }
    }

    /// Feeds buffered ciphertext to rustls, one read_tls at a time, until there is
    /// plaintext or the buffer is used up.
    fn decrypt_buffered(&self, input: &mut RawInput) -> io::Result<()> {
        let mut session = lock(&self.0.session);
        while input.start < input.end {
            let mut pending = &input.buf[input.start..input.end];
            let before = pending.len();
            session.conn.read_tls(&mut pending)?;
            input.start += before - pending.len();
            let processed = session.conn.process_new_packets();
            session.queue_output()?;
            match processed {
                Ok(state) if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() => {
                    break
                }
                Ok(_) => {}
                Err(e) => {
                    drop(session);
                    // Deliver the alert rustls queued, then fail the connection.
                    let _ = self.send_queued();
                    return Err(io::Error::new(ErrorKind::InvalidData, e));
                }
            }
        }
        drop(session);
        self.send_queued_if_idle()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut input = lock(&self.0.input);
        loop {
            match lock(&self.0.session).conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if input.start < input.end {
                self.decrypt_buffered(&mut input)?;
                continue;
            }
            // Wait for ciphertext without holding the session lock.
            let input = &mut *input;
            let n = input.socket.read(&mut input.buf)?;
            (input.start, input.end) = (0, n);
            if n == 0 {
                // End of the socket: rustls tells a clean close_notify from a truncation.
                let mut session = lock(&self.0.session);
                session.conn.read_tls(&mut &[][..])?;
                session
                    .conn
                    .process_new_packets()
                    .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
                continue;
            }
            self.decrypt_buffered(input)?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = {
            let mut session = lock(&self.0.session);
            let written = session.conn.writer().write(buf)?;
            session.queue_output()?;
            written
        };
        self.send_queued()?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut output = lock(&self.0.output);
        self.send_locked(&mut output)?;
        output.flush()
    }
}

impl nbd::Stream for TlsStream {
    fn try_clone(&self) -> io::Result<Box<dyn nbd::Stream>> {
        Ok(Box::new(TlsStream(Arc::clone(&self.0))))
    }

    fn shutdown(&self) -> io::Result<()> {
        lock(&self.0.control).shutdown()
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        lock(&self.0.control).set_timeout(timeout)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Last handle gone: end the session cleanly (best effort; the socket may be shut).
        let session = self.session.get_mut().unwrap_or_else(|p| p.into_inner());
        session.conn.send_close_notify();
        if session.queue_output().is_ok() {
            let output = self.output.get_mut().unwrap_or_else(|p| p.into_inner());
            for record in session.outgoing.drain(..) {
                if output.write_all(&record).is_err() {
                    break;
                }
            }
        }
    }
}
