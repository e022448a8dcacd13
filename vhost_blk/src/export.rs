//! Serves front-ends on a listening socket, one after another.

use std::fs::DirBuilder;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{BlkConfig, QueueGroup};
use crate::device::BlkBackend;
use crate::proxy;
use crate::{BlockDisk, Error};

/// A connection being served, reachable from the export handle.
struct Connection {
    id: u64,
    front: UnixStream,
    device: Arc<BlkBackend>,
}

struct Shared {
    serial: String,
    stopping: AtomicBool,
    stop_event: EventFd,
    /// Every front-end connected now. Unlike QSD, several may be: a
    /// migration target connects while the source still runs.
    connections: Mutex<Vec<Connection>>,
    /// The threads serving them, joined on stop.
    servers: Mutex<Vec<JoinHandle<()>>>,
}

/// A running vhost-user-blk export. Dropping it without [`BlkExport::stop`]
/// also stops it.
pub struct BlkExport {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BlkExport {
    /// Serves front-ends on `listener` (from a path or an inherited
    /// listening fd). Each connection gets a fresh device with its own
    /// queues and workers, so a reconnecting front-end starts clean and
    /// several front-ends can be served at once.
    pub fn start(
        listener: Listener,
        disk: Arc<dyn BlockDisk>,
        config: BlkConfig,
    ) -> Result<BlkExport, Error> {
        let groups = config.validated_groups()?;
        let serial = config.serial.clone();
        let io_err = |what: &'static str| {
            let serial = serial.clone();
            move |source: io::Error| Error::Io {
                serial,
                what,
                source,
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("make the listening socket non-blocking")(io::Error::other(e)))?;
        let shared = Arc::new(Shared {
            serial: config.serial.clone(),
            stopping: AtomicBool::new(false),
            stop_event: EventFd::new(EFD_NONBLOCK).map_err(io_err("create the stop event"))?,
            connections: Mutex::new(Vec::new()),
            servers: Mutex::new(Vec::new()),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("vhost-blk-{}", config.serial))
            .spawn(move || accept_loop(&thread_shared, &listener, &disk, &config, &groups))
            .map_err(io_err("spawn the export thread"))?;
        Ok(BlkExport {
            shared,
            thread: Some(thread),
        })
    }

    /// How many front-ends are connected now.
    pub fn connected(&self) -> usize {
        self.shared.connections.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// The disk's size changed: the next GET_CONFIG reports the new capacity;
    /// tell connected front-ends with CONFIG_CHANGE_MSG (needs BACKEND_REQ).
    pub fn resize(&self) {
        let Ok(conns) = self.shared.connections.lock() else {
            return;
        };
        for conn in conns.iter() {
            self.announce_resize(conn);
        }
    }

    fn announce_resize(&self, conn: &Connection) {
        match conn.device.notify_config_change() {
            Ok(true) => info!("vhost-user-blk export '{}': sent config change", self.shared.serial),
            Ok(false) => warn!(
                "vhost-user-blk export '{}': front-end has no back-end channel, resize not announced",
                self.shared.serial
            ),
            Err(e) => warn!(
                "vhost-user-blk export '{}': cannot announce resize: {e}",
                self.shared.serial
            ),
        }
    }

    /// Disconnects the front-end, stops all threads and returns when they are gone.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.stop_event.write(1);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!(
                    "vhost-user-blk export '{}': export thread panicked",
                    self.shared.serial
                );
            }
        }
        // No new connection can start now: end the ones running.
        if let Ok(conns) = self.shared.connections.lock() {
            for conn in conns.iter() {
                let _ = conn.front.shutdown(Shutdown::Both);
            }
        }
        let servers = self
            .shared
            .servers
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        for server in servers {
            if server.join().is_err() {
                error!(
                    "vhost-user-blk export '{}': connection thread panicked",
                    self.shared.serial
                );
            }
        }
    }
}

impl Drop for BlkExport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits for a front-end or the stop event; None when stopping.
fn wait_for_frontend(shared: &Shared, listener: &Listener) -> Option<UnixStream> {
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return None;
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shared.stop_event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                error!(
                    "vhost-user-blk export '{}': poll failed: {e}",
                    shared.serial
                );
                thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if fds[1].revents != 0 {
            continue;
        }
        match listener.accept() {
            Ok(Some(stream)) => match stream.set_nonblocking(false) {
                Ok(()) => return Some(stream),
                Err(e) => warn!(
                    "vhost-user-blk export '{}': dropping front-end: {e}",
                    shared.serial
                ),
            },
            Ok(None) => {}
            Err(e) => {
                // E.g. out of fds: don't spin.
                error!(
                    "vhost-user-blk export '{}': accept failed: {e}",
                    shared.serial
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn accept_loop(
    shared: &Arc<Shared>,
    listener: &Listener,
    disk: &Arc<dyn BlockDisk>,
    config: &BlkConfig,
    groups: &[QueueGroup],
) {
    let mut next_id = 0u64;
    while let Some(front) = wait_for_frontend(shared, listener) {
        let id = next_id;
        next_id += 1;
        info!(
            "vhost-user-blk export '{}': front-end {id} connected",
            shared.serial
        );
        let (conn_shared, disk, config, groups) = (
            Arc::clone(shared),
            Arc::clone(disk),
            config.clone(),
            groups.to_vec(),
        );
        let spawned = thread::Builder::new()
            .name(format!("vhost-blk-{}-c", shared.serial))
            .spawn(move || {
                let shared = conn_shared.as_ref();
                match serve_connection(shared, id, front, &disk, &config, &groups) {
                    Ok(()) => info!(
                        "vhost-user-blk export '{}': front-end {id} disconnected",
                        shared.serial
                    ),
                    Err(e) => warn!(
                        "vhost-user-blk export '{}': front-end {id}: connection ended: {e}",
                        shared.serial
                    ),
                }
                if let Ok(mut conns) = shared.connections.lock() {
                    conns.retain(|c| c.id != id);
                }
            });
        match spawned {
            Ok(handle) => {
                if let Ok(mut servers) = shared.servers.lock() {
                    // Forget the threads of connections that ended.
                    servers.retain(|h| !h.is_finished());
                    servers.push(handle);
                }
            }
            Err(e) => error!(
                "vhost-user-blk export '{}': cannot serve front-end {id}: {e}",
                shared.serial
            ),
        }
    }
}

/// A socket pair between the relay and vhost-user-backend, which only
/// accepts connections from a `Listener`: bind in a private directory,
/// connect, and let the daemon accept.
fn connect_daemon(daemon: &mut VhostUserDaemon<Arc<BlkBackend>>) -> io::Result<UnixStream> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "blkd-vhost-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new().mode(0o700).create(&dir)?;
    let result = (|| {
        let path = dir.join("s");
        let mut listener = Listener::new(&path, true).map_err(io::Error::other)?;
        let back = UnixStream::connect(&path)?;
        daemon
            .start(&mut listener)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(back)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn serve_connection(
    shared: &Shared,
    id: u64,
    front: UnixStream,
    disk: &Arc<dyn BlockDisk>,
    config: &BlkConfig,
    groups: &[QueueGroup],
) -> io::Result<()> {
    let device = Arc::new(BlkBackend::new(Arc::clone(disk), config, groups)?);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(
        format!("vhost-blk-{}", shared.serial),
        Arc::clone(&device),
        mem,
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    // Wake every worker once so it names itself and runs its start hook
    // before serving queues.
    for (index, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        if let Some((consumer, notifier)) = device.worker_start_event(index) {
            handler.register_listener(
                consumer.as_raw_fd(),
                EventSet::IN,
                device.worker_start_token(),
            )?;
            notifier.notify()?;
        }
    }
    let back = connect_daemon(&mut daemon)?;
    {
        let mut conns = shared
            .connections
            .lock()
            .map_err(|_| io::Error::other("connection lock poisoned"))?;
        conns.push(Connection {
            id,
            front: front.try_clone()?,
            device: Arc::clone(&device),
        });
    }
    // stop() may have run before the connection was published.
    if shared.stopping.load(Ordering::Acquire) {
        let _ = front.shutdown(Shutdown::Both);
    }
    let (front_r, back_r) = (front.try_clone()?, back.try_clone()?);
    let replies = thread::Builder::new()
        .name(format!("vhost-blk-{}-r", shared.serial))
        .spawn(move || proxy::relay_replies(&back_r, &front_r))?;
    let relayed = proxy::relay_requests(&front, &back, &device);
    let _ = replies.join();
    let waited = daemon.wait();
    // Dropping the daemon stops and joins the worker threads (exit events).
    drop(daemon);
    relayed?;
    match waited {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}
