//! iothreads: named threads, each with its own epoll loop, that exports run
//! their work on.
//!
//! An iothread is the anchor of the worker threads of the exports that name
//! it. `query-iothreads` reports its kernel thread id so that an operator (or
//! libvirt) can pin it; vhost-user-blk workers that belong to an iothread copy
//! its name and CPU affinity when they start, so pinning the iothread pins the
//! queue work too. The thread itself waits in its epoll loop until stopped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Map, Value};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const STOP_TOKEN: u64 = 0;

/// An iothread's polling properties, as QEMU's: how long the threads that
/// serve its exports may poll for new requests before they sleep
/// (`poll-max-ns`, 0 turns polling off). `poll-grow`, `poll-shrink` and
/// `aio-max-batch` are kept and reported; the window always doubles and
/// halves (QEMU's defaults) and there is no AIO batch to size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoThreadParams {
    pub poll_max_ns: u64,
    pub poll_grow: u64,
    pub poll_shrink: u64,
    pub aio_max_batch: u64,
}

impl Default for IoThreadParams {
    /// QEMU's defaults on Linux.
    fn default() -> Self {
        IoThreadParams {
            poll_max_ns: 32768,
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: 0,
        }
    }
}

impl IoThreadParams {
    /// From `object-add` / `--object iothread` properties (already checked
    /// to be integers by the schema).
    pub fn from_props(props: &Map<String, Value>) -> Result<Self, String> {
        let get = |name: &str, default: u64| -> Result<u64, String> {
            match props.get(name) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| format!("{name} value must be in range [0, {}]", i64::MAX)),
            }
        };
        let defaults = IoThreadParams::default();
        Ok(IoThreadParams {
            poll_max_ns: get("poll-max-ns", defaults.poll_max_ns)?,
            poll_grow: get("poll-grow", defaults.poll_grow)?,
            poll_shrink: get("poll-shrink", defaults.poll_shrink)?,
            aio_max_batch: get("aio-max-batch", defaults.aio_max_batch)?,
        })
    }

    pub fn poll_max(&self) -> Duration {
        Duration::from_nanos(self.poll_max_ns)
    }
}

/// A running iothread.
pub struct IoThread {
    id: String,
    thread_id: i32,
    params: IoThreadParams,
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

/// What the loop and its owner share.
struct Shared {
    stop: EventFd,
}

impl IoThread {
    /// Starts the thread `id` and waits until it runs its loop.
    pub fn spawn(id: &str, params: IoThreadParams) -> io::Result<IoThread> {
        let shared = Arc::new(Shared {
            stop: EventFd::new(EFD_NONBLOCK)?,
        });
        let epoll_fd = epoll::create(true)?;
        if let Err(e) = epoll::ctl(
            epoll_fd,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            shared.stop.as_raw_fd(),
            epoll::Event::new(epoll::Events::EPOLLIN, STOP_TOKEN),
        ) {
            // SAFETY: epoll_fd was created above and is not used elsewhere.
            unsafe { libc::close(epoll_fd) };
            return Err(e);
        }
        let (tid_tx, tid_rx) = mpsc::channel();
        let loop_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(thread_name(id))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                run_loop(epoll_fd, &loop_shared);
                // SAFETY: the loop owned epoll_fd and has finished with it.
                unsafe { libc::close(epoll_fd) };
            })?;
        let thread_id = tid_rx
            .recv()
            .map_err(|_| io::Error::other(format!("iothread '{id}' exited at start")))?;
        Ok(IoThread {
            id: id.to_string(),
            thread_id,
            params,
            shared,
            handle: Mutex::new(Some(handle)),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The kernel thread id (what `query-iothreads` calls `thread-id`).
    pub fn thread_id(&self) -> i32 {
        self.thread_id
    }

    pub fn params(&self) -> IoThreadParams {
        self.params
    }

    /// Stops the loop and joins the thread.
    pub fn stop(&self) {
        let _ = self.shared.stop.write(1);
        let handle = self.handle.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A hook that gives the thread running it the CPU affinity that thread
/// `tid` (an iothread) has at that moment.
pub fn affinity_follower(tid: i32) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        // SAFETY: cpu_set_t is plain data; both calls get its exact size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(tid, size, &mut set) == 0 {
                libc::sched_setaffinity(0, size, &set);
            }
        }
    })
}

/// Linux keeps 15 bytes of a thread name; keep the iothread id's start.
pub fn thread_name(id: &str) -> String {
    id.chars().take(15).collect()
}

fn run_loop(epoll_fd: i32, shared: &Shared) {
    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
    loop {
        match epoll::wait(epoll_fd, -1, &mut events) {
            Ok(n) if events[..n].iter().any(|ev| ev.data == STOP_TOKEN) => {
                let _ = shared.stop.read();
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::error!("iothread epoll_wait failed: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_as_a_named_thread_until_stopped() {
        let t = IoThread::spawn("iot-test-with-a-long-name", IoThreadParams::default()).unwrap();
        let task = format!("/proc/self/task/{}", t.thread_id());
        let comm = std::fs::read_to_string(format!("{task}/comm")).unwrap();
        assert_eq!(comm.trim(), "iot-test-with-a");
        assert_eq!(t.id(), "iot-test-with-a-long-name");
        t.stop();
        // The join returns when the thread clears its tid, a moment before the
        // kernel drops its /proc entry.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::path::Path::new(&task).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!std::path::Path::new(&task).exists());
        // Stopping twice is harmless.
        t.stop();
    }
}
