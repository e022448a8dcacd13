//! NBD wire constants and pure encoders/decoders (no I/O), shared by the server and the client.
//!
//! Numbers follow the NBD protocol document (`doc/proto.md`) and its extended-headers extension
//! as implemented by QEMU 10.

/// "NBDMAGIC", the first 8 bytes of every newstyle greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle greeting magic and option request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags sent by the server.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server will omit the 124 zero bytes after NBD_OPT_EXPORT_NAME if the client agrees.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// NBD_INFO items.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// Requests and replies.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation flags.
pub const STATE_HOLE: u64 = 1 << 0;
pub const STATE_ZERO: u64 = 1 << 1;

// NBD error numbers (fixed by the protocol, independent of the host's errno values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The base metadata context every export offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Largest payload (READ/WRITE data) the server accepts, and advertises as maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Advertised minimum and preferred block sizes (what QSD advertises).
pub const MIN_BLOCK_SIZE: u32 = 1;
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Longest option payload accepted during negotiation; longer ones are a hard disconnect.
pub const MAX_OPTION_LENGTH: u32 = 32 * 1024 * 1024;
/// Longest string (export name, description, context name) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// QEMU caps block-status replies at this many extents per context.
pub const MAX_EXTENTS: usize = 128 * 1024;

/// One block-status extent: `length` bytes with context-specific `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length of the extent in bytes.
    pub length: u64,
    /// Status flags (for `base:allocation`: [`STATE_HOLE`], [`STATE_ZERO`]).
    pub flags: u64,
}

/// QEMU's names for options, used in error messages (`Unsupported option 99 (<unknown>)`).
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_PEEK_EXPORT => "peek export",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// QEMU's names for commands, used in error messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write zeroes",
        CMD_BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

/// Map an I/O error from a backend to the NBD error number sent to the client (as QEMU does).
pub fn errno_of(err: &std::io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) => EPERM,
        Some(libc::EIO) => EIO,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ENOTSUP) => ENOTSUP,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        Some(_) => EINVAL,
        None => match err.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => EPERM,
            std::io::ErrorKind::Unsupported => ENOTSUP,
            std::io::ErrorKind::OutOfMemory => ENOMEM,
            std::io::ErrorKind::InvalidInput => EINVAL,
            std::io::ErrorKind::StorageFull => ENOSPC,
            _ => EIO,
        },
    }
}

/// Decoded transmission request header (compact or extended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub command: u16,
    /// Client-chosen cookie echoed in the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Effect length, or payload length for WRITE / PAYLOAD_LEN requests.
    pub length: u64,
}

/// Size of a compact request header.
pub const REQUEST_SIZE: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_SIZE: usize = 32;

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl RequestHeader {
    /// Encode as a compact (28-byte) request; `length` must fit in 32 bits.
    pub fn encode_compact(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&(self.length as u32).to_be_bytes());
        b
    }

    /// Encode as an extended (32-byte) request.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_SIZE] {
        let mut b = [0u8; EXTENDED_REQUEST_SIZE];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode a compact request from its 28 bytes; `None` if the magic is wrong.
    pub fn decode_compact(b: &[u8; REQUEST_SIZE]) -> Option<Self> {
        if be_u32(b, 0) != REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: u64::from(be_u32(b, 24)),
        })
    }

    /// Decode an extended request from its 32 bytes; `None` if the magic is wrong.
    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_SIZE]) -> Option<Self> {
        if be_u32(b, 0) != EXTENDED_REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u64(b, 24),
        })
    }
}

/// A simple reply header (16 bytes).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Header of a structured reply chunk: 20 bytes (compact) or 32 bytes (extended, which also
/// carries the request offset). Returned as a fixed buffer plus its used length.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) -> ([u8; 32], usize) {
    let mut b = [0u8; 32];
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    if extended {
        b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..32].copy_from_slice(&payload_len.to_be_bytes());
        (b, 32)
    } else {
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[16..20].copy_from_slice(&(payload_len as u32).to_be_bytes());
        (b, 20)
    }
}

/// A decoded reply header, simple or structured (compact or extended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply: error and cookie (READ data follows on success).
    Simple { error: u32, cookie: u64 },
    /// Structured chunk (compact or extended).
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    },
}

impl ReplyHeader {
    /// How many bytes the header has, given its magic.
    pub fn size_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(16),
            STRUCTURED_REPLY_MAGIC => Some(20),
            EXTENDED_REPLY_MAGIC => Some(32),
            _ => None,
        }
    }

    /// Decode a whole reply header (magic included). `None` on a bad magic or short buffer.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 4 {
            return None;
        }
        let magic = be_u32(b, 0);
        if b.len() != Self::size_for_magic(magic)? {
            return None;
        }
        Some(match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: be_u32(b, 4),
                cookie: be_u64(b, 8),
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: be_u16(b, 4),
                chunk_type: be_u16(b, 6),
                cookie: be_u64(b, 8),
                offset: 0,
                length: u64::from(be_u32(b, 16)),
            },
            _ => ReplyHeader::Chunk {
                flags: be_u16(b, 4),
                chunk_type: be_u16(b, 6),
                cookie: be_u64(b, 8),
                offset: be_u64(b, 16),
                length: be_u64(b, 24),
            },
        })
    }
}

/// An option reply: magic, option, reply type, length, payload.
pub fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// An option request: IHAVEOPT, option, length, payload.
pub fn option_request(option: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + payload.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// A cursor over an option or chunk payload that never panics on short input.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Start reading `buf` from its beginning.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Take the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    /// Take a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| be_u16(b, 0))
    }

    /// Take a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| be_u32(b, 0))
    }

    /// Take a big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| be_u64(b, 0))
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }
}

/// Append a big-endian u32 length and the UTF-8 string.
pub fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Payload of an NBD_INFO_EXPORT reply.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// Payload of an NBD_INFO_BLOCK_SIZE reply.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// Payload of a block-status chunk: 32-bit descriptors (compact) or 64-bit ones with a count
/// (extended). Compact extents must already fit in 32 bits.
pub fn block_status_payload(extended: bool, context_id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + extents.len() * 16);
    b.extend_from_slice(&context_id.to_be_bytes());
    if extended {
        b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            b.extend_from_slice(&e.length.to_be_bytes());
            b.extend_from_slice(&e.flags.to_be_bytes());
        }
    } else {
        for e in extents {
            b.extend_from_slice(&(e.length as u32).to_be_bytes());
            b.extend_from_slice(&(e.flags as u32).to_be_bytes());
        }
    }
    b
}

/// Payload of an error chunk: error number, message length, message.
pub fn error_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = truncate_utf8(message, MAX_STRING);
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn option_reply_framing() {
        let r = option_reply(OPT_LIST, REP_ACK, &[]);
        assert_eq!(
            r,
            vec![0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        let e = option_reply(99, REP_ERR_UNSUP, b"x");
        assert_eq!(&e[12..16], &[0x80, 0, 0, 1]);
        assert_eq!(&e[16..20], &[0, 0, 0, 1]);
        assert_eq!(e[20], b'x');
    }

    #[test]
    fn request_roundtrip_compact_and_extended() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let c = h.encode_compact();
        assert_eq!(&c[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode_compact(&c), Some(h));
        let big = RequestHeader {
            length: 1 << 40,
            ..h
        };
        let e = big.encode_extended();
        assert_eq!(&e[0..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(RequestHeader::decode_extended(&e), Some(big));
        assert_eq!(RequestHeader::decode_compact(&[0u8; 28]), None);
    }

    #[test]
    fn chunk_framing() {
        let (b, n) = chunk_header(false, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 99, 520);
        assert_eq!(n, 20);
        assert_eq!(&b[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(
            ReplyHeader::decode(&b[..n]),
            Some(ReplyHeader::Chunk {
                flags: 1,
                chunk_type: 1,
                cookie: 7,
                offset: 0,
                length: 520
            })
        );
        let (b, n) = chunk_header(true, 0, REPLY_TYPE_BLOCK_STATUS_EXT, 8, 4096, 1 << 33);
        assert_eq!(n, 32);
        assert_eq!(
            ReplyHeader::decode(&b[..n]),
            Some(ReplyHeader::Chunk {
                flags: 0,
                chunk_type: 6,
                cookie: 8,
                offset: 4096,
                length: 1 << 33
            })
        );
        assert_eq!(
            ReplyHeader::decode(&simple_reply(22, 5)),
            Some(ReplyHeader::Simple {
                error: 22,
                cookie: 5
            })
        );
        assert_eq!(ReplyHeader::decode(&[0u8; 16]), None);
    }

    #[test]
    fn block_status_descriptors() {
        let ext = [
            Extent {
                length: 4096,
                flags: 3,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        let c = block_status_payload(false, 1, &ext);
        assert_eq!(
            c,
            vec![0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0]
        );
        let e = block_status_payload(true, 1, &ext);
        assert_eq!(e.len(), 8 + 32);
        assert_eq!(&e[4..8], &[0, 0, 0, 2]);
        assert_eq!(&e[8..16], &4096u64.to_be_bytes());
    }

    #[test]
    fn errno_mapping() {
        use std::io::{Error, ErrorKind};
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::EROFS)), EPERM);
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::EDQUOT)), ENOSPC);
        assert_eq!(errno_of(&Error::from_raw_os_error(libc::EBADF)), EINVAL);
        assert_eq!(errno_of(&Error::from(ErrorKind::Unsupported)), ENOTSUP);
        assert_eq!(errno_of(&Error::other("boom")), EIO);
    }

    #[test]
    fn cursor_never_panics() {
        let mut c = Cursor::new(&[1, 2, 3]);
        assert_eq!(c.u16(), Some(0x0102));
        assert_eq!(c.u32(), None);
        assert_eq!(c.remaining(), &[3]);
        assert_eq!(truncate_utf8("héllo", 2), "h");
    }
}
