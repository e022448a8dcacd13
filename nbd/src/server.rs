//! The server: export table, client tracking and option negotiation (handshake phase).

use std::collections::HashMap;
use std::io::{self, ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::proto::{self, Cursor};
use crate::transmission::{self, Mode};
use crate::{Error, ExportBackend, ExportConfig, Stream, TlsUpgrade};

/// Server-wide settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// Drop clients that have not finished negotiating after this long (`None`: never).
    /// QEMU's default is 10 seconds.
    pub handshake_timeout: Option<Duration>,
    /// TLS hook; when set, TLS is required before anything but STARTTLS and ABORT.
    pub tls: Option<Arc<dyn TlsUpgrade>>,
    /// Most requests served concurrently per connection (reading stops when reached).
    pub max_in_flight: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Some(Duration::from_secs(10)),
            tls: None,
            max_in_flight: 32,
        }
    }
}

/// How [`Server::remove_export`] treats connected clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect the clients now.
    Hard,
}

type Callback = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Usage {
    clients: usize,
    removed: bool,
    on_gone: Option<Callback>,
}

/// One export as the connections see it.
pub(crate) struct Export {
    pub(crate) config: ExportConfig,
    pub(crate) backend: Arc<dyn ExportBackend>,
    usage: Mutex<Usage>,
}

impl Export {
    /// All metadata contexts, index = context number passed to the backend.
    pub(crate) fn context_name(&self, index: usize) -> Option<&str> {
        match index {
            0 => Some(proto::BASE_ALLOCATION),
            i => self
                .config
                .meta_contexts
                .get(i - 1)
                .map(|c| c.name.as_str()),
        }
    }

    /// The wire id of context `index` (see [`Export::context_name`]).
    pub(crate) fn context_id(&self, index: usize) -> Option<u32> {
        match index {
            0 => Some(0),
            i => self.config.meta_contexts.get(i - 1).map(|c| c.id),
        }
    }

    fn context_count(&self) -> usize {
        1 + self.config.meta_contexts.len()
    }

    /// Transmission flags for a client in `mode` (QSD's choice of flags); `has_contexts`:
    /// metadata contexts are selected for this export.
    pub(crate) fn transmission_flags(&self, mode: Mode, has_contexts: bool) -> u16 {
        let mut flags = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_CACHE;
        if self.config.read_only {
            flags |= proto::FLAG_READ_ONLY;
        } else {
            flags |=
                proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES | proto::FLAG_SEND_FAST_ZERO;
        }
        if self.config.multi_conn {
            flags |= proto::FLAG_CAN_MULTI_CONN;
        }
        if mode != Mode::Simple {
            flags |= proto::FLAG_SEND_DF;
        }
        if mode == Mode::Extended && has_contexts {
            flags |= proto::FLAG_BLOCK_STATUS_PAYLOAD;
        }
        flags
    }

    fn detach(&self) {
        let callback = {
            let mut usage = lock(&self.usage);
            usage.clients = usage.clients.saturating_sub(1);
            if usage.clients == 0 && usage.removed {
                usage.on_gone.take()
            } else {
                None
            }
        };
        if let Some(callback) = callback {
            callback();
        }
    }
}

struct ClientEntry {
    export: Option<Arc<Export>>,
    handle: Box<dyn Stream>,
}

#[derive(Default)]
struct Clients {
    next_id: u64,
    table: HashMap<u64, ClientEntry>,
}

/// An NBD server: the exports and the connected clients. Share it in an `Arc`; the caller
/// accepts connections (on any listener) and passes them to [`Server::serve_client`].
pub struct Server {
    config: ServerConfig,
    exports: Mutex<Vec<Arc<Export>>>,
    clients: Mutex<Clients>,
    shutting_down: AtomicBool,
}

/// Lock a mutex, carrying on if another thread panicked while holding it (the protected data
/// stays consistent: every critical section here is a few assignments).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Server {
    /// A server with no exports.
    pub fn new(config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            config: ServerConfig {
                max_in_flight: config.max_in_flight.max(1),
                ..config
            },
            exports: Mutex::new(Vec::new()),
            clients: Mutex::new(Clients::default()),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Export `backend` under `config.name`.
    pub fn add_export(
        &self,
        config: ExportConfig,
        backend: Arc<dyn ExportBackend>,
    ) -> Result<(), Error> {
        let invalid = |reason: &str| Error::InvalidExport {
            name: config.name.clone(),
            reason: reason.to_string(),
        };
        if config.name.len() > proto::MAX_STRING {
            return Err(invalid("name longer than 4096 bytes"));
        }
        if config
            .description
            .as_ref()
            .is_some_and(|d| d.len() > proto::MAX_STRING)
        {
            return Err(invalid("description longer than 4096 bytes"));
        }
        for (i, c) in config.meta_contexts.iter().enumerate() {
            let reused = config.meta_contexts[..i]
                .iter()
                .any(|earlier| earlier.id == c.id || earlier.name == c.name);
            if c.name.len() > proto::MAX_STRING
                || c.name == proto::BASE_ALLOCATION
                || c.id == 0
                || reused
            {
                return Err(invalid(&format!(
                    "bad extra metadata context '{}' (id {})",
                    c.name, c.id
                )));
            }
        }
        let mut exports = lock(&self.exports);
        if exports.iter().any(|e| e.config.name == config.name) {
            return Err(Error::ExportExists(config.name));
        }
        info!("NBD: adding export '{}'", config.name);
        exports.push(Arc::new(Export {
            config,
            backend,
            usage: Mutex::new(Usage::default()),
        }));
        Ok(())
    }

    /// Stop exporting `name`. `on_gone` runs once no client uses the export any more: at once
    /// if none is connected, else when the last one (disconnected by [`RemoveMode::Hard`])
    /// has finished its in-flight requests.
    pub fn remove_export(
        &self,
        name: &str,
        mode: RemoveMode,
        on_gone: Callback,
    ) -> Result<(), Error> {
        let export = {
            let mut exports = lock(&self.exports);
            let pos = exports
                .iter()
                .position(|e| e.config.name == name)
                .ok_or_else(|| Error::ExportNotFound(name.to_string()))?;
            let export = Arc::clone(&exports[pos]);
            let mut usage = lock(&export.usage);
            if usage.clients > 0 && mode == RemoveMode::Safe {
                return Err(Error::ExportInUse(name.to_string()));
            }
            exports.remove(pos);
            usage.removed = true;
            if usage.clients > 0 {
                usage.on_gone = Some(on_gone);
                drop(usage);
                export
            } else {
                drop(usage);
                drop(exports);
                info!("NBD: removed export '{name}'");
                on_gone();
                return Ok(());
            }
        };
        info!("NBD: removing export '{name}', disconnecting its clients");
        for entry in lock(&self.clients).table.values() {
            if entry
                .export
                .as_ref()
                .is_some_and(|e| Arc::ptr_eq(e, &export))
            {
                let _ = entry.handle.shutdown();
            }
        }
        Ok(())
    }

    /// Names of the exports, in creation order.
    pub fn export_names(&self) -> Vec<String> {
        lock(&self.exports)
            .iter()
            .map(|e| e.config.name.clone())
            .collect()
    }

    /// Clients that have selected export `name` and are still connected.
    pub fn export_client_count(&self, name: &str) -> usize {
        lock(&self.exports)
            .iter()
            .find(|e| e.config.name == name)
            .map_or(0, |e| lock(&e.usage).clients)
    }

    /// Connections currently open (negotiating or transmitting).
    pub fn client_count(&self) -> usize {
        lock(&self.clients).table.len()
    }

    /// Drop every client and refuse new ones (nbd-server-stop). Exports stay registered.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        for entry in lock(&self.clients).table.values() {
            let _ = entry.handle.shutdown();
        }
    }

    /// Serve one accepted connection on its own threads; returns at once. `on_close` runs
    /// when the connection is finished (also when it is refused).
    pub fn serve_client(self: &Arc<Self>, stream: Box<dyn Stream>, on_close: Callback) {
        if self.shutting_down.load(Ordering::SeqCst) {
            let _ = stream.shutdown();
            on_close();
            return;
        }
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                warn!("NBD: cannot duplicate client socket: {e}");
                on_close();
                return;
            }
        };
        let id = {
            let mut clients = lock(&self.clients);
            clients.next_id += 1;
            let id = clients.next_id;
            clients.table.insert(
                id,
                ClientEntry {
                    export: None,
                    handle,
                },
            );
            id
        };
        // Shared so that on_close still runs if the thread cannot be started.
        let on_close = Arc::new(Mutex::new(Some(on_close)));
        let run_close = |on_close: &Mutex<Option<Callback>>| {
            if let Some(callback) = lock(on_close).take() {
                callback();
            }
        };
        let server = Arc::clone(self);
        let thread_close = Arc::clone(&on_close);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-client-{id}"))
            .spawn(move || {
                server.run_client(id, stream);
                server.forget_client(id);
                run_close(&thread_close);
            });
        if let Err(e) = spawned {
            warn!("NBD: cannot start a thread for client {id}: {e}");
            self.forget_client(id);
            run_close(&on_close);
        }
    }

    /// Count client `id` as a user of `export`, unless the export was removed meanwhile.
    /// Done under the export-table lock so that a concurrent safe removal sees the client.
    fn attach(&self, id: u64, export: &Arc<Export>) -> bool {
        let exports = lock(&self.exports);
        if !exports.iter().any(|e| Arc::ptr_eq(e, export)) {
            return false;
        }
        lock(&export.usage).clients += 1;
        if let Some(entry) = lock(&self.clients).table.get_mut(&id) {
            entry.export = Some(Arc::clone(export));
        }
        true
    }

    fn forget_client(&self, id: u64) {
        let entry = lock(&self.clients).table.remove(&id);
        if let Some(export) = entry.and_then(|e| e.export) {
            export.detach();
        }
    }

    fn run_client(&self, id: u64, stream: Box<dyn Stream>) {
        let deadline = self
            .config
            .handshake_timeout
            .filter(|t| !t.is_zero())
            .map(|t| Instant::now() + t);
        let mut negotiation = Negotiation {
            id,
            server: self,
            stream,
            deadline,
            mode: Mode::Simple,
            tls_done: false,
            fixed_newstyle: false,
            no_zeroes: false,
            meta: None,
        };
        let outcome = match negotiation.run() {
            Ok(outcome) => outcome,
            Err(e) => {
                match e.kind() {
                    ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::BrokenPipe => {
                        debug!("NBD client {id}: closed during negotiation: {e}")
                    }
                    _ => warn!("NBD client {id}: option negotiation failed: {e}"),
                }
                return;
            }
        };
        let Some((export, contexts)) = outcome else {
            return;
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let Negotiation { stream, mode, .. } = negotiation;
        if let Err(e) = stream.set_timeout(None) {
            warn!("NBD client {id}: cannot clear the handshake timeout: {e}");
            return;
        }
        let name = export.config.name.clone();
        info!("NBD client {id}: connected to export '{name}' ({mode:?})");
        transmission::run(
            id,
            export,
            stream,
            mode,
            contexts,
            self.config.max_in_flight,
        );
        info!("NBD client {id}: disconnected from export '{name}'");
    }
}

/// Metadata contexts selected by the last SET_META_CONTEXT: export name and (id, index).
type MetaSelection = (String, Vec<usize>);

struct Negotiation<'a> {
    id: u64,
    server: &'a Server,
    stream: Box<dyn Stream>,
    deadline: Option<Instant>,
    mode: Mode,
    tls_done: bool,
    fixed_newstyle: bool,
    no_zeroes: bool,
    meta: Option<MetaSelection>,
}

/// What negotiation ends with: `None` for a clean end without transmission (ABORT).
type Outcome = Option<(Arc<Export>, Vec<usize>)>;

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg.into())
}

/// An export name as QEMU quotes it in a reply: at most 80 bytes, then `...`.
fn sanitized(name: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&name[..name.len().min(80)]).into_owned();
    if name.len() < 80 {
        shown
    } else {
        shown + "..."
    }
}

/// Reads an option's payload the way QEMU does, so that a malformed one gets QEMU's
/// NBD_REP_ERR_INVALID text.
struct OptionReader<'a> {
    option: u32,
    cursor: Cursor<'a>,
}

impl<'a> OptionReader<'a> {
    fn new(option: u32, payload: &'a [u8]) -> Self {
        Self {
            option,
            cursor: Cursor::new(payload),
        }
    }

    fn inconsistent(&self) -> String {
        format!(
            "Inconsistent lengths in option {}",
            proto::option_name(self.option)
        )
    }

    fn u16(&mut self) -> Result<u16, String> {
        self.cursor.u16().ok_or_else(|| self.inconsistent())
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.cursor.u32().ok_or_else(|| self.inconsistent())
    }

    /// `len` bytes of text, which may not hold a NUL.
    fn text(&mut self, len: usize) -> Result<&'a [u8], String> {
        let text = self.cursor.bytes(len).ok_or_else(|| self.inconsistent())?;
        if text.contains(&0) {
            return Err(format!(
                "Unexpected embedded NUL in option {}",
                proto::option_name(self.option)
            ));
        }
        Ok(text)
    }

    /// An export name: a 32-bit length (at most 4096) and the bytes.
    fn name(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()?;
        if len as usize > proto::MAX_STRING {
            return Err(format!("Invalid name length: {len}"));
        }
        self.text(len as usize)
    }

    /// A metadata context query; `None` for one longer than 4096 bytes, which cannot
    /// match and is skipped.
    fn query(&mut self) -> Result<Option<&'a [u8]>, String> {
        let len = self.u32()? as usize;
        if len > proto::MAX_STRING {
            self.cursor.bytes(len).ok_or_else(|| self.inconsistent())?;
            return Ok(None);
        }
        self.text(len).map(Some)
    }

    fn finish(&self) -> Result<(), String> {
        if self.cursor.remaining().is_empty() {
            Ok(())
        } else {
            Err(format!(
                "option '{}' has unexpected length",
                proto::option_name(self.option)
            ))
        }
    }
}

fn handshake_timed_out() -> io::Error {
    io::Error::new(ErrorKind::TimedOut, "handshake timed out")
}

/// Carry on after an interrupted read or write; a timeout is the handshake deadline.
fn timed_out_or(e: io::Error) -> io::Result<()> {
    match e.kind() {
        ErrorKind::Interrupted => Ok(()),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Err(handshake_timed_out()),
        _ => Err(e),
    }
}

impl Negotiation<'_> {
    /// Apply what is left of the handshake time to the next read or write on the stream.
    fn arm_deadline(&mut self) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(handshake_timed_out());
        }
        self.stream.set_timeout(Some(left))
    }

    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            self.arm_deadline()?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) => timed_out_or(e)?,
            }
        }
        Ok(())
    }

    /// Like `write_all`, within the handshake deadline: a client that sends options and
    /// never reads the replies is dropped once the socket buffer is full and time is up.
    fn write_full(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            self.arm_deadline()?;
            match self.stream.write(&buf[done..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) => timed_out_or(e)?,
            }
        }
        Ok(())
    }

    fn reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) -> io::Result<()> {
        self.write_full(&proto::option_reply(option, reply_type, payload))
    }

    fn reply_err(&mut self, option: u32, reply_type: u32, message: &str) -> io::Result<()> {
        debug!("NBD: option {option} refused: {message}");
        self.reply(
            option,
            reply_type,
            proto::truncate_utf8(message, proto::MAX_STRING).as_bytes(),
        )
    }

    fn unexpected_length(&mut self, option: u32) -> io::Result<()> {
        let msg = format!(
            "option '{}' has unexpected length",
            proto::option_name(option)
        );
        self.reply_err(option, proto::REP_ERR_INVALID, &msg)
    }

    fn find_export(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.server.exports)
            .iter()
            .find(|e| e.config.name == name)
            .cloned()
    }

    fn run(&mut self) -> io::Result<Outcome> {
        self.write_full(&proto::greeting())?;
        let mut flags = [0u8; 4];
        self.read_full(&mut flags)?;
        let flags = u32::from_be_bytes(flags);
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if flags & !known != 0 {
            return Err(protocol_error(format!(
                "Unknown client flags {:#x} received",
                flags & !known
            )));
        }
        self.fixed_newstyle = flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
        loop {
            let mut header = [0u8; 16];
            self.read_full(&mut header)?;
            let mut c = Cursor::new(&header);
            let (magic, option, length) = match (c.u64(), c.u32(), c.u32()) {
                (Some(m), Some(o), Some(l)) => (m, o, l),
                _ => return Err(protocol_error("short option header")),
            };
            if magic != proto::IHAVEOPT {
                return Err(protocol_error(format!("Bad magic received: {magic:#x}")));
            }
            if length > proto::MAX_OPTION_LENGTH {
                return Err(protocol_error(format!(
                    "option {option} length {length} is too large"
                )));
            }
            let mut payload = vec![0u8; length as usize];
            self.read_full(&mut payload)?;
            if self.server.shutting_down.load(Ordering::SeqCst) && option != proto::OPT_ABORT {
                self.reply_err(option, proto::REP_ERR_SHUTDOWN, "server shutting down")?;
                return Ok(None);
            }
            if let Some(outcome) = self.option(option, &payload)? {
                return Ok(outcome);
            }
        }
    }

    /// Handle one option; `Some` ends negotiation.
    fn option(&mut self, option: u32, payload: &[u8]) -> io::Result<Option<Outcome>> {
        if !self.fixed_newstyle && option != proto::OPT_EXPORT_NAME {
            return Err(protocol_error(format!(
                "Unsupported option {option} ({}) from a client without fixed newstyle",
                proto::option_name(option)
            )));
        }
        let tls_required = self.server.config.tls.is_some() && !self.tls_done;
        if tls_required && !matches!(option, proto::OPT_STARTTLS | proto::OPT_ABORT) {
            if option == proto::OPT_EXPORT_NAME {
                return Err(protocol_error("Option 0x1 not permitted before TLS"));
            }
            let msg = format!("Option {option:#x} not permitted before TLS");
            self.reply_err(option, proto::REP_ERR_TLS_REQD, &msg)?;
            return Ok(None);
        }
        match option {
            proto::OPT_EXPORT_NAME => self.export_name(payload).map(Some),
            proto::OPT_ABORT => {
                // The client may not wait for the ACK; a failed write is fine.
                let _ = self.reply(option, proto::REP_ACK, &[]);
                Ok(Some(None))
            }
            proto::OPT_LIST => {
                if !payload.is_empty() {
                    self.unexpected_length(option)?;
                    return Ok(None);
                }
                let exports: Vec<Arc<Export>> = lock(&self.server.exports).clone();
                for e in exports {
                    let mut b = Vec::new();
                    proto::put_string32(&mut b, &e.config.name);
                    b.extend_from_slice(e.config.description.as_deref().unwrap_or("").as_bytes());
                    self.reply(option, proto::REP_SERVER, &b)?;
                }
                self.reply(option, proto::REP_ACK, &[])?;
                Ok(None)
            }
            proto::OPT_STARTTLS => self.starttls(payload).map(|()| None),
            proto::OPT_INFO | proto::OPT_GO => self.info_go(option, payload),
            proto::OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    self.unexpected_length(option)?;
                } else if self.mode == Mode::Extended {
                    self.reply_err(
                        option,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )?;
                } else if self.mode == Mode::Structured {
                    self.reply_err(
                        option,
                        proto::REP_ERR_INVALID,
                        "structured reply already negotiated",
                    )?;
                } else {
                    self.reply(option, proto::REP_ACK, &[])?;
                    self.mode = Mode::Structured;
                }
                Ok(None)
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !payload.is_empty() {
                    self.unexpected_length(option)?;
                } else if self.mode == Mode::Extended {
                    self.reply_err(
                        option,
                        proto::REP_ERR_INVALID,
                        "extended headers already negotiated",
                    )?;
                } else {
                    self.reply(option, proto::REP_ACK, &[])?;
                    self.mode = Mode::Extended;
                }
                Ok(None)
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                self.meta_context(option, payload).map(|()| None)
            }
            _ => {
                let msg = format!(
                    "Unsupported option {option} ({})",
                    proto::option_name(option)
                );
                self.reply_err(option, proto::REP_ERR_UNSUP, &msg)?;
                Ok(None)
            }
        }
    }

    fn starttls(&mut self, payload: &[u8]) -> io::Result<()> {
        let option = proto::OPT_STARTTLS;
        if !payload.is_empty() {
            self.unexpected_length(option)?;
            // Before TLS a client that cannot start it correctly is not worth keeping (QEMU).
            if self.server.config.tls.is_some() && !self.tls_done {
                return Err(protocol_error("option 'starttls' has unexpected length"));
            }
            return Ok(());
        }
        let Some(tls) = self.server.config.tls.clone() else {
            return self.reply_err(option, proto::REP_ERR_POLICY, "TLS not configured");
        };
        if self.tls_done {
            return self.reply_err(option, proto::REP_ERR_INVALID, "TLS already enabled");
        }
        self.reply(option, proto::REP_ACK, &[])?;
        // The TLS handshake is bounded by the remaining handshake time too.
        self.arm_deadline()?;
        let plain = self.stream.try_clone()?;
        self.stream = tls.upgrade(plain)?;
        // Everything negotiated in the clear is void after STARTTLS.
        self.tls_done = true;
        self.mode = Mode::Simple;
        self.meta = None;
        Ok(())
    }

    fn export_name(&mut self, payload: &[u8]) -> io::Result<Outcome> {
        if self.mode == Mode::Extended {
            return Err(protocol_error(
                "Extended headers already negotiated, did client ignore reply?",
            ));
        }
        let name =
            std::str::from_utf8(payload).map_err(|_| protocol_error("export name is not UTF-8"))?;
        let Some(export) = self.find_export(name) else {
            return Err(protocol_error(format!(
                "export not found: '{}'",
                name.escape_debug()
            )));
        };
        let mut b = Vec::with_capacity(10 + 124);
        b.extend_from_slice(&export.backend.size().to_be_bytes());
        let has_contexts = self.has_contexts(name);
        b.extend_from_slice(
            &export
                .transmission_flags(self.mode, has_contexts)
                .to_be_bytes(),
        );
        if !self.no_zeroes {
            b.extend_from_slice(&[0u8; 124]);
        }
        if !self.server.attach(self.id, &export) {
            return Err(protocol_error(format!("export '{name}' was removed")));
        }
        self.write_full(&b)?;
        let contexts = self.selected_contexts(name);
        Ok(Some((export, contexts)))
    }

    fn has_contexts(&self, name: &str) -> bool {
        self.meta
            .as_ref()
            .is_some_and(|(n, c)| n == name && !c.is_empty())
    }

    fn selected_contexts(&mut self, name: &str) -> Vec<usize> {
        match self.meta.take() {
            Some((meta_name, contexts)) if meta_name == name => contexts,
            _ => Vec::new(),
        }
    }

    fn info_go(&mut self, option: u32, payload: &[u8]) -> io::Result<Option<Outcome>> {
        let mut r = OptionReader::new(option, payload);
        let parsed = (|| -> Result<_, String> {
            let name = r.name()?;
            let count = r.u16()?;
            let requests = (0..count).map(|_| r.u16()).collect::<Result<Vec<_>, _>>()?;
            r.finish()?;
            Ok((name, requests))
        })();
        let (name, requests) = match parsed {
            Ok(parsed) => parsed,
            Err(msg) => {
                self.reply_err(option, proto::REP_ERR_INVALID, &msg)?;
                return Ok(None);
            }
        };
        let Ok(name) = std::str::from_utf8(name) else {
            let msg = format!("export '{}' not present", sanitized(name));
            self.reply_err(option, proto::REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        let Some(export) = self.find_export(name) else {
            let msg = format!("export '{name}' not present");
            self.reply_err(option, proto::REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        if requests.contains(&proto::INFO_NAME) {
            let mut b = proto::INFO_NAME.to_be_bytes().to_vec();
            b.extend_from_slice(export.config.name.as_bytes());
            self.reply(option, proto::REP_INFO, &b)?;
        }
        // Sent whenever there is one, asked for or not, as QEMU does.
        if let Some(desc) = &export.config.description {
            let mut b = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
            b.extend_from_slice(desc.as_bytes());
            self.reply(option, proto::REP_INFO, &b)?;
        }
        let sizes = proto::info_block_size(
            proto::MIN_BLOCK_SIZE,
            proto::PREFERRED_BLOCK_SIZE,
            proto::MAX_PAYLOAD,
        );
        self.reply(option, proto::REP_INFO, &sizes)?;
        let flags = export.transmission_flags(self.mode, self.has_contexts(name));
        self.reply(
            option,
            proto::REP_INFO,
            &proto::info_export(export.backend.size(), flags),
        )?;
        if option == proto::OPT_GO && !self.server.attach(self.id, &export) {
            let msg = format!("export '{name}' not present");
            self.reply_err(option, proto::REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        }
        self.reply(option, proto::REP_ACK, &[])?;
        if option == proto::OPT_INFO {
            return Ok(None);
        }
        let contexts = self.selected_contexts(name);
        Ok(Some(Some((export, contexts))))
    }

    fn meta_context(&mut self, option: u32, payload: &[u8]) -> io::Result<()> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // Any SET, even a failing one, replaces the previous selection.
            self.meta = None;
            if self.mode == Mode::Simple {
                let msg =
                    "request option 'set meta context' when structured reply is not negotiated";
                return self.reply_err(option, proto::REP_ERR_INVALID, msg);
            }
        }
        // As QEMU reads it: the export is looked up before the queries are.
        let mut r = OptionReader::new(option, payload);
        let name = match r.name() {
            Ok(name) => name,
            Err(msg) => return self.reply_err(option, proto::REP_ERR_INVALID, &msg),
        };
        let export = std::str::from_utf8(name)
            .ok()
            .and_then(|name| self.find_export(name));
        let Some(export) = export else {
            let msg = format!("export '{}' not present", sanitized(name));
            return self.reply_err(option, proto::REP_ERR_UNKNOWN, &msg);
        };
        let name = export.config.name.clone();
        let parsed = (|| -> Result<_, String> {
            let count = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                queries.extend(r.query()?);
            }
            r.finish()?;
            Ok((queries, count == 0))
        })();
        let (queries, no_queries) = match parsed {
            Ok(parsed) => parsed,
            Err(msg) => return self.reply_err(option, proto::REP_ERR_INVALID, &msg),
        };
        let mut selected = Vec::new();
        for index in 0..export.context_count() {
            let (Some(context), Some(context_id)) =
                (export.context_name(index), export.context_id(index))
            else {
                continue;
            };
            let matches = |q: &&[u8]| {
                q == &context.as_bytes()
                    || (!set && q.ends_with(b":") && context.as_bytes().starts_with(q))
            };
            if (!set && no_queries) || queries.iter().any(matches) {
                let id = if set { context_id } else { 0 };
                let mut b = id.to_be_bytes().to_vec();
                b.extend_from_slice(context.as_bytes());
                self.reply(option, proto::REP_META_CONTEXT, &b)?;
                selected.push(index);
            }
        }
        self.reply(option, proto::REP_ACK, &[])?;
        if set {
            self.meta = Some((name, selected));
        }
        Ok(())
    }
}
