//! A synchronous NBD client: fixed newstyle negotiation (optionally with structured replies
//! or extended headers and metadata contexts) and every transmission command. Requests can be
//! pipelined with [`Client::send_request`] / [`Client::receive_reply`].

use std::collections::HashMap;
use std::io::Write;

use crate::proto::{self, Cursor, Extent, ReplyHeader, RequestHeader};
use crate::{Error, Stream};

type Result<T> = std::result::Result<T, Error>;

fn protocol(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

/// One reply to an option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// `REP_*` reply type.
    pub reply_type: u32,
    /// Reply payload.
    pub payload: Vec<u8>,
}

impl OptionReply {
    /// The payload as text (error messages).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// What the server said about an export (NBD_OPT_INFO / GO / EXPORT_NAME).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::FLAG_*`).
    pub flags: u16,
    /// NBD_INFO_NAME, if sent.
    pub name: Option<String>,
    /// NBD_INFO_DESCRIPTION, if sent.
    pub description: Option<String>,
    /// NBD_INFO_BLOCK_SIZE (minimum, preferred, maximum), if sent.
    pub block_sizes: Option<(u32, u32, u32)>,
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = Vec::new();
    proto::put_string32(&mut p, name);
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        proto::put_string32(&mut p, q);
    }
    p
}

/// The negotiation phase. Finish with [`Handshake::go`], [`Handshake::export_name`] or
/// [`Handshake::abort`].
pub struct Handshake {
    stream: Box<dyn Stream>,
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, String)>,
    no_zeroes: bool,
}

impl Handshake {
    /// Read the greeting and reply with FIXED_NEWSTYLE | NO_ZEROES.
    pub fn start(stream: Box<dyn Stream>) -> Result<Self> {
        Self::start_with_flags(
            stream,
            proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
        )
    }

    /// Read the greeting and reply with the given client flags.
    pub fn start_with_flags(mut stream: Box<dyn Stream>, client_flags: u32) -> Result<Self> {
        let mut g = [0u8; 18];
        stream.read_exact(&mut g)?;
        let mut c = Cursor::new(&g);
        if c.u64() != Some(proto::NBDMAGIC) || c.u64() != Some(proto::IHAVEOPT) {
            return Err(protocol("not a newstyle NBD server greeting"));
        }
        let server_flags = c.u16().unwrap_or(0);
        if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server does not support fixed newstyle"));
        }
        stream.write_all(&client_flags.to_be_bytes())?;
        Ok(Self {
            stream,
            structured: false,
            extended: false,
            contexts: Vec::new(),
            no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0
                && server_flags & proto::FLAG_NO_ZEROES != 0,
        })
    }

    /// Send a raw option and collect its replies up to the final one (ACK or an error).
    pub fn option(&mut self, option: u32, payload: &[u8]) -> Result<Vec<OptionReply>> {
        self.stream
            .write_all(&proto::option_request(option, payload))?;
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.stream.read_exact(&mut h)?;
            let mut c = Cursor::new(&h);
            let (magic, opt, reply_type, len) = (c.u64(), c.u32(), c.u32(), c.u32());
            if magic != Some(proto::REPLY_MAGIC) || opt != Some(option) {
                return Err(protocol(format!("bad reply to option {option}")));
            }
            let (reply_type, len) = (reply_type.unwrap_or(0), len.unwrap_or(0));
            if len > proto::MAX_OPTION_LENGTH {
                return Err(protocol(format!("option reply of {len} bytes")));
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload)?;
            let last = reply_type == proto::REP_ACK || reply_type & proto::REP_FLAG_ERROR != 0;
            replies.push(OptionReply {
                reply_type,
                payload,
            });
            if last {
                return Ok(replies);
            }
        }
    }

    /// Like [`Handshake::option`] but an error reply becomes `Err`.
    fn option_ok(&mut self, option: u32, payload: &[u8]) -> Result<Vec<OptionReply>> {
        let mut replies = self.option(option, payload)?;
        match replies.last() {
            Some(r) if r.reply_type & proto::REP_FLAG_ERROR != 0 => Err(Error::OptionRefused {
                option,
                reply_type: r.reply_type,
                message: r.text(),
            }),
            _ => {
                replies.pop();
                Ok(replies)
            }
        }
    }

    /// NBD_OPT_STRUCTURED_REPLY.
    pub fn structured_replies(&mut self) -> Result<()> {
        self.option_ok(proto::OPT_STRUCTURED_REPLY, &[])?;
        self.structured = true;
        Ok(())
    }

    /// NBD_OPT_EXTENDED_HEADERS.
    pub fn extended_headers(&mut self) -> Result<()> {
        self.option_ok(proto::OPT_EXTENDED_HEADERS, &[])?;
        self.extended = true;
        Ok(())
    }

    /// NBD_OPT_LIST: (name, description) of every export.
    pub fn list(&mut self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for r in self.option_ok(proto::OPT_LIST, &[])? {
            let mut c = Cursor::new(&r.payload);
            let len = c.u32().ok_or_else(|| protocol("short LIST reply"))? as usize;
            let name = c.bytes(len).ok_or_else(|| protocol("short LIST reply"))?;
            out.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(c.remaining()).into_owned(),
            ));
        }
        Ok(out)
    }

    /// NBD_OPT_INFO for `name`, asking for the given NBD_INFO items.
    pub fn info(&mut self, name: &str, requests: &[u16]) -> Result<ExportInfo> {
        self.info_go(proto::OPT_INFO, name, requests)
    }

    fn info_go(&mut self, option: u32, name: &str, requests: &[u16]) -> Result<ExportInfo> {
        let mut p = Vec::new();
        proto::put_string32(&mut p, name);
        p.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            p.extend_from_slice(&r.to_be_bytes());
        }
        let mut info = ExportInfo::default();
        let mut got_export = false;
        for r in self.option_ok(option, &p)? {
            if r.reply_type != proto::REP_INFO {
                continue;
            }
            let mut c = Cursor::new(&r.payload);
            match c.u16() {
                Some(proto::INFO_EXPORT) => {
                    info.size = c.u64().ok_or_else(|| protocol("short INFO_EXPORT"))?;
                    info.flags = c.u16().ok_or_else(|| protocol("short INFO_EXPORT"))?;
                    got_export = true;
                }
                Some(proto::INFO_NAME) => {
                    info.name = Some(String::from_utf8_lossy(c.remaining()).into_owned())
                }
                Some(proto::INFO_DESCRIPTION) => {
                    info.description = Some(String::from_utf8_lossy(c.remaining()).into_owned())
                }
                Some(proto::INFO_BLOCK_SIZE) => {
                    info.block_sizes = match (c.u32(), c.u32(), c.u32()) {
                        (Some(a), Some(b), Some(m)) => Some((a, b, m)),
                        _ => return Err(protocol("short INFO_BLOCK_SIZE")),
                    }
                }
                _ => {}
            }
        }
        if !got_export {
            return Err(protocol("server sent no NBD_INFO_EXPORT"));
        }
        Ok(info)
    }

    fn meta(&mut self, option: u32, name: &str, queries: &[&str]) -> Result<Vec<(u32, String)>> {
        let mut out = Vec::new();
        for r in self.option_ok(option, &meta_payload(name, queries))? {
            let mut c = Cursor::new(&r.payload);
            let id = c
                .u32()
                .ok_or_else(|| protocol("short META_CONTEXT reply"))?;
            out.push((id, String::from_utf8_lossy(c.remaining()).into_owned()));
        }
        Ok(out)
    }

    /// NBD_OPT_LIST_META_CONTEXT.
    pub fn list_meta_contexts(
        &mut self,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>> {
        self.meta(proto::OPT_LIST_META_CONTEXT, name, queries)
    }

    /// NBD_OPT_SET_META_CONTEXT; the selection is used by the following GO for `name`.
    pub fn set_meta_contexts(
        &mut self,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>> {
        let set = self.meta(proto::OPT_SET_META_CONTEXT, name, queries)?;
        self.contexts = set.clone();
        Ok(set)
    }

    /// NBD_OPT_GO: enter transmission on `name`.
    pub fn go(mut self, name: &str) -> Result<Client> {
        let info = self.info_go(proto::OPT_GO, name, &[proto::INFO_BLOCK_SIZE])?;
        Ok(self.into_client(info))
    }

    /// NBD_OPT_EXPORT_NAME (old-style selection without error replies).
    pub fn export_name(mut self, name: &str) -> Result<Client> {
        self.stream.write_all(&proto::option_request(
            proto::OPT_EXPORT_NAME,
            name.as_bytes(),
        ))?;
        let mut b = [0u8; 10];
        self.stream.read_exact(&mut b)?;
        if !self.no_zeroes {
            let mut zeroes = [0u8; 124];
            self.stream.read_exact(&mut zeroes)?;
        }
        let mut c = Cursor::new(&b);
        let info = ExportInfo {
            size: c.u64().unwrap_or(0),
            flags: c.u16().unwrap_or(0),
            ..ExportInfo::default()
        };
        Ok(self.into_client(info))
    }

    /// NBD_OPT_ABORT and close.
    pub fn abort(mut self) -> Result<()> {
        self.option_ok(proto::OPT_ABORT, &[])?;
        let _ = self.stream.shutdown();
        Ok(())
    }

    /// The underlying stream (for tests that continue by hand).
    pub fn into_stream(self) -> Box<dyn Stream> {
        self.stream
    }

    fn into_client(self, info: ExportInfo) -> Client {
        Client {
            stream: self.stream,
            structured: self.structured || self.extended,
            extended: self.extended,
            info,
            contexts: self.contexts,
            next_cookie: 1,
            pending: HashMap::new(),
        }
    }
}

/// A completed reply to one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Cookie of the request.
    pub cookie: u64,
    /// NBD error number and message (message empty for simple replies); `None` on success.
    pub error: Option<(u32, String)>,
    /// READ data, holes filled with zeroes.
    pub data: Vec<u8>,
    /// Block status per context id, in the order received.
    pub block_status: Vec<(u32, Vec<Extent>)>,
    /// Types of the structured chunks received (empty for a simple reply).
    pub chunk_types: Vec<u16>,
}

struct Pending {
    command: u16,
    offset: u64,
    length: u64,
    reply: Reply,
}

/// A client in the transmission phase.
pub struct Client {
    stream: Box<dyn Stream>,
    structured: bool,
    extended: bool,
    info: ExportInfo,
    contexts: Vec<(u32, String)>,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
}

impl Client {
    /// Connect with structured replies (and extended headers if `extended`), select the given
    /// metadata contexts and GO to `name`.
    pub fn connect(
        stream: Box<dyn Stream>,
        name: &str,
        extended: bool,
        contexts: &[&str],
    ) -> Result<Self> {
        let mut h = Handshake::start(stream)?;
        if extended {
            h.extended_headers()?;
        } else {
            h.structured_replies()?;
        }
        if !contexts.is_empty() {
            h.set_meta_contexts(name, contexts)?;
        }
        h.go(name)
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Metadata contexts selected (id, name).
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    /// Whether extended headers are in use.
    pub fn extended(&self) -> bool {
        self.extended
    }

    /// Send one request without waiting; returns its cookie. `payload` goes after the header
    /// (WRITE data); in extended mode a payload sets PAYLOAD_LEN and `length` is ignored.
    pub fn send_request(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let (flags, length) = if !payload.is_empty() {
            let f = if self.extended {
                flags | proto::CMD_FLAG_PAYLOAD_LEN
            } else {
                flags
            };
            (f, payload.len() as u64)
        } else {
            (flags, length)
        };
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        if self.extended {
            self.stream.write_all(&h.encode_extended())?;
        } else {
            if length > u64::from(u32::MAX) {
                return Err(protocol(format!("length {length} needs extended headers")));
            }
            self.stream.write_all(&h.encode_compact())?;
        }
        self.stream.write_all(payload)?;
        if command != proto::CMD_DISC {
            self.pending.insert(
                cookie,
                Pending {
                    command,
                    offset,
                    length,
                    reply: Reply {
                        cookie,
                        ..Reply::default()
                    },
                },
            );
        }
        Ok(cookie)
    }

    /// Wait for the next request to complete (in whatever order the server answers).
    pub fn receive_reply(&mut self) -> Result<Reply> {
        loop {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic)?;
            let size = ReplyHeader::size_for_magic(u32::from_be_bytes(magic))
                .ok_or_else(|| protocol(format!("bad reply magic {magic:02x?}")))?;
            let mut h = vec![0u8; size];
            h[..4].copy_from_slice(&magic);
            self.stream.read_exact(&mut h[4..])?;
            match ReplyHeader::decode(&h).ok_or_else(|| protocol("bad reply header"))? {
                ReplyHeader::Simple { error, cookie } => {
                    let mut p = self
                        .pending
                        .remove(&cookie)
                        .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie}")))?;
                    if error != 0 {
                        p.reply.error = Some((error, String::new()));
                    } else if p.command == proto::CMD_READ {
                        p.reply.data = vec![0u8; p.length as usize];
                        self.stream.read_exact(&mut p.reply.data)?;
                    }
                    return Ok(p.reply);
                }
                ReplyHeader::Chunk {
                    flags,
                    chunk_type,
                    cookie,
                    length,
                    ..
                } => {
                    if length > u64::from(proto::MAX_PAYLOAD) + 1024 * 1024 {
                        return Err(protocol(format!("chunk of {length} bytes")));
                    }
                    let mut payload = vec![0u8; length as usize];
                    self.stream.read_exact(&mut payload)?;
                    let extended = self.extended;
                    let p = self
                        .pending
                        .get_mut(&cookie)
                        .ok_or_else(|| protocol(format!("chunk for unknown cookie {cookie}")))?;
                    Self::apply_chunk(p, chunk_type, &payload, extended)?;
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        if let Some(p) = self.pending.remove(&cookie) {
                            return Ok(p.reply);
                        }
                    }
                }
            }
        }
    }

    fn apply_chunk(p: &mut Pending, chunk_type: u16, payload: &[u8], extended: bool) -> Result<()> {
        p.reply.chunk_types.push(chunk_type);
        let mut c = Cursor::new(payload);
        let short = || protocol(format!("short chunk of type {chunk_type}"));
        if p.command == proto::CMD_READ && p.reply.data.len() as u64 != p.length {
            p.reply.data = vec![0u8; p.length as usize];
        }
        match chunk_type {
            proto::REPLY_TYPE_NONE => {}
            proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE => {
                let offset = c.u64().ok_or_else(short)?;
                let len = if chunk_type == proto::REPLY_TYPE_OFFSET_HOLE {
                    u64::from(c.u32().ok_or_else(short)?)
                } else {
                    c.remaining().len() as u64
                };
                let start = offset
                    .checked_sub(p.offset)
                    .filter(|s| s.checked_add(len).is_some_and(|e| e <= p.length))
                    .ok_or_else(|| {
                        protocol(format!("read chunk {offset}+{len} outside the request"))
                    })? as usize;
                let target = &mut p.reply.data[start..start + len as usize];
                if chunk_type == proto::REPLY_TYPE_OFFSET_DATA {
                    target.copy_from_slice(c.remaining());
                } else {
                    target.fill(0);
                }
            }
            proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
                let id = c.u32().ok_or_else(short)?;
                let mut extents = Vec::new();
                if chunk_type == proto::REPLY_TYPE_BLOCK_STATUS_EXT {
                    if !extended {
                        return Err(protocol("64-bit block status without extended headers"));
                    }
                    let count = c.u32().ok_or_else(short)?;
                    for _ in 0..count {
                        let length = c.u64().ok_or_else(short)?;
                        let flags = c.u64().ok_or_else(short)?;
                        extents.push(Extent { length, flags });
                    }
                } else {
                    while !c.remaining().is_empty() {
                        let length = u64::from(c.u32().ok_or_else(short)?);
                        let flags = u64::from(c.u32().ok_or_else(short)?);
                        extents.push(Extent { length, flags });
                    }
                }
                p.reply.block_status.push((id, extents));
            }
            proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                let errno = c.u32().ok_or_else(short)?;
                let len = c.u16().ok_or_else(short)? as usize;
                let msg = c.bytes(len).ok_or_else(short)?;
                p.reply.error = Some((errno, String::from_utf8_lossy(msg).into_owned()));
            }
            other => return Err(protocol(format!("unknown chunk type {other}"))),
        }
        Ok(())
    }

    fn call(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Reply> {
        let cookie = self.send_request(flags, command, offset, length, payload)?;
        let reply = self.receive_reply()?;
        if reply.cookie != cookie {
            return Err(protocol(format!(
                "expected reply {cookie}, got {}",
                reply.cookie
            )));
        }
        match reply.error {
            Some((errno, message)) => Err(Error::Command {
                command: proto::command_name(command),
                errno,
                message,
            }),
            None => Ok(reply),
        }
    }

    /// NBD_CMD_READ.
    pub fn read(&mut self, offset: u64, length: u32, flags: u16) -> Result<Vec<u8>> {
        Ok(self
            .call(flags, proto::CMD_READ, offset, u64::from(length), &[])?
            .data)
    }

    /// NBD_CMD_READ returning the whole reply (chunk types included).
    pub fn read_reply(&mut self, offset: u64, length: u32, flags: u16) -> Result<Reply> {
        self.call(flags, proto::CMD_READ, offset, u64::from(length), &[])
    }

    /// NBD_CMD_WRITE.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        self.call(flags, proto::CMD_WRITE, offset, data.len() as u64, data)
            .map(drop)
    }

    /// NBD_CMD_FLUSH.
    pub fn flush(&mut self) -> Result<()> {
        self.call(0, proto::CMD_FLUSH, 0, 0, &[]).map(drop)
    }

    /// NBD_CMD_TRIM.
    pub fn trim(&mut self, offset: u64, length: u64, flags: u16) -> Result<()> {
        self.call(flags, proto::CMD_TRIM, offset, length, &[])
            .map(drop)
    }

    /// NBD_CMD_WRITE_ZEROES.
    pub fn write_zeroes(&mut self, offset: u64, length: u64, flags: u16) -> Result<()> {
        self.call(flags, proto::CMD_WRITE_ZEROES, offset, length, &[])
            .map(drop)
    }

    /// NBD_CMD_CACHE.
    pub fn cache(&mut self, offset: u64, length: u64) -> Result<()> {
        self.call(0, proto::CMD_CACHE, offset, length, &[])
            .map(drop)
    }

    /// NBD_CMD_BLOCK_STATUS: extents per selected context id.
    pub fn block_status(
        &mut self,
        offset: u64,
        length: u64,
        flags: u16,
    ) -> Result<Vec<(u32, Vec<Extent>)>> {
        Ok(self
            .call(flags, proto::CMD_BLOCK_STATUS, offset, length, &[])?
            .block_status)
    }

    /// NBD_CMD_DISC, then close.
    pub fn disconnect(mut self) -> Result<()> {
        self.send_request(0, proto::CMD_DISC, 0, 0, &[])?;
        let _ = self.stream.shutdown();
        Ok(())
    }

    /// The underlying stream (for tests that continue by hand).
    pub fn stream_mut(&mut self) -> &mut dyn Stream {
        &mut *self.stream
    }

    /// Whether structured replies (or extended headers) are in use.
    pub fn structured(&self) -> bool {
        self.structured
    }
}
