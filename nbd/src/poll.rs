//! Adaptive polling of a connection's socket before the reader sleeps on it, as QEMU's
//! iothreads poll (`poll-max-ns`): when the next request comes soon after the replies went
//! out (a client at QD1), watching the socket for a few microseconds costs less latency
//! than going to sleep and being woken, which on virtual machines means an interrupt
//! between CPUs for every request. It costs CPU time, so it is off unless the export's
//! configuration asks for it ([`crate::ExportConfig::poll_max`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Where polling starts once sleeps have been seen to be short (QEMU: 4 us).
const POLL_START: Duration = Duration::from_micros(4);

/// How long to poll before sleeping. It doubles while the reader keeps being woken within
/// `max` of starting to wait, and halves (down to nothing) when the waits are longer, so an
/// idle connection costs no CPU.
pub(crate) struct PollWindow {
    window: Duration,
    max: Duration,
}

impl PollWindow {
    /// Polling for at most `max`, which is not zero.
    pub(crate) fn new(max: Duration) -> Self {
        PollWindow {
            window: Duration::ZERO,
            max,
        }
    }

    /// Wait until `socket` is readable: poll it for the window, then sleep.
    pub(crate) fn wait_readable(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        let start = Instant::now();
        if !self.window.is_zero() {
            let deadline = start + self.window;
            loop {
                if readable(socket, 0)? {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    break;
                }
                // The client may be waiting for this CPU.
                std::thread::yield_now();
            }
        }
        readable(socket, -1)?;
        self.adjust(start.elapsed());
        Ok(())
    }

    /// Adjust the window to a wait that polling did not cover.
    fn adjust(&mut self, waited: Duration) {
        if waited > self.max {
            self.window /= 2;
            if self.window < POLL_START {
                self.window = Duration::ZERO;
            }
        } else if waited > self.window {
            self.window = (self.window * 2).max(POLL_START).min(self.max);
        }
    }
}

/// Whether `socket` has data (or an end) to read, waiting up to `timeout_ms` (-1: forever).
fn readable(socket: BorrowedFd<'_>, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: polls one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, timeout_ms) } {
            n if n >= 0 => return Ok(n > 0),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn window_follows_how_long_the_reader_waits() {
        let us = Duration::from_micros;
        const POLL_MAX: Duration = Duration::from_micros(64);
        let mut w = PollWindow::new(POLL_MAX);
        let mut after = |waited: Duration| {
            w.adjust(waited);
            w.window
        };
        assert_eq!(after(us(1)), POLL_START);
        assert_eq!(after(us(2)), POLL_START);
        assert_eq!(after(us(10)), us(8));
        assert_eq!(after(us(60)), us(16));
        assert_eq!(after(us(60)), us(32));
        assert_eq!(after(us(60)), POLL_MAX);
        assert_eq!(after(POLL_MAX), POLL_MAX);
        assert_eq!(after(us(1000)), us(32));
        assert_eq!(after(us(1000)), us(16));
        assert_eq!(after(us(1000)), us(8));
        assert_eq!(after(us(1000)), us(4));
        assert_eq!(after(us(1000)), Duration::ZERO);
    }

    #[test]
    fn waits_for_data_and_for_the_end() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let mut w = PollWindow::new(Duration::from_micros(64));
        w.window = w.max;
        std::thread::scope(|s| {
            let waiter = s.spawn(|| w.wait_readable(theirs.as_fd()));
            std::thread::sleep(Duration::from_millis(20));
            ours.write_all(b"x").unwrap();
            waiter.join().unwrap().unwrap();
        });
        // A long wait shrinks the window.
        assert_eq!(w.window, Duration::from_micros(32));
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(ours);
        w.wait_readable(theirs.as_fd()).unwrap();
    }
}
