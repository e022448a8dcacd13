//! One QMP client connection: framing, capabilities negotiation, input
//! checks and argument validation, as QEMU's monitor (`monitor/qmp.c`) and
//! dispatcher (`qapi/qmp-dispatch.c`) do them.
//!
//! The session owns no socket. The daemon feeds it the bytes it reads and
//! gets back, in order, either bytes to send (errors, the reply to
//! `qmp_capabilities`) or validated commands to run. Replies to those
//! commands are formatted with [`reply`](crate::reply).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::error::{ErrorClass, QmpError};
use crate::json::{JsonStreamer, Limits};
use crate::output::{qdict_keys, to_wire};
use crate::schema::Schema;

/// What [`Session::feed`] produced, in input order.
#[derive(Debug, PartialEq)]
pub enum SessionItem {
    /// Bytes to write to the client as they are.
    Send(Vec<u8>),
    /// A command to run; answer it with [`reply`](crate::reply).
    Command(Command),
}

/// A command whose arguments passed the schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub name: String,
    /// The arguments converted to their schema types. Members the client
    /// left out are absent (no defaults are filled in).
    pub args: Map<String, Value>,
    /// The request's `id`, any JSON value, echoed in the reply.
    pub id: Option<Value>,
    /// Sent with `exec-oob` (only possible for `allow-oob` commands).
    pub oob: bool,
}

/// One QMP client.
pub struct Session {
    schema: Arc<Schema>,
    streamer: JsonStreamer,
    negotiated: bool,
    oob: bool,
    pretty: bool,
}

/// Capabilities QSD offers in its greeting.
const OFFERED_CAPABILITIES: &[&str] = &["oob"];

impl Session {
    pub fn new(schema: Arc<Schema>) -> Self {
        Self::with_limits(schema, Limits::default())
    }

    /// A session with custom JSON size limits (for tests).
    pub fn with_limits(schema: Arc<Schema>, limits: Limits) -> Self {
        Session {
            schema,
            streamer: JsonStreamer::with_limits(limits),
            negotiated: false,
            oob: false,
            pretty: false,
        }
    }

    /// The greeting QEMU sends on connect:
    /// `{"QMP": {"version": <version>, "capabilities": ["oob"]}}\r\n`.
    /// `version` is `query-version`'s value, `{"qemu": {...}, "package": ...}`.
    pub fn greeting(version: &Value) -> Vec<u8> {
        Self::greeting_with(version, false)
    }

    /// [`greeting`](Self::greeting), optionally pretty-printed.
    pub fn greeting_with(version: &Value, pretty: bool) -> Vec<u8> {
        let v = json!({ "QMP": { "version": version, "capabilities": OFFERED_CAPABILITIES } });
        to_wire(&v, pretty)
    }

    /// Pretty-prints the messages this session produces (`pretty=on`).
    pub fn set_pretty(&mut self, pretty: bool) {
        self.pretty = pretty;
    }

    pub fn pretty(&self) -> bool {
        self.pretty
    }

    /// Whether `qmp_capabilities` has succeeded. Only negotiated clients get
    /// events.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the client enabled the `oob` capability.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// Whether a request is partly received.
    pub fn idle(&self) -> bool {
        self.streamer.is_idle()
    }

    /// Feeds received bytes; returns what to send and what to run, in order.
    pub fn feed(&mut self, input: &[u8]) -> Vec<SessionItem> {
        let mut parsed = Vec::new();
        self.streamer.feed(input, &mut parsed);
        parsed
            .into_iter()
            .map(|r| match r {
                Ok(v) => self.dispatch(v),
                Err(e) => self.send(None, Err(QmpError::generic(e))),
            })
            .collect()
    }

    fn send(&self, id: Option<&Value>, result: Result<Value, QmpError>) -> SessionItem {
        SessionItem::Send(to_wire(&reply_value(&id.cloned(), result), self.pretty))
    }

    /// `handle_qmp_command()` + `qmp_dispatch()`.
    fn dispatch(&mut self, request: Value) -> SessionItem {
        let Value::Object(mut dict) = request else {
            return self.send(
                None,
                Err(QmpError::generic("QMP input must be a JSON object")),
            );
        };
        let id = dict.get("id").cloned();
        let fail = |this: &Self, class: ErrorClass, msg: String| -> SessionItem {
            let mut err = QmpError::new(class, msg);
            if !this.negotiated && class == ErrorClass::CommandNotFound {
                err.desc = "Expecting capabilities negotiation with 'qmp_capabilities'".into();
            }
            this.send(id.as_ref(), Err(err))
        };

        // qmp_dispatch_check_obj(), in QDict order.
        let mut exec_key: Option<&str> = None;
        for key in qdict_keys(&dict) {
            let value = &dict[key];
            if key == "execute" || (key == "exec-oob" && self.oob) {
                if !value.is_string() {
                    return fail(
                        self,
                        ErrorClass::GenericError,
                        format!("QMP input member '{key}' must be a string"),
                    );
                }
                if let Some(prev) = exec_key {
                    return fail(
                        self,
                        ErrorClass::GenericError,
                        format!("QMP input member '{key}' clashes with '{prev}'"),
                    );
                }
                exec_key = Some(key.as_str());
            } else if key == "arguments" {
                if !value.is_object() {
                    return fail(
                        self,
                        ErrorClass::GenericError,
                        "QMP input member 'arguments' must be an object".into(),
                    );
                }
            } else if key != "id" {
                return fail(
                    self,
                    ErrorClass::GenericError,
                    format!("QMP input member '{key}' is unexpected"),
                );
            }
        }
        let Some(exec_key) = exec_key else {
            return fail(
                self,
                ErrorClass::GenericError,
                "QMP input lacks member 'execute'".into(),
            );
        };
        let oob = exec_key == "exec-oob";
        let command = dict[exec_key].as_str().unwrap_or_default().to_string();

        let known = if self.negotiated {
            self.schema.has_command(&command)
        } else {
            command == "qmp_capabilities"
        };
        if !known {
            return fail(
                self,
                ErrorClass::CommandNotFound,
                format!("The command {command} has not been found"),
            );
        }
        if oob && !self.schema.command_allows_oob(&command) {
            return fail(
                self,
                ErrorClass::GenericError,
                format!("The command {command} does not support OOB"),
            );
        }
        let args = match dict.remove("arguments") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let args = match self.schema.validate_command_args(&command, args) {
            Ok(a) => a,
            Err(e) => return fail(self, ErrorClass::GenericError, e),
        };
        if command == "qmp_capabilities" {
            return self.qmp_capabilities(&args, id.as_ref());
        }
        SessionItem::Command(Command {
            name: command,
            args,
            id,
            oob,
        })
    }

    fn qmp_capabilities(&mut self, args: &Map<String, Value>, id: Option<&Value>) -> SessionItem {
        if self.negotiated {
            let err = QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            );
            return self.send(id, Err(err));
        }
        let requested: Vec<&str> = match args.get("enable") {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let mut unavailable: Vec<&str> = Vec::new();
        for cap in &requested {
            if !OFFERED_CAPABILITIES.contains(cap) && !unavailable.contains(cap) {
                unavailable.push(cap);
            }
        }
        if !unavailable.is_empty() {
            let err = QmpError::generic(format!(
                "Capability {} not available",
                unavailable.join(", ")
            ));
            return self.send(id, Err(err));
        }
        self.oob = requested.contains(&"oob");
        self.negotiated = true;
        self.send(id, Ok(json!({})))
    }
}

/// The reply object: `{"return": ..., "id": ...}` or
/// `{"id": ..., "error": {"class": ..., "desc": ...}}` (the key order is
/// applied when it is written).
pub fn reply_value(id: &Option<Value>, result: Result<Value, QmpError>) -> Value {
    let mut rsp = Map::new();
    match result {
        Ok(v) => {
            rsp.insert("return".into(), v);
        }
        Err(e) => {
            rsp.insert(
                "error".into(),
                json!({ "class": e.class.as_str(), "desc": e.desc }),
            );
        }
    }
    if let Some(id) = id {
        rsp.insert("id".into(), id.clone());
    }
    Value::Object(rsp)
}

/// A reply on the wire, `\r\n`-terminated.
pub fn reply(id: &Option<Value>, result: Result<Value, QmpError>) -> Vec<u8> {
    to_wire(&reply_value(id, result), false)
}

/// The event object, timestamped now; `data` is left out when `None`.
pub fn event_value(name: &str, data: Option<Value>) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ev = Map::new();
    ev.insert("event".into(), Value::String(name.into()));
    ev.insert(
        "timestamp".into(),
        json!({ "seconds": now.as_secs(), "microseconds": now.subsec_micros() }),
    );
    if let Some(d) = data {
        ev.insert("data".into(), d);
    }
    Value::Object(ev)
}

/// An event on the wire:
/// `{"timestamp": {"seconds": S, "microseconds": U}, "event": NAME, "data": {...}}\r\n`.
pub fn event(name: &str, data: Option<Value>) -> Vec<u8> {
    to_wire(&event_value(name, data), false)
}
