//! Loaded TLS credentials and authorization objects, shared with NBD connection threads,
//! and the NBD server's TLS upgrade built from them.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind};
use std::sync::{Arc, RwLock};

use rustls::{CertificateError, ServerConnection};
use serde_json::{Map, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::authz::Authz;
use super::creds::{self, X509Creds};
use super::dn;
use super::stream::TlsStream;

enum Loaded {
    Creds(X509Creds),
    Authz(Authz),
}

/// The TLS-related objects by id. Cheap to clone; clones share the table, so that a
/// connection accepted later sees authorization objects added or removed since the NBD
/// server started (QEMU looks `tls-authz` up per connection).
#[derive(Clone, Default)]
pub struct Registry {
    objects: Arc<RwLock<BTreeMap<String, Arc<Loaded>>>>,
}

impl Registry {
    /// Loads and validates object `id` (`object-add` / `--object`), then makes it available.
    pub fn add(&self, id: &str, qom_type: &str, props: &Map<String, Value>) -> Result<(), String> {
        let loaded = match qom_type {
            "tls-creds-x509" => Loaded::Creds(creds::load_x509(props)?),
            // Refuse rather than ever fall back to plaintext or to weaker authentication.
            "tls-creds-psk" => {
                return Err(format!(
                    "TLS credentials '{id}': tls-creds-psk is not supported: blkd's TLS \
                     library (rustls) has no pre-shared-key cipher suites; use tls-creds-x509"
                ))
            }
            "tls-creds-anon" => {
                return Err(format!(
                    "TLS credentials '{id}': tls-creds-anon is not supported: blkd's TLS \
                     library (rustls) has no anonymous cipher suites; use tls-creds-x509"
                ))
            }
            "authz-simple" | "authz-list" | "authz-list-file" => {
                Loaded::Authz(Authz::from_props(qom_type, props)?)
            }
            other => {
                return Err(format!(
                    "Parameter 'qom-type' does not accept value '{other}'"
                ))
            }
        };
        let mut objects = self.objects.write().unwrap_or_else(|p| p.into_inner());
        objects.insert(id.to_string(), Arc::new(loaded));
        Ok(())
    }

    /// Forgets object `id` (`object-del`). A running NBD server keeps the credentials it
    /// started with; a deleted `tls-authz` object refuses every later connection.
    pub fn remove(&self, id: &str) {
        let mut objects = self.objects.write().unwrap_or_else(|p| p.into_inner());
        objects.remove(id);
    }

    fn get(&self, id: &str) -> Option<Arc<Loaded>> {
        let objects = self.objects.read().unwrap_or_else(|p| p.into_inner());
        objects.get(id).cloned()
    }

    /// The TLS hook for an NBD server using credentials `creds_id` and, if given, checking
    /// clients against authorization object `authz_id` (which need not exist yet).
    pub fn server_upgrade(
        &self,
        creds_id: &str,
        authz_id: Option<&str>,
    ) -> Result<Arc<dyn nbd::TlsUpgrade>, String> {
        let loaded = self
            .get(creds_id)
            .ok_or_else(|| format!("No TLS credentials with id '{creds_id}'"))?;
        let Loaded::Creds(creds) = &*loaded else {
            return Err(format!(
                "Object with id '{creds_id}' is not TLS credentials"
            ));
        };
        let server = creds
            .server
            .as_ref()
            .ok_or("Expected TLS credentials for a server endpoint")?;
        if let (Some(authz_id), false) = (authz_id, server.verify_peer) {
            // QEMU silently skips tls-authz without verify-peer, letting everyone in.
            return Err(format!(
                "tls-authz '{authz_id}' needs client certificates, but TLS credentials \
                 '{creds_id}' have verify-peer=off"
            ));
        }
        Ok(Arc::new(Upgrade {
            config: Arc::clone(&server.config),
            verify_peer: server.verify_peer,
            authz_id: authz_id.map(str::to_string),
            registry: self.clone(),
        }))
    }

    /// QEMU's qauthz_is_allowed_by_id.
    fn is_allowed_by_id(&self, authz_id: &str, identity: &str) -> Result<bool, String> {
        let loaded = self
            .get(authz_id)
            .ok_or_else(|| format!("Cannot find QAuthZ object ID {authz_id}"))?;
        match &*loaded {
            Loaded::Authz(authz) => authz.is_allowed(identity),
            Loaded::Creds(_) => Err(format!("Object '{authz_id}' is not a QAuthZ subclass")),
        }
    }
}

struct Upgrade {
    config: Arc<rustls::ServerConfig>,
    verify_peer: bool,
    authz_id: Option<String>,
    registry: Registry,
}

/// QEMU's texts for a client certificate that fails verification.
fn handshake_error(e: io::Error) -> io::Error {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                io::Error::new(ErrorKind::TimedOut, "TLS handshake timed out")
            }
            kind => io::Error::new(kind, format!("TLS handshake failed: {e}")),
        };
    };
    let text = match tls {
        rustls::Error::NoCertificatesPresented => {
            "Verify failed: No certificate was found.".to_string()
        }
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            CertificateError::Revoked => "The certificate has been revoked".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "The certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            other => format!("The certificate is not trusted: {other}"),
        },
        other => format!("TLS handshake failed: {other}"),
    };
    io::Error::new(ErrorKind::PermissionDenied, text)
}

impl Upgrade {
    /// The client's identity in QEMU's DN format, from the verified leaf certificate.
    fn peer_identity(conn: &ServerConnection) -> Result<String, String> {
        let leaf = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or("No certificate peers")?;
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| format!("Cannot import certificate: {e}"))?;
        Ok(dn::subject(&cert))
    }

    fn authorize(&self, conn: &ServerConnection) -> Result<(), String> {
        if !self.verify_peer {
            return Ok(());
        }
        let identity = Self::peer_identity(conn)?;
        let Some(authz_id) = &self.authz_id else {
            log::debug!("NBD TLS client {identity}: certificate verified");
            return Ok(());
        };
        if !self.registry.is_allowed_by_id(authz_id, &identity)? {
            return Err(format!("TLS x509 authz check for {identity} is denied"));
        }
        log::debug!("NBD TLS client {identity}: allowed by '{authz_id}'");
        Ok(())
    }
}

impl nbd::TlsUpgrade for Upgrade {
    fn upgrade(&self, plain: Box<dyn nbd::Stream>) -> io::Result<Box<dyn nbd::Stream>> {
        let mut socket = plain;
        let mut conn = ServerConnection::new(Arc::clone(&self.config))
            .map_err(|e| io::Error::other(format!("TLS session setup: {e}")))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut socket).map_err(handshake_error)?;
        }
        if let Err(text) = self.authorize(&conn) {
            // A clean end for the refused client: close_notify, then the caller closes.
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(&mut socket).is_err() {
                    break;
                }
            }
            return Err(io::Error::new(ErrorKind::PermissionDenied, text));
        }
        Ok(Box::new(TlsStream::new(conn, socket)?))
    }
}
