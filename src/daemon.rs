//! The daemon: its state and the main thread's epoll loop, which serves the
//! QMP monitors, the NBD listener and signals.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::export::Exports;
use crate::graph::Graph;
use crate::iothread::IoThread;
use crate::nbd_server::NbdServerState;
use crate::pidfile::Pidfile;

const SIGNAL_TOKEN: u64 = 0;
const WAKE_TOKEN: u64 = 1;
const NBD_LISTENER_TOKEN: u64 = 2;
const FIRST_DYNAMIC_TOKEN: u64 = 16;

/// The largest QMP input a client may have buffered before it is answered.
const MONITOR_READ_CHUNK: usize = 64 * 1024;

/// Work other threads hand to the main loop.
pub enum MainMsg {
    /// An NBD client went away: accept again if we stopped at max-connections.
    NbdClientClosed,
    /// An export finished draining after a hard delete.
    ExportDrained(String),
}

/// A handle other threads use to reach the main loop.
#[derive(Clone)]
pub struct MainWaker {
    wake: Arc<EventFd>,
    inbox: Arc<Mutex<Vec<MainMsg>>>,
}

impl MainWaker {
    pub fn send(&self, msg: MainMsg) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.push(msg);
        }
        let _ = self.wake.write(1);
    }
}

struct Chardev {
    listener: UnixListener,
    path: PathBuf,
    in_use: bool,
}

struct MonitorClient {
    stream: UnixStream,
    session: qmp::Session,
    out: Vec<u8>,
    want_write: bool,
}

pub struct Daemon {
    pub schema: Arc<qmp::Schema>,
    pub graph: Graph,
    pub iothreads: BTreeMap<String, IoThread>,
    /// User-created objects other than iothreads: id to qom-type.
    pub objects: BTreeMap<String, String>,
    /// Loaded TLS credentials and authz objects, shared with NBD connection threads.
    pub tls: crate::tls::Registry,
    pub exports: Exports,
    pub nbd: Option<NbdServerState>,
    pub waker: MainWaker,
    pub pidfile: Option<Pidfile>,
    chardevs: HashMap<String, Chardev>,
    /// Monitor listeners by epoll token: the chardev id and `pretty`.
    monitors: HashMap<u64, (String, bool)>,
    clients: HashMap<u64, MonitorClient>,
    epoll_fd: RawFd,
    signal_fd: OwnedFd,
    next_token: u64,
    /// Events raised by the command being run, sent before its reply.
    events: Vec<Value>,
    /// Events that QEMU sends after the reply of the command that raised them.
    late_events: Vec<Value>,
    pub quit: bool,
    /// Quit when the last NBD client disconnects (`blkd nbd` without `-t`).
    pub exit_when_nbd_idle: bool,
}

impl Daemon {
    /// Sets up the loop. Call from the main thread before starting any other
    /// thread, so that every thread inherits the blocked signal mask.
    pub fn new() -> io::Result<Daemon> {
        let schema = qmp::Schema::from_source(include_str!("qapi/schema.json"))
            .map_err(|e| io::Error::other(format!("built-in QMP schema: {e}")))?;
        let signal_fd = block_signals_into_fd()?;
        let epoll_fd = epoll::create(true)?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let daemon = Daemon {
            schema: Arc::new(schema),
            graph: Graph::default(),
            iothreads: BTreeMap::new(),
            objects: BTreeMap::new(),
            tls: crate::tls::Registry::default(),
            exports: Exports::default(),
            nbd: None,
            waker: MainWaker {
                wake,
                inbox: Arc::new(Mutex::new(Vec::new())),
            },
            pidfile: None,
            chardevs: HashMap::new(),
            monitors: HashMap::new(),
            clients: HashMap::new(),
            epoll_fd,
            signal_fd,
            next_token: FIRST_DYNAMIC_TOKEN,
            events: Vec::new(),
            late_events: Vec::new(),
            quit: false,
            exit_when_nbd_idle: false,
        };
        daemon.epoll_add(
            daemon.signal_fd.as_raw_fd(),
            SIGNAL_TOKEN,
            epoll::Events::EPOLLIN,
        )?;
        daemon.epoll_add(
            daemon.waker.wake.as_raw_fd(),
            WAKE_TOKEN,
            epoll::Events::EPOLLIN,
        )?;
        Ok(daemon)
    }

    fn epoll_add(&self, fd: RawFd, token: u64, events: epoll::Events) -> io::Result<()> {
        epoll::ctl(
            self.epoll_fd,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(events, token),
        )
    }

    fn epoll_mod(&self, fd: RawFd, token: u64, events: epoll::Events) {
        let _ = epoll::ctl(
            self.epoll_fd,
            epoll::ControlOptions::EPOLL_CTL_MOD,
            fd,
            epoll::Event::new(events, token),
        );
    }

    fn epoll_del(&self, fd: RawFd) {
        let _ = epoll::ctl(
            self.epoll_fd,
            epoll::ControlOptions::EPOLL_CTL_DEL,
            fd,
            epoll::Event::new(epoll::Events::empty(), 0),
        );
    }

    /// Watches the NBD listener (or stops watching it while at max-connections).
    pub fn watch_nbd_listener(&self, fd: RawFd, watch: bool) {
        if watch {
            let _ = self.epoll_add(fd, NBD_LISTENER_TOKEN, epoll::Events::EPOLLIN);
        } else {
            self.epoll_del(fd);
        }
    }

    /// `--chardev socket,id=X,path=P,server=on,wait=off`.
    pub fn add_chardev(&mut self, opts: &Map<String, Value>) -> Result<(), String> {
        let id = opts
            .get("id")
            .and_then(Value::as_str)
            .ok_or("Parameter 'id' is missing")?
            .to_string();
        let backend = opts.get("backend").and_then(Value::as_str).unwrap_or("");
        if backend != "socket" {
            return Err(format!(
                "chardev backend '{backend}' is not supported (only 'socket' is)"
            ));
        }
        for (key, value) in opts {
            match key.as_str() {
                "id" | "backend" | "path" => {}
                "server" if is_on(value) => {}
                "wait" if !is_on(value) => {}
                "server" => return Err("only server=on sockets are supported".into()),
                "wait" => return Err("wait=on is not supported".into()),
                _ => return Err(format!("Parameter '{key}' is unexpected")),
            }
        }
        if self.chardevs.contains_key(&id) {
            return Err("duplicate yank instance".into());
        }
        let path = opts
            .get("path")
            .and_then(Value::as_str)
            .ok_or("Parameter 'path' is missing")?;
        let listener = bind_unix(path)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("Failed to set socket non-blocking: {e}"))?;
        self.chardevs.insert(
            id,
            Chardev {
                listener,
                path: PathBuf::from(path),
                in_use: false,
            },
        );
        Ok(())
    }

    /// `--monitor [chardev=]X[,mode=control][,pretty=on|off]`.
    pub fn add_monitor(&mut self, opts: &Map<String, Value>) -> Result<(), String> {
        let id = opts
            .get("chardev")
            .and_then(Value::as_str)
            .ok_or("Parameter 'chardev' is missing")?
            .to_string();
        let mut pretty = false;
        for (key, value) in opts {
            match key.as_str() {
                "chardev" | "id" => {}
                "pretty" => pretty = is_on(value),
                "mode" if value.as_str() == Some("control") => {}
                "mode" => return Err("Only QMP is supported".into()),
                _ => return Err(format!("Parameter '{key}' is unexpected")),
            }
        }
        let token = self.next_token;
        let chardev = self
            .chardevs
            .get_mut(&id)
            .ok_or_else(|| format!("chardev \"{id}\" not found"))?;
        if chardev.in_use {
            return Err(format!("Chardev '{id}' is busy"));
        }
        chardev.in_use = true;
        let fd = chardev.listener.as_raw_fd();
        self.next_token += 1;
        self.epoll_add(fd, token, epoll::Events::EPOLLIN)
            .map_err(|e| format!("cannot watch monitor socket: {e}"))?;
        self.monitors.insert(token, (id, pretty));
        Ok(())
    }

    /// Queues an event for every negotiated monitor client, ahead of the reply
    /// to the command being run.
    pub fn emit_event(&mut self, name: &str, data: Option<Value>) {
        log::info!(
            "event {name} {}",
            data.as_ref().map(Value::to_string).unwrap_or_default()
        );
        self.events.push(qmp::event_value(name, data));
    }

    /// Queues an event that goes out right after the current command's reply.
    pub fn emit_event_after_reply(&mut self, name: &str, data: Option<Value>) {
        self.late_events.push(qmp::event_value(name, data));
    }

    /// Runs the main loop until `quit` or a termination signal.
    pub fn run(&mut self) {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 64];
        while !self.quit {
            let n = match epoll::wait(self.epoll_fd, -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("main loop: epoll_wait failed: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                let flags = epoll::Events::from_bits_truncate(ev.events);
                let data = ev.data;
                match data {
                    SIGNAL_TOKEN => self.handle_signal(),
                    WAKE_TOKEN => self.handle_wake(),
                    NBD_LISTENER_TOKEN => self.accept_nbd_clients(),
                    token if self.monitors.contains_key(&token) => self.accept_monitor(token),
                    token => self.serve_monitor_client(token, flags),
                }
                if self.quit {
                    break;
                }
            }
            self.flush_events();
        }
        self.flush_clients_before_exit();
    }

    fn handle_signal(&mut self) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reading into a buffer of the siginfo size from our signalfd.
        let n = unsafe {
            libc::read(
                self.signal_fd.as_raw_fd(),
                info.as_mut_ptr().cast(),
                info.len(),
            )
        };
        if n > 0 {
            log::info!("termination signal received, shutting down");
            self.quit = true;
        }
    }

    fn handle_wake(&mut self) {
        let _ = self.waker.wake.read();
        let msgs = self
            .waker
            .inbox
            .lock()
            .map(|mut inbox| std::mem::take(&mut *inbox))
            .unwrap_or_default();
        for msg in msgs {
            match msg {
                MainMsg::NbdClientClosed => self.nbd_client_closed(),
                MainMsg::ExportDrained(id) => self.export_drained(&id),
            }
        }
    }

    fn accept_monitor(&mut self, listener_token: u64) {
        let Some((chardev, pretty)) = self
            .monitors
            .get(&listener_token)
            .and_then(|(id, pretty)| Some((self.chardevs.get(id)?, *pretty)))
        else {
            return;
        };
        loop {
            let stream = match chardev.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("monitor: accept failed: {e}");
                    break;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            if self
                .epoll_add(stream.as_raw_fd(), token, epoll::Events::EPOLLIN)
                .is_err()
            {
                continue;
            }
            let greeting = qmp::Session::greeting_with(&crate::version_info(), pretty);
            log::debug!("monitor client {token} connected");
            let mut session = qmp::Session::new(Arc::clone(&self.schema));
            session.set_pretty(pretty);
            let mut client = MonitorClient {
                stream,
                session,
                out: greeting,
                want_write: false,
            };
            let alive = self.flush_client(token, &mut client);
            if alive {
                self.clients.insert(token, client);
            }
        }
    }

    fn serve_monitor_client(&mut self, token: u64, flags: epoll::Events) {
        let Some(mut client) = self.clients.remove(&token) else {
            return;
        };
        let mut alive = true;
        if flags
            .intersects(epoll::Events::EPOLLIN | epoll::Events::EPOLLHUP | epoll::Events::EPOLLERR)
        {
            let mut buf = vec![0u8; MONITOR_READ_CHUNK];
            loop {
                match client.stream.read(&mut buf) {
                    Ok(0) => {
                        alive = false;
                        break;
                    }
                    Ok(n) => {
                        let items = client.session.feed(&buf[..n]);
                        for item in items {
                            match item {
                                qmp::SessionItem::Send(bytes) => client.out.extend(bytes),
                                qmp::SessionItem::Command(cmd) => {
                                    let result = self.execute(&cmd.name, cmd.args);
                                    let pretty = client.session.pretty();
                                    let reply =
                                        qmp::encode(&qmp::reply_value(&cmd.id, result), pretty);
                                    // Events raised by the command precede its reply.
                                    let events = std::mem::take(&mut self.events);
                                    for ev in &events {
                                        client.out.extend(qmp::encode(ev, pretty));
                                        self.broadcast(ev);
                                    }
                                    client.out.extend(reply);
                                    let late = std::mem::take(&mut self.late_events);
                                    for ev in &late {
                                        client.out.extend(qmp::encode(ev, pretty));
                                        self.broadcast(ev);
                                    }
                                }
                            }
                        }
                        if self.quit {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        alive = false;
                        break;
                    }
                }
            }
        }
        if !self.flush_client(token, &mut client) {
            alive = false;
        }
        if alive {
            self.clients.insert(token, client);
        } else {
            log::debug!("monitor client {token} disconnected");
            self.epoll_del(client.stream.as_raw_fd());
        }
    }

    /// Sends what the client can take now; watches for writability otherwise.
    /// Returns false when the client is gone.
    fn flush_client(&self, token: u64, client: &mut MonitorClient) -> bool {
        while !client.out.is_empty() {
            match client.stream.write(&client.out) {
                Ok(0) => return false,
                Ok(n) => {
                    client.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        let want_write = !client.out.is_empty();
        if want_write != client.want_write {
            let mut ev = epoll::Events::EPOLLIN;
            if want_write {
                ev |= epoll::Events::EPOLLOUT;
            }
            self.epoll_mod(client.stream.as_raw_fd(), token, ev);
            client.want_write = want_write;
        }
        true
    }

    fn broadcast(&mut self, event: &Value) {
        for client in self.clients.values_mut() {
            if client.session.negotiated() {
                client
                    .out
                    .extend(qmp::encode(event, client.session.pretty()));
            }
        }
    }

    /// Sends events raised outside of a command (a drained export, say).
    fn flush_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        events.append(&mut self.late_events);
        for ev in &events {
            self.broadcast(ev);
        }
        let tokens: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| !c.out.is_empty())
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            if let Some(mut client) = self.clients.remove(&token) {
                if self.flush_client(token, &mut client) {
                    self.clients.insert(token, client);
                } else {
                    self.epoll_del(client.stream.as_raw_fd());
                }
            }
        }
    }

    fn flush_clients_before_exit(&mut self) {
        self.flush_events();
        for client in self.clients.values_mut() {
            let _ = client.stream.set_nonblocking(false);
            let _ = client
                .stream
                .set_write_timeout(Some(std::time::Duration::from_secs(1)));
            let _ = client.stream.write_all(&client.out);
        }
    }

    /// Stops every export and thread and removes the sockets and pidfile we
    /// created.
    pub fn shutdown(&mut self) {
        self.shutdown_exports();
        if let Some(nbd) = self.nbd.take() {
            nbd.stop();
        }
        for (_, thread) in std::mem::take(&mut self.iothreads) {
            thread.stop();
        }
        for chardev in self.chardevs.values() {
            let _ = std::fs::remove_file(&chardev.path);
        }
        self.clients.clear();
        if let Some(pidfile) = self.pidfile.take() {
            pidfile.remove();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: the fd was created by epoll_create in new() and is ours.
        unsafe { libc::close(self.epoll_fd) };
    }
}

fn is_on(value: &Value) -> bool {
    matches!(value, Value::Bool(true)) || matches!(value.as_str(), Some("on" | "yes" | "true"))
}

/// Binds a unix socket, replacing a stale socket file left by an earlier run.
/// The socket is bound under a temporary name beside `path` and renamed into
/// place once it listens, so a client that waits for `path` to appear is never
/// refused (binding in place leaves the file unconnectable until `listen`).
pub fn bind_unix(path: &str) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    let failed =
        |e: &io::Error| format!("Failed to bind socket to {path}: {}", crate::errno_text(e));
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        // Anything else there makes the bind fail; renaming over it must not replace it.
        Ok(_) => return Err(failed(&io::Error::from_raw_os_error(libc::EADDRINUSE))),
        Err(_) => {}
    }
    let staged = format!("{path}.{}.new", std::process::id());
    if let Ok(listener) = UnixListener::bind(&staged) {
        if std::fs::rename(&staged, path).is_ok() {
            return Ok(listener);
        }
        let _ = std::fs::remove_file(&staged);
    }
    // The staged name did not fit (socket paths are short) or could not be moved.
    UnixListener::bind(path).map_err(|e| failed(&e))
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this (and every later) thread and
/// returns a signalfd that receives them. SIGPIPE is ignored: a vanished peer
/// shows up as EPIPE on the write instead.
fn block_signals_into_fd() -> io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a local sigset; the returned fd is checked.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::bind_unix;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_bound_socket_appears_listening_and_replaces_only_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let path = path.to_str().unwrap();
        let first = bind_unix(path).unwrap();
        UnixStream::connect(path).unwrap();
        drop(first);
        // A stale socket is replaced, and the staged name is gone.
        let _second = bind_unix(path).unwrap();
        UnixStream::connect(path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"]);
        // Any other file is left alone, with bind's own error.
        let file = dir.path().join("f");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind_unix(file.to_str().unwrap()).unwrap_err();
        assert!(err.contains("Address already in use"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
