//! iothreads: named threads, each with its own epoll loop, that exports run
//! their work on.
//!
//! An iothread runs submitted tasks and stops on request. `query-iothreads`
//! reports its kernel thread id so that an operator (or libvirt) can pin it;
//! vhost-user-blk workers that belong to an iothread copy its name and CPU
//! affinity when they start, so pinning the iothread pins the queue work too.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Task = Box<dyn FnOnce() + Send>;

const STOP_TOKEN: u64 = 0;
const TASK_TOKEN: u64 = 1;

/// A running iothread.
pub struct IoThread {
    id: String,
    thread_id: i32,
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

/// What the loop and the submitters share.
struct Shared {
    stop: EventFd,
    wake: EventFd,
    tasks: Mutex<VecDeque<Task>>,
}

impl IoThread {
    /// Starts the thread `id` and waits until it runs its loop.
    pub fn spawn(id: &str) -> io::Result<IoThread> {
        let shared = Arc::new(Shared {
            stop: EventFd::new(EFD_NONBLOCK)?,
            wake: EventFd::new(EFD_NONBLOCK)?,
            tasks: Mutex::new(VecDeque::new()),
        });
        let epoll_fd = epoll::create(true)?;
        for (fd, token) in [
            (shared.stop.as_raw_fd(), STOP_TOKEN),
            (shared.wake.as_raw_fd(), TASK_TOKEN),
        ] {
            if let Err(e) = epoll::ctl(
                epoll_fd,
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Event::new(epoll::Events::EPOLLIN, token),
            ) {
                // SAFETY: epoll_fd was created above and is not used elsewhere.
                unsafe { libc::close(epoll_fd) };
                return Err(e);
            }
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

    /// Runs `task` on the iothread.
    pub fn submit(&self, task: impl FnOnce() + Send + 'static) {
        if let Ok(mut q) = self.shared.tasks.lock() {
            q.push_back(Box::new(task));
        }
        let _ = self.shared.wake.write(1);
    }

    /// The CPUs the iothread may run on, as the kernel reports them now.
    pub fn cpu_affinity(&self) -> Option<libc::cpu_set_t> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let rc = libc::sched_getaffinity(
                self.thread_id,
                std::mem::size_of::<libc::cpu_set_t>(),
                &mut set,
            );
            (rc == 0).then_some(set)
        }
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

/// Linux keeps 15 bytes of a thread name; keep the iothread id's start.
pub fn thread_name(id: &str) -> String {
    id.chars().take(15).collect()
}

fn run_loop(epoll_fd: i32, shared: &Shared) {
    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 8];
    loop {
        let n = match epoll::wait(epoll_fd, -1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("iothread epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data == STOP_TOKEN {
                return;
            }
            let _ = shared.wake.read();
            loop {
                let task = shared.tasks.lock().ok().and_then(|mut q| q.pop_front());
                match task {
                    Some(t) => t(),
                    None => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn runs_tasks_on_a_named_thread_and_stops() {
        let t = IoThread::spawn("iot-test").unwrap();
        assert!(t.thread_id() > 0);
        let (tx, rx) = mpsc::channel();
        t.submit(move || {
            let name = std::thread::current().name().map(str::to_string);
            // SAFETY: no preconditions.
            tx.send((name, unsafe { libc::gettid() })).unwrap();
        });
        let (name, tid) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(name.as_deref(), Some("iot-test"));
        assert_eq!(tid, t.thread_id());
        assert!(t.cpu_affinity().is_some());
        t.stop();
        // A stopped thread's id is gone from the process.
        let path = format!("/proc/self/task/{}", t.thread_id());
        assert!(!std::path::Path::new(&path).exists());
    }
}
