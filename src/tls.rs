//! TLS credential and authorization objects for the NBD server.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::daemon::Daemon;

/// Checks an object's properties when it is created.
pub fn check_object(qom_type: &str, props: &Map<String, Value>) -> Result<(), String> {
    let get = |k: &str| props.get(k).and_then(Value::as_str);
    match qom_type {
        "tls-creds-x509" | "tls-creds-psk" | "tls-creds-anon" => {
            if let Some(e) = get("endpoint") {
                if e != "server" && e != "client" {
                    return Err(format!("Parameter 'endpoint' does not accept value '{e}'"));
                }
            }
            Ok(())
        }
        "authz-simple" | "authz-list" | "authz-list-file" => Ok(()),
        other => Err(format!("Parameter 'qom-type' does not accept value '{other}'")),
    }
}

/// Resolves `tls-creds` (and `tls-authz`) for `nbd-server-start`.
pub fn server_upgrade(
    daemon: &Daemon,
    creds_id: &str,
    _authz_id: Option<&str>,
) -> Result<Arc<dyn nbd::TlsUpgrade>, String> {
    let Some(obj) = daemon.objects.get(creds_id) else {
        return Err(if daemon.iothreads.contains_key(creds_id) {
            format!("Object with id '{creds_id}' is not TLS credentials")
        } else {
            format!("No TLS credentials with id '{creds_id}'")
        });
    };
    if !obj.is_tls_creds() {
        return Err(format!("Object with id '{creds_id}' is not TLS credentials"));
    }
    // QEMU's credentials default to the client endpoint.
    if obj.props.get("endpoint").and_then(Value::as_str) != Some("server") {
        return Err("Expected TLS credentials for a server endpoint".into());
    }
    // Refuse rather than serve in plaintext what the operator asked to encrypt.
    Err(format!(
        "TLS credentials '{creds_id}' ({}): NBD over TLS is not available in this build of blkd",
        obj.qom_type
    ))
}
