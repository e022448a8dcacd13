//! JSON input exactly as QEMU reads it (`json-lexer.c`, `json-streamer.c`,
//! `json-parser.c`).
//!
//! QEMU's monitor does not read lines: a byte-level lexer cuts the stream into
//! tokens, a streamer queues tokens until the braces and brackets balance, and
//! only then is the queue parsed. The consequences are all visible on the wire
//! and reproduced here:
//!
//! * objects may be split across reads or packed several to a read; newlines
//!   are not needed, empty lines produce nothing;
//! * single-quoted strings are accepted, `\'` is an escape;
//! * a stray `}` or `]` is a message of its own (`expecting value`);
//! * a lexical error (a control character inside a string, a byte 0xFE/0xFF,
//!   an upper-case letter outside a string...) discards the tokens queued so
//!   far, reports `JSON parse error, stray '<token>'`, then skips input until
//!   a structural character or a control character;
//! * errors are the first one found, in QEMU's words;
//! * limits: a token or a message of more than 64 MiB, more than 2 Mi tokens
//!   in one message, nesting deeper than 1024.
//!
//! Values come out as `serde_json::Value` with member order preserved.
//! Integers are `i64` when they fit, else `u64`, else `f64`, like QEMU's
//! `QNum`. Strings may contain NUL (`\u0000`).

use serde_json::{Map, Number, Value};

/// QEMU's `MAX_TOKEN_SIZE`: 64 MiB.
pub const MAX_TOKEN_SIZE: usize = 64 << 20;
/// QEMU's `MAX_TOKEN_COUNT`.
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// QEMU's `MAX_NESTING`.
pub const MAX_NESTING: i64 = 1 << 10;

/// Size limits of one [`JsonStreamer`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest token, and largest sum of token sizes in one message.
    pub max_token_size: usize,
    /// Most tokens in one message.
    pub max_token_count: usize,
    /// Deepest nesting of `{` and `[`.
    pub max_nesting: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_token_size: MAX_TOKEN_SIZE,
            max_token_count: MAX_TOKEN_COUNT,
            max_nesting: MAX_NESTING,
        }
    }
}

// Lexer states (json-lexer.c). Values below 100 are states, the others are
// token types; `LOOKAHEAD` marks a transition that does not consume the
// current byte.
const ERROR: u8 = 0;
const IN_RECOVERY: u8 = 1;
const IN_DQ_STRING_ESCAPE: u8 = 2;
const IN_DQ_STRING: u8 = 3;
const IN_SQ_STRING_ESCAPE: u8 = 4;
const IN_SQ_STRING: u8 = 5;
const IN_ZERO: u8 = 6;
const IN_EXP_DIGITS: u8 = 7;
const IN_EXP_SIGN: u8 = 8;
const IN_EXP_E: u8 = 9;
const IN_MANTISSA: u8 = 10;
const IN_MANTISSA_DIGITS: u8 = 11;
const IN_DIGITS: u8 = 12;
const IN_SIGN: u8 = 13;
const IN_KEYWORD: u8 = 14;
const IN_START: u8 = 15;

const LCURLY: u8 = 100;
const RCURLY: u8 = 101;
const LSQUARE: u8 = 102;
const RSQUARE: u8 = 103;
const COLON: u8 = 104;
const COMMA: u8 = 105;
const INTEGER: u8 = 106;
const FLOAT: u8 = 107;
const KEYWORD: u8 = 108;
const STRING: u8 = 109;
const SKIP: u8 = 110;

/// `(next state, lookahead)` for `state` on byte `c`.
fn transition(state: u8, c: u8) -> (u8, bool) {
    // Terminal states: any other byte ends the token without being consumed.
    let terminal = |tok: u8| (tok, true);
    match state {
        IN_RECOVERY => match c {
            b'\t' => (IN_RECOVERY, false),
            0..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' | b':' | b',' => (IN_START, true),
            _ => (IN_RECOVERY, false),
        },
        IN_DQ_STRING_ESCAPE => match c {
            0x20..=0xFD => (IN_DQ_STRING, false),
            _ => (ERROR, false),
        },
        IN_DQ_STRING => match c {
            b'\\' => (IN_DQ_STRING_ESCAPE, false),
            b'"' => (STRING, false),
            0x20..=0xFD => (IN_DQ_STRING, false),
            _ => (ERROR, false),
        },
        IN_SQ_STRING_ESCAPE => match c {
            0x20..=0xFD => (IN_SQ_STRING, false),
            _ => (ERROR, false),
        },
        IN_SQ_STRING => match c {
            b'\\' => (IN_SQ_STRING_ESCAPE, false),
            b'\'' => (STRING, false),
            0x20..=0xFD => (IN_SQ_STRING, false),
            _ => (ERROR, false),
        },
        IN_ZERO => match c {
            b'0'..=b'9' => (ERROR, false),
            b'.' => (IN_MANTISSA, false),
            _ => terminal(INTEGER),
        },
        IN_EXP_DIGITS => match c {
            b'0'..=b'9' => (IN_EXP_DIGITS, false),
            _ => terminal(FLOAT),
        },
        IN_EXP_SIGN => match c {
            b'0'..=b'9' => (IN_EXP_DIGITS, false),
            _ => (ERROR, false),
        },
        IN_EXP_E => match c {
            b'-' | b'+' => (IN_EXP_SIGN, false),
            b'0'..=b'9' => (IN_EXP_DIGITS, false),
            _ => (ERROR, false),
        },
        IN_MANTISSA_DIGITS => match c {
            b'0'..=b'9' => (IN_MANTISSA_DIGITS, false),
            b'e' | b'E' => (IN_EXP_E, false),
            _ => terminal(FLOAT),
        },
        IN_MANTISSA => match c {
            b'0'..=b'9' => (IN_MANTISSA_DIGITS, false),
            _ => (ERROR, false),
        },
        IN_DIGITS => match c {
            b'0'..=b'9' => (IN_DIGITS, false),
            b'e' | b'E' => (IN_EXP_E, false),
            b'.' => (IN_MANTISSA, false),
            _ => terminal(INTEGER),
        },
        IN_SIGN => match c {
            b'0' => (IN_ZERO, false),
            b'1'..=b'9' => (IN_DIGITS, false),
            _ => (ERROR, false),
        },
        IN_KEYWORD => match c {
            b'a'..=b'z' => (IN_KEYWORD, false),
            _ => terminal(KEYWORD),
        },
        IN_START => match c {
            b'"' => (IN_DQ_STRING, false),
            b'\'' => (IN_SQ_STRING, false),
            b'0' => (IN_ZERO, false),
            b'1'..=b'9' => (IN_DIGITS, false),
            b'-' => (IN_SIGN, false),
            b'{' => (LCURLY, false),
            b'}' => (RCURLY, false),
            b'[' => (LSQUARE, false),
            b']' => (RSQUARE, false),
            b',' => (COMMA, false),
            b':' => (COLON, false),
            b'a'..=b'z' => (IN_KEYWORD, false),
            b' ' | b'\t' | b'\r' | b'\n' => (SKIP, false),
            _ => (ERROR, false),
        },
        _ => unreachable!("lexer state {state}"),
    }
}

#[derive(Clone, Copy)]
struct Token {
    kind: u8,
    start: u32,
    len: u32,
}

/// A streaming JSON message parser for one input stream (one QMP client).
pub struct JsonStreamer {
    limits: Limits,
    // lexer
    state: u8,
    token: Vec<u8>,
    // streamer
    brace_count: i64,
    bracket_count: i64,
    tokens: Vec<Token>,
    text: Vec<u8>,
    token_size: usize,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A streamer with QEMU's limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A streamer with custom limits (for tests).
    pub fn with_limits(limits: Limits) -> Self {
        JsonStreamer {
            limits,
            state: IN_START,
            token: Vec::new(),
            brace_count: 0,
            bracket_count: 0,
            tokens: Vec::new(),
            text: Vec::new(),
            token_size: 0,
        }
    }

    /// Feeds bytes; every complete message (or error) is appended to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Result<Value, String>>) {
        for &c in input {
            self.feed_char(c, false, out);
        }
    }

    /// Ends the input (QEMU's `json_message_parser_flush()`): a pending token
    /// is finished and an incomplete message is parsed, which reports its
    /// error (usually `premature EOI`).
    pub fn flush(&mut self, out: &mut Vec<Result<Value, String>>) {
        self.feed_char(0, true, out);
        // JSON_END_OF_INPUT
        if !self.tokens.is_empty() {
            let result = self.parse_queue();
            self.reset_queue();
            out.push(result);
        }
    }

    /// Whether a message is partly received (tokens queued or a token open).
    pub fn is_idle(&self) -> bool {
        self.tokens.is_empty() && self.token.is_empty() && self.state == IN_START
    }

    fn feed_char(&mut self, c: u8, flush: bool, out: &mut Vec<Result<Value, String>>) {
        let mut consumed = false;
        loop {
            if flush {
                if self.state == IN_START {
                    break;
                }
            } else if consumed {
                break;
            }
            let (next, lookahead) = if flush && self.state == IN_RECOVERY {
                // NUL is a resynchronisation point.
                (IN_START, true)
            } else {
                transition(self.state, c)
            };
            consumed = !flush && !lookahead;
            if consumed {
                self.token.push(c);
            }
            let mut new_state = next;
            match next {
                LCURLY | RCURLY | LSQUARE | RSQUARE | COLON | COMMA | INTEGER | FLOAT | KEYWORD
                | STRING => {
                    let tok = std::mem::take(&mut self.token);
                    self.process_token(next, &tok, out);
                    self.recycle(tok);
                    new_state = IN_START;
                }
                SKIP | IN_START => {
                    self.token.clear();
                    new_state = IN_START;
                }
                ERROR => {
                    let tok = std::mem::take(&mut self.token);
                    self.process_token(ERROR, &tok, out);
                    self.recycle(tok);
                    new_state = IN_RECOVERY;
                }
                IN_RECOVERY => self.token.clear(),
                _ => {}
            }
            self.state = new_state;
        }
        // Do not let a single token grow without bound.
        if self.token.len() > self.limits.max_token_size {
            let tok = std::mem::take(&mut self.token);
            let state = self.state;
            self.process_token(state, &tok, out);
            self.recycle(tok);
            self.state = IN_START;
        }
    }

    /// Reuses the token buffer, unless a huge token left it large.
    fn recycle(&mut self, mut tok: Vec<u8>) {
        tok.clear();
        if tok.capacity() > 1 << 20 {
            tok.shrink_to(256);
        }
        self.token = tok;
    }

    fn reset_queue(&mut self) {
        self.brace_count = 0;
        self.bracket_count = 0;
        self.tokens.clear();
        self.text.clear();
        self.token_size = 0;
        // Give memory back after a large message.
        if self.text.capacity() > 1 << 20 {
            self.text.shrink_to(4096);
        }
        if self.tokens.capacity() > 1 << 16 {
            self.tokens.shrink_to(256);
        }
    }

    fn emit(&mut self, result: Result<Value, String>, out: &mut Vec<Result<Value, String>>) {
        self.reset_queue();
        out.push(result);
    }

    /// `json_message_process_token()`.
    fn process_token(&mut self, kind: u8, token: &[u8], out: &mut Vec<Result<Value, String>>) {
        match kind {
            LCURLY => self.brace_count += 1,
            RCURLY => self.brace_count -= 1,
            LSQUARE => self.bracket_count += 1,
            RSQUARE => self.bracket_count -= 1,
            ERROR => {
                let msg = format!("JSON parse error, stray '{}'", qemu_lossy_str(token));
                return self.emit(Err(msg), out);
            }
            _ => {}
        }
        if self.token_size + token.len() + 1 > self.limits.max_token_size {
            return self.emit(Err("JSON token size limit exceeded".into()), out);
        }
        if self.tokens.len() + 1 > self.limits.max_token_count {
            return self.emit(Err("JSON token count limit exceeded".into()), out);
        }
        if self.bracket_count + self.brace_count > self.limits.max_nesting {
            return self.emit(Err("JSON nesting depth limit exceeded".into()), out);
        }
        let start = self.text.len() as u32;
        self.text.extend_from_slice(token);
        self.tokens.push(Token {
            kind,
            start,
            len: token.len() as u32,
        });
        self.token_size += token.len();

        if (self.brace_count > 0 || self.bracket_count > 0)
            && self.brace_count >= 0
            && self.bracket_count >= 0
        {
            return;
        }
        let result = self.parse_queue();
        self.emit(result, out);
    }

    fn parse_queue(&self) -> Result<Value, String> {
        let mut p = Parser {
            tokens: &self.tokens,
            text: &self.text,
            pos: 0,
            err: None,
        };
        let v = p.parse_value();
        match p.err {
            Some(e) => Err(e),
            None => v.ok_or_else(|| "expecting value".to_string()),
        }
    }
}

/// Parses one JSON text as QEMU's `qobject_from_json()` does (used for
/// command-line options that start with `{`).
pub fn from_str(s: &str) -> Result<Value, String> {
    // The C string ends at the first NUL.
    let bytes = s.as_bytes();
    let bytes = match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    };
    let mut streamer = JsonStreamer::new();
    let mut out = Vec::new();
    streamer.feed(bytes, &mut out);
    streamer.flush(&mut out);
    let mut result: Option<Value> = None;
    for item in out {
        if result.is_some() {
            return Err("Expecting at most one JSON value".into());
        }
        result = Some(item?);
    }
    result.ok_or_else(|| "JSON parse error, expecting value".to_string())
}

struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
    err: Option<String>,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> Option<Token> {
        let t = self.peek();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    /// [`Parser::peek`], with QEMU's error at the end of input.
    fn peek_or_eoi(&mut self) -> Option<Token> {
        let t = self.peek();
        if t.is_none() {
            self.error("premature EOI".into());
        }
        t
    }

    /// [`Parser::pop`], with QEMU's error at the end of input.
    fn pop_or_eoi(&mut self) -> Option<Token> {
        let t = self.pop();
        if t.is_none() {
            self.error("premature EOI".into());
        }
        t
    }

    fn text(&self, t: Token) -> &'a [u8] {
        &self.text[t.start as usize..(t.start + t.len) as usize]
    }

    /// `parse_error()`: the first error wins; messages are cut at 1023 bytes.
    fn error(&mut self, msg: String) {
        if self.err.is_none() {
            let mut m = msg;
            if m.len() > 1023 {
                let mut cut = 1023;
                while !m.is_char_boundary(cut) {
                    cut -= 1;
                }
                m.truncate(cut);
            }
            self.err = Some(format!("JSON parse error, {m}"));
        }
    }

    fn parse_value(&mut self) -> Option<Value> {
        let tok = self.peek_or_eoi()?;
        match tok.kind {
            LCURLY => self.parse_object(),
            LSQUARE => self.parse_array(),
            INTEGER | FLOAT | STRING => self.parse_literal(),
            KEYWORD => self.parse_keyword(),
            _ => {
                self.error("expecting value".into());
                None
            }
        }
    }

    fn parse_pair(&mut self, map: &mut Map<String, Value>) -> bool {
        if self.peek_or_eoi().is_none() {
            return false;
        }
        let key = self.parse_value();
        let key = match key {
            Some(Value::String(s)) => s,
            _ => {
                self.error("key is not a string in object".into());
                return false;
            }
        };
        let Some(tok) = self.pop_or_eoi() else {
            return false;
        };
        if tok.kind != COLON {
            self.error("missing : in object pair".into());
            return false;
        }
        let Some(value) = self.parse_value() else {
            self.error("Missing value in dict".into());
            return false;
        };
        if map.contains_key(&key) {
            self.error("duplicate key".into());
            return false;
        }
        map.insert(key, value);
        true
    }

    fn parse_object(&mut self) -> Option<Value> {
        let mut map = Map::new();
        self.parse_items(LCURLY, RCURLY, "expected separator in dict", |p| {
            p.parse_pair(&mut map)
        })?;
        Some(Value::Object(map))
    }

    fn parse_array(&mut self) -> Option<Value> {
        let mut list = Vec::new();
        self.parse_items(
            LSQUARE,
            RSQUARE,
            "expected separator in list",
            |p| match p.parse_value() {
                Some(v) => {
                    list.push(v);
                    true
                }
                None => {
                    p.error("expecting value".into());
                    false
                }
            },
        )?;
        Some(Value::Array(list))
    }

    /// The items of an object or array, from `open` to `close`: `item` parses one and says
    /// whether it could.
    fn parse_items(
        &mut self,
        open: u8,
        close: u8,
        separator_error: &str,
        mut item: impl FnMut(&mut Self) -> bool,
    ) -> Option<()> {
        let first = self.pop();
        debug_assert!(matches!(first, Some(Token { kind, .. }) if kind == open));
        if self.peek_or_eoi()?.kind == close {
            self.pop();
            return Some(());
        }
        if !item(self) {
            return None;
        }
        let mut tok = self.pop_or_eoi()?;
        while tok.kind != close {
            if tok.kind != COMMA {
                self.error(separator_error.into());
                return None;
            }
            if !item(self) {
                return None;
            }
            tok = self.pop_or_eoi()?;
        }
        Some(())
    }

    fn parse_keyword(&mut self) -> Option<Value> {
        let tok = self.pop_or_eoi()?;
        match self.text(tok) {
            b"true" => Some(Value::Bool(true)),
            b"false" => Some(Value::Bool(false)),
            b"null" => Some(Value::Null),
            kw => {
                let kw = String::from_utf8_lossy(kw).into_owned();
                self.error(format!("invalid keyword '{kw}'"));
                None
            }
        }
    }

    fn parse_literal(&mut self) -> Option<Value> {
        let tok = self.pop_or_eoi()?;
        let text = self.text(tok);
        match tok.kind {
            STRING => self.parse_string(text).map(Value::String),
            INTEGER => {
                // The lexer only lets ASCII digits and signs through.
                let s = String::from_utf8_lossy(text);
                if let Ok(i) = s.parse::<i64>() {
                    return Some(Value::Number(i.into()));
                }
                if !s.starts_with('-') {
                    if let Ok(u) = s.parse::<u64>() {
                        return Some(Value::Number(u.into()));
                    }
                }
                Some(float_value(&s))
            }
            _ => Some(float_value(&String::from_utf8_lossy(text))),
        }
    }

    fn parse_string(&mut self, text: &[u8]) -> Option<String> {
        // The lexer hands over whole quoted strings; still, a short token is
        // an error here, never an out-of-bounds index.
        let Some(&quote) = text.first() else {
            self.error("premature EOI".into());
            return None;
        };
        let mut out = String::new();
        let mut i = 1;
        loop {
            let Some(&b) = text.get(i) else {
                self.error("premature EOI".into());
                return None;
            };
            if b == quote {
                break;
            }
            if b == b'\\' {
                let beg = i;
                let Some(&c) = text.get(i + 1) else {
                    self.error("premature EOI".into());
                    return None;
                };
                i += 2;
                match c {
                    b'"' => out.push('"'),
                    b'\'' => out.push('\''),
                    b'\\' => out.push('\\'),
                    b'/' => out.push('/'),
                    b'b' => out.push('\u{8}'),
                    b'f' => out.push('\u{c}'),
                    b'n' => out.push('\n'),
                    b'r' => out.push('\r'),
                    b't' => out.push('\t'),
                    b'u' => {
                        let mut cp = cvt4hex(&text[i..]);
                        i += 4;
                        if (0xD800..=0xDBFF).contains(&cp)
                            && text.get(i) == Some(&b'\\')
                            && text.get(i + 1) == Some(&b'u')
                        {
                            let lead = cp;
                            cp = 0x10000 + ((lead & 0x3FF) << 10);
                            let trailing = cvt4hex(&text[i + 2..]);
                            if (0xDC00..=0xDFFF).contains(&trailing) {
                                cp |= trailing & 0x3FF;
                                i += 6;
                            } else {
                                cp = -1;
                            }
                        }
                        match char_from_codepoint(cp) {
                            Some(ch) => out.push(ch),
                            None => {
                                let end = i.min(text.len());
                                let seq = &text[beg..end];
                                let seq = match seq.iter().position(|&b| b == 0) {
                                    Some(n) => &seq[..n],
                                    None => seq,
                                };
                                self.error(format!(
                                    "{} is not a valid Unicode character",
                                    String::from_utf8_lossy(seq)
                                ));
                                return None;
                            }
                        }
                    }
                    _ => {
                        self.error("invalid escape sequence in string".into());
                        return None;
                    }
                }
            } else {
                let (cp, len) = mod_utf8_codepoint(&text[i..]);
                if cp < 0 {
                    self.error("invalid UTF-8 sequence in string".into());
                    return None;
                }
                let Some(ch) = char::from_u32(cp as u32) else {
                    self.error("invalid UTF-8 sequence in string".into());
                    return None;
                };
                out.push(ch);
                i += len;
            }
        }
        Some(out)
    }
}

fn float_value(s: &str) -> Value {
    let mut f: f64 = s.parse().unwrap_or(0.0);
    // JSON (and serde_json) cannot carry infinities; QEMU's strtod() would
    // give HUGE_VAL. Saturate instead.
    if f.is_infinite() {
        f = if f > 0.0 { f64::MAX } else { f64::MIN };
    }
    // Only NaN is left unrepresentable, and number tokens cannot spell it.
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// QEMU's `cvt4hex()`: four hex digits, or -1.
fn cvt4hex(s: &[u8]) -> i32 {
    let mut cp = 0i32;
    for i in 0..4 {
        let Some(&c) = s.get(i) else { return -1 };
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return -1,
        };
        cp = (cp << 4) | d as i32;
    }
    cp
}

/// `mod_utf8_encode()`'s validity check, as a `char`. Code point 0 is
/// allowed (QEMU encodes it as the overlong `C0 80`).
fn char_from_codepoint(cp: i32) -> Option<char> {
    if cp < 0 || !crate::output::is_valid_codepoint(cp as u32) {
        return None;
    }
    char::from_u32(cp as u32)
}

/// QEMU's `mod_utf8_codepoint()` on a byte slice: `(code point or -1, bytes
/// consumed)`. Accepts `C0 80` as NUL, rejects overlong forms, surrogates and
/// noncharacters. An empty slice or a NUL byte gives `(-1, 0)`.
pub(crate) fn mod_utf8_codepoint(s: &[u8]) -> (i32, usize) {
    const MIN_CP: [i64; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let n = s.len().min(6);
    if n == 0 || s[0] == 0 {
        return (-1, 0);
    }
    let byte = s[0] as u32;
    let mut p = 1;
    let cp: i64;
    if byte < 0x80 {
        cp = byte as i64;
    } else if byte >= 0xFE || byte & 0x40 == 0 {
        // Impossible byte, or a continuation byte out of place.
        cp = -1;
    } else {
        let mut len = 0usize;
        let mut mask = 0x80u32;
        while byte & mask != 0 {
            len += 1;
            mask >>= 1;
        }
        let mut c = (byte & (mask - 1)) as i64;
        for i in 1..len {
            let b = if i < n && p < s.len() { s[p] as u32 } else { 0 };
            if b & 0xC0 != 0x80 {
                return (-1, p);
            }
            p += 1;
            c = (c << 6) | (b & 0x3F) as i64;
        }
        let overlong = c < MIN_CP[len - 2] && !(c == 0 && len == 2);
        cp = if c > 0x10FFFF || !crate::output::is_valid_codepoint(c as u32) || overlong {
            -1
        } else {
            c
        };
    }
    (cp as i32, p)
}

/// Decodes bytes the way QEMU's JSON writer walks a C string: up to the first
/// NUL, invalid sequences become U+FFFD.
pub(crate) fn qemu_lossy_str(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() && bytes[i] != 0 {
        let (cp, len) = mod_utf8_codepoint(&bytes[i..]);
        if cp < 0 {
            out.push('\u{FFFD}');
        } else {
            out.push(char::from_u32(cp as u32).unwrap_or('\u{FFFD}'));
        }
        i += len.max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed(input: &[u8]) -> Vec<Result<Value, String>> {
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn errs(input: &[u8]) -> Vec<String> {
        feed(input)
            .into_iter()
            .map(|r| match r {
                Ok(v) => format!("OK {}", crate::output::to_json(&v, false)),
                Err(e) => e,
            })
            .collect()
    }

    #[test]
    fn basic_values() {
        assert_eq!(
            feed(b"{\"execute\": \"x\", \"id\": [1, -2, 3.5, true, null]}"),
            vec![Ok(json!({"execute": "x", "id": [1, -2, 3.5, true, null]}))]
        );
        assert_eq!(
            feed(b"{'execute': 'query-version'}"),
            vec![Ok(json!({"execute": "query-version"}))]
        );
        assert_eq!(
            feed(b"18446744073709551615 "),
            vec![Ok(json!(18446744073709551615u64))]
        );
        assert_eq!(
            feed(b"-9223372036854775808 "),
            vec![Ok(json!(-9223372036854775808i64))]
        );
        assert_eq!(
            feed(b"18446744073709551616 "),
            vec![Ok(json!(18446744073709551616.0))]
        );
        assert_eq!(
            feed(b"\"\\u00e9\\ud83d\\ude00\\u0000\xc3\xa9\xc0\x80\""),
            vec![Ok(json!("\u{e9}\u{1F600}\u{0}\u{e9}\u{0}"))]
        );
        assert_eq!(feed(b"'it\\'s'"), vec![Ok(json!("it's"))]);
    }

    #[test]
    fn key_order_kept() {
        let v = feed(b"{\"z\": 1, \"a\": 2, \"m\": 3}").remove(0).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn framing() {
        // Several per read, none per read, split across reads.
        assert_eq!(feed(b"{}{}[]").len(), 3);
        assert_eq!(feed(b"\n \r\n\t").len(), 0);
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        for b in b"{\"execute\": \"query-version\"}" {
            s.feed(&[*b], &mut out);
        }
        assert_eq!(out, vec![Ok(json!({"execute": "query-version"}))]);
        // A number at the end of the input waits for its terminator.
        assert_eq!(feed(b"42").len(), 0);
        assert_eq!(feed(b"42\n").len(), 1);
    }

    #[test]
    fn protocol_error_table() {
        assert_eq!(
            errs(b"{\"execute\": \"a\", \"execute\": \"b\"}"),
            ["JSON parse error, duplicate key"]
        );
        assert_eq!(
            errs(b"{\"execute\": }"),
            ["JSON parse error, expecting value"]
        );
        assert_eq!(
            errs(b"{\"execute\": \"x\",}"),
            ["JSON parse error, expecting value"]
        );
        assert_eq!(
            errs(b"hello\n"),
            ["JSON parse error, invalid keyword 'hello'"]
        );
        assert_eq!(
            errs(b"{\"execute\": \"query-version\"}}"),
            [
                "OK {\"execute\": \"query-version\"}",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(
            errs(b"\"abc\n{}"),
            ["JSON parse error, stray '\"abc\n'", "OK {}"]
        );
        assert_eq!(
            errs(b"{\"execute\": \"\xff\"}\n{}"),
            [
                "JSON parse error, stray '\"\u{FFFD}'",
                "JSON parse error, expecting value",
                "OK {}"
            ]
        );
        assert_eq!(
            errs(b"\0{\"execute\": \"x\"}"),
            ["JSON parse error, stray ''", "OK {\"execute\": \"x\"}"]
        );
        assert_eq!(errs(b"TRUE\n[]"), ["JSON parse error, stray 'T'", "OK []"]);
        assert_eq!(errs(b"01 "), ["JSON parse error, stray '01'"]);
        assert_eq!(
            errs(b"[1 2]"),
            ["JSON parse error, expected separator in list"]
        );
        assert_eq!(
            errs(b"{\"a\" 1}"),
            ["JSON parse error, missing : in object pair"]
        );
        assert_eq!(
            errs(b"{1: 1}"),
            ["JSON parse error, key is not a string in object"]
        );
        assert_eq!(
            errs(b"{\"a\": 1 \"b\": 2}"),
            ["JSON parse error, expected separator in dict"]
        );
        assert_eq!(
            errs(b"\"\\x\""),
            ["JSON parse error, invalid escape sequence in string"]
        );
        assert_eq!(
            errs(b"\"\\ud800\""),
            ["JSON parse error, \\ud800 is not a valid Unicode character"]
        );
        assert_eq!(
            errs(b"\"\\uFFFE\""),
            ["JSON parse error, \\uFFFE is not a valid Unicode character"]
        );
        assert_eq!(
            errs(b"\"\x80\""),
            ["JSON parse error, invalid UTF-8 sequence in string"]
        );
        assert_eq!(
            errs(b"\"\xef\xbf\xbe\""),
            ["JSON parse error, invalid UTF-8 sequence in string"]
        );
    }

    #[test]
    fn nesting_limit() {
        // 2000 '[' then 2000 ']': the 1025th '[' trips the limit, the rest
        // parse as one array of depth 975, then 1025 stray ']'.
        let mut input = vec![b'['; 2000];
        input.extend(vec![b']'; 2000]);
        let out = errs(&input);
        assert_eq!(out[0], "JSON nesting depth limit exceeded");
        assert!(out[1].starts_with("OK [[[["));
        assert_eq!(out.len(), 2 + 1025);
        assert!(out[2..]
            .iter()
            .all(|e| e == "JSON parse error, expecting value"));
    }

    #[test]
    fn size_limits() {
        let limits = Limits {
            max_token_size: 64,
            max_token_count: 8,
            max_nesting: 1024,
        };
        let mut s = JsonStreamer::with_limits(limits);
        let mut out = Vec::new();
        let mut input = b"[\"".to_vec();
        input.extend(vec![b'a'; 100]);
        s.feed(&input, &mut out);
        assert_eq!(out[0], Err("JSON token size limit exceeded".to_string()));

        let mut s = JsonStreamer::with_limits(limits);
        let mut out = Vec::new();
        s.feed(b"[1,2,3,4,5,6,7,8]", &mut out);
        assert_eq!(out[0], Err("JSON token count limit exceeded".to_string()));
    }

    #[test]
    fn from_str_like_qobject_from_json() {
        assert_eq!(from_str("{\"a\": 1}"), Ok(json!({"a": 1})));
        assert_eq!(
            from_str("{\"a\": 1"),
            Err("JSON parse error, premature EOI".into())
        );
        assert_eq!(
            from_str("{\"a\": 1} x"),
            Err("Expecting at most one JSON value".into())
        );
        assert_eq!(
            from_str("{} {}"),
            Err("Expecting at most one JSON value".into())
        );
        assert_eq!(
            from_str(""),
            Err("JSON parse error, expecting value".into())
        );
        assert_eq!(from_str("42"), Ok(json!(42)));
    }
}
