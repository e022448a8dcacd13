//! User-creatable objects (`--object`, `object-add`, `object-del`) other than
//! iothreads, which live in `Daemon::iothreads`.

use serde_json::{Map, Value};

/// A TLS credential or authorization object, kept with its validated properties.
pub struct UserObject {
    pub qom_type: String,
    pub props: Map<String, Value>,
}

impl UserObject {
    pub fn is_tls_creds(&self) -> bool {
        self.qom_type.starts_with("tls-creds-")
    }
}
