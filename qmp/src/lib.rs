//! The QEMU Machine Protocol as qemu-storage-daemon speaks it.
//!
//! * [`json`]: QEMU's streaming JSON parser (framing without newlines,
//!   single quotes, QEMU's error texts and limits);
//! * [`output`]: QEMU's JSON writer (QDict key order, `\uXXXX` escapes,
//!   `%.17g`, the pretty form);
//! * [`Schema`]: one QAPI-like description that validates input in QMP and
//!   command-line (keyval) form with QEMU's error texts, and produces
//!   `query-qmp-schema` and `query-commands`;
//! * [`Session`]: one client connection, pull model: bytes in, replies and
//!   validated [`Command`]s out;
//! * [`reply`], [`event`]: wire messages for command results and events.
//!
//! ```
//! use std::sync::Arc;
//! use qmp::{Schema, Session, SessionItem};
//!
//! let schema = Arc::new(Schema::from_source(r#"[
//!     {"command": "qmp_capabilities", "data": {"*enable": ["QMPCapability"]}},
//!     {"enum": "QMPCapability", "data": ["oob"]},
//!     {"command": "blockdev-del", "data": {"node-name": "str"}}
//! ]"#).unwrap());
//! let mut session = Session::new(schema);
//! let items = session.feed(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"blockdev-del\", \"id\": 1}");
//! assert_eq!(items[0], SessionItem::Send(b"{\"return\": {}}\r\n".to_vec()));
//! assert_eq!(
//!     items[1],
//!     SessionItem::Send(b"{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'node-name' is missing\"}}\r\n".to_vec())
//! );
//! let items = session.feed(b"{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": \"n0\"}}\n");
//! let SessionItem::Command(cmd) = &items[0] else { panic!() };
//! assert_eq!(cmd.name, "blockdev-del");
//! assert_eq!(qmp::reply(&cmd.id, Ok(serde_json::json!({}))), b"{\"return\": {}}\r\n");
//! ```

mod error;
mod glib;
pub mod json;
pub mod output;
mod scalar;
mod schema;
mod session;
mod visit;

pub use error::{ErrorClass, QmpError};
pub use schema::Schema;
pub use session::{event, event_value, reply, reply_value, Command, Session, SessionItem};
pub use visit::InputMode;

/// Serializes any value as one QMP wire message (QEMU's key order and
/// formatting, `\r\n`-terminated).
pub fn encode(value: &serde_json::Value, pretty: bool) -> Vec<u8> {
    output::to_wire(value, pretty)
}
