//! TLS credential and authorization objects for the NBD server (NBD over TLS with rustls).
//!
//! `tls-creds-x509` objects load QEMU's credential directory at `object-add` time;
//! `authz-simple`, `authz-list` and `authz-list-file` objects decide which client
//! certificates (by distinguished name, in QEMU's format) may connect. Both live in a
//! [`Registry`] shared with the NBD connection threads, so that `tls-authz` is looked up per
//! connection, as QEMU does.

mod authz;
mod creds;
mod dn;
mod registry;
mod stream;

use std::sync::Arc;

pub use registry::Registry;

use crate::daemon::Daemon;

/// Resolves `tls-creds` (and `tls-authz`) for `nbd-server-start`.
pub fn server_upgrade(
    daemon: &Daemon,
    creds_id: &str,
    authz_id: Option<&str>,
) -> Result<Arc<dyn nbd::TlsUpgrade>, String> {
    if daemon.iothreads.contains_key(creds_id) {
        return Err(format!(
            "Object with id '{creds_id}' is not TLS credentials"
        ));
    }
    daemon.tls.server_upgrade(creds_id, authz_id)
}
