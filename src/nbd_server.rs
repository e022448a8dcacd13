//! The daemon side of the NBD server: the listening socket (served by the main
//! loop), max-connections, TLS settings, and `nbd-server-start`/`-stop`.

use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::daemon::{Daemon, MainMsg};

pub enum Listener {
    Unix {
        listener: UnixListener,
        path: Option<PathBuf>,
    },
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<Box<dyn nbd::Stream>> {
        match self {
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                grow_send_buffer(s.as_raw_fd());
                Ok(Box::new(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                // TCP tunes its own buffers; a fixed size measured slower.
                Ok(Box::new(s))
            }
        }
    }
}

/// Room for a whole 1 MiB reply and more in a unix socket, so that large
/// reads do not wake the writer for every 200 KiB (the default); measured
/// with scripts/bench.sh: 1M reads over unix went from 0.93x to 1.65x the
/// best peer. The kernel caps it at net.core.wmem_max; failure only costs
/// speed.
fn grow_send_buffer(fd: RawFd) {
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt reads one c_int from a valid pointer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A running NBD server.
pub struct NbdServerState {
    pub server: Arc<nbd::Server>,
    listener: Listener,
    /// 0 means unlimited.
    max_connections: u32,
    connections: u32,
    accepting: bool,
    pub tls_creds: Option<String>,
    pub tls_authz: Option<String>,
}

impl NbdServerState {
    /// Whether exports may advertise multi-conn (QEMU: not when only one
    /// connection is allowed).
    pub fn multi_conn(&self) -> bool {
        self.max_connections != 1
    }

    /// Drops every client and removes our socket file.
    pub fn stop(self) {
        self.server.shutdown();
        if let Listener::Unix {
            path: Some(path), ..
        } = &self.listener
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Turns QMP's `SocketAddressLegacy` (`{type, data: {...}}`) into the flat
/// `SocketAddress` the command line uses.
fn flatten_address(addr: &Map<String, Value>) -> Map<String, Value> {
    match addr.get("data") {
        Some(Value::Object(data)) => {
            let mut flat = data.clone();
            if let Some(t) = addr.get("type") {
                flat.insert("type".into(), t.clone());
            }
            flat
        }
        _ => addr.clone(),
    }
}

fn bind(addr: &Map<String, Value>) -> Result<Listener, String> {
    let get = |k: &str| addr.get(k).and_then(Value::as_str).unwrap_or("");
    match get("type") {
        "unix" => {
            let path = get("path");
            let listener = crate::daemon::bind_unix(path)?;
            Ok(Listener::Unix {
                listener,
                path: Some(PathBuf::from(path)),
            })
        }
        "inet" => {
            let host = get("host");
            let port = get("port");
            let resolve_failed =
                |why: &str| format!("address resolution failed for {host}:{port}: {why}");
            let port_number = match port.parse::<u32>() {
                Ok(n) => u16::try_from(n).map_err(|_| format!("Failed to parse port '{port}'"))?,
                // getaddrinfo's text, which QEMU passes on.
                Err(_) => return Err(resolve_failed("Servname not supported for ai_socktype")),
            };
            let addrs: Vec<_> = (host, port_number)
                .to_socket_addrs()
                .map_err(|e| {
                    // std prefixes getaddrinfo's own text, which is what QEMU shows.
                    let text = e.to_string();
                    let gai = text
                        .strip_prefix("failed to lookup address information: ")
                        .unwrap_or(&text);
                    resolve_failed(gai)
                })?
                .collect();
            let mut last = None;
            for a in addrs {
                match TcpListener::bind(a) {
                    Ok(l) => return Ok(Listener::Tcp(l)),
                    Err(e) => last = Some(e),
                }
            }
            Err(format!(
                "Failed to find an available port: {}",
                last.map(|e| crate::errno_text(&e))
                    .unwrap_or_else(|| "no address".into())
            ))
        }
        "fd" => {
            let s = get("str");
            let fd: RawFd = s
                .parse()
                .map_err(|_| "only QEMU supports file descriptor passing".to_string())?;
            listener_from_fd(fd)
        }
        other => Err(format!("Parameter 'type' does not accept value '{other}'")),
    }
}

/// Takes an inherited listening socket by number.
pub fn listener_from_fd(fd: RawFd) -> Result<Listener, String> {
    let not_socket = || format!("File descriptor '{fd}' is not a socket");
    // SAFETY: sockaddr_storage is plain data; getsockname writes at most its size.
    let family = unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return Err(not_socket());
        }
        i32::from(storage.ss_family)
    };
    // SAFETY: the fd is an open socket handed to us, now owned by the listener.
    unsafe {
        match family {
            libc::AF_UNIX => Ok(Listener::Unix {
                listener: UnixListener::from_raw_fd(fd),
                path: None,
            }),
            libc::AF_INET | libc::AF_INET6 => Ok(Listener::Tcp(TcpListener::from_raw_fd(fd))),
            _ => Err(not_socket()),
        }
    }
}

impl Daemon {
    /// `nbd-server-start` over QMP (legacy address form).
    pub fn nbd_server_start_qmp(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let mut args = args.clone();
        if let Some(Value::Object(addr)) = args.get("addr") {
            let flat = flatten_address(addr);
            args.insert("addr".into(), Value::Object(flat));
        }
        self.nbd_server_start(&args)
    }

    /// `--nbd-server` and `nbd-server-start`, with a flat `addr`.
    pub fn nbd_server_start(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        if self.nbd.is_some() {
            return Err("NBD server already running".into());
        }
        let tls_creds = args
            .get("tls-creds")
            .and_then(Value::as_str)
            .map(str::to_string);
        let tls_authz = args
            .get("tls-authz")
            .and_then(Value::as_str)
            .map(str::to_string);
        let tls = match &tls_creds {
            Some(id) => Some(crate::tls::server_upgrade(self, id, tls_authz.as_deref())?),
            None => None,
        };
        let addr = match args.get("addr") {
            Some(Value::Object(a)) => a.clone(),
            _ => return Err("Parameter 'addr' is missing".into()),
        };
        let listener = bind(&addr)?;
        if let Err(e) = set_nonblocking(listener.fd()) {
            return Err(format!("cannot use the NBD socket: {e}"));
        }
        let handshake = args
            .get("handshake-max-seconds")
            .and_then(Value::as_u64)
            .unwrap_or(10);
        let server = nbd::Server::new(nbd::ServerConfig {
            handshake_timeout: (handshake > 0).then(|| Duration::from_secs(handshake)),
            tls,
            ..nbd::ServerConfig::default()
        });
        let max_connections = args
            .get("max-connections")
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32;
        self.watch_nbd_listener(listener.fd(), true);
        log::info!("NBD server listening on {}", Value::Object(addr));
        self.nbd = Some(NbdServerState {
            server,
            listener,
            max_connections,
            connections: 0,
            accepting: true,
            tls_creds,
            tls_authz,
        });
        Ok(())
    }

    /// `nbd-server-stop`: every NBD export goes, with its event, before the reply.
    pub fn nbd_server_stop(&mut self) -> Result<(), String> {
        let Some(state) = self.nbd.take() else {
            return Err("NBD server not running".into());
        };
        self.watch_nbd_listener(state.listener.fd(), false);
        for id in self.exports.nbd_export_ids() {
            self.exports.remove(&id);
            self.emit_event("BLOCK_EXPORT_DELETED", Some(json!({ "id": id })));
        }
        self.prune_graph();
        state.stop();
        Ok(())
    }

    /// Accepts waiting clients until none is left or max-connections is reached.
    pub fn accept_nbd_clients(&mut self) {
        let waker = self.waker.clone();
        let Some(state) = self.nbd.as_mut() else {
            return;
        };
        loop {
            if state.max_connections > 0 && state.connections >= state.max_connections {
                // Further clients wait in the listen backlog, as with QSD.
                if state.accepting {
                    state.accepting = false;
                    let fd = state.listener.fd();
                    self.watch_nbd_listener(fd, false);
                }
                return;
            }
            match state.listener.accept() {
                Ok(stream) => {
                    state.connections += 1;
                    let waker = waker.clone();
                    state.server.serve_client(
                        stream,
                        Box::new(move || waker.send(MainMsg::NbdClientClosed)),
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("NBD server: accept failed: {e}");
                    return;
                }
            }
        }
    }

    pub fn nbd_client_closed(&mut self) {
        let Some(state) = self.nbd.as_mut() else {
            return;
        };
        state.connections = state.connections.saturating_sub(1);
        if state.connections == 0 && self.exit_when_nbd_idle {
            self.quit = true;
            return;
        }
        if !state.accepting {
            state.accepting = true;
            let fd = state.listener.fd();
            self.watch_nbd_listener(fd, true);
            self.accept_nbd_clients();
        }
    }

    /// The NBD server setting that names object `id`, if any.
    pub fn nbd_object_user(&self, id: &str) -> Option<String> {
        let state = self.nbd.as_ref()?;
        if state.tls_creds.as_deref() == Some(id) {
            return Some("the NBD server (tls-creds)".into());
        }
        if state.tls_authz.as_deref() == Some(id) {
            return Some("the NBD server (tls-authz)".into());
        }
        None
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
