//! `tls-creds-x509`: loads QEMU's credential directory into a rustls server configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use serde_json::{Map, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a server endpoint needs to run TLS sessions.
pub struct ServerCreds {
    pub config: Arc<ServerConfig>,
    /// Client certificates are demanded and verified against the CA (QEMU's verify-peer).
    pub verify_peer: bool,
}

/// Loaded `tls-creds-x509` credentials.
pub struct X509Creds {
    /// `None` for a client endpoint (usable only by NBD clients, which blkd has none of).
    pub server: Option<ServerCreds>,
}

fn bool_prop(props: &Map<String, Value>, name: &str, default: bool) -> Result<bool, String> {
    match props.get(name) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if matches!(s.as_str(), "on" | "yes" | "true") => Ok(true),
        Some(Value::String(s)) if matches!(s.as_str(), "off" | "no" | "false") => Ok(false),
        Some(_) => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// An OS error as C's strerror() words it (QEMU's error_setg_errno), without Rust's suffix.
fn os_error_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(end) => text[..end].to_string(),
        None => text,
    }
}

/// QEMU's qcrypto_tls_creds_get_path: the file must be readable unless optional and absent.
fn cred_path(dir: &Path, name: &str, required: bool) -> Result<Option<PathBuf>, String> {
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Ok(_) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(format!(
            "Unable to access credentials {}: {}",
            path.display(),
            os_error_text(&e)
        )),
    }
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("Cannot load {what} '{}': {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "Cannot load {what} '{}': no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// QEMU's sanity check: refuse certificates that are outside their validity period now.
fn check_validity(cert: &CertificateDer<'_>, path: &Path) -> Result<(), String> {
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| format!("Unable to parse certificate {}: {e}", path.display()))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(format!("The certificate {} has expired", path.display()));
    }
    if validity.not_before > now {
        return Err(format!(
            "The certificate {} is not yet active",
            path.display()
        ));
    }
    Ok(())
}

/// Loads `tls-creds-x509` from its (schema-checked) properties, with QEMU's error texts.
pub fn load_x509(props: &Map<String, Value>) -> Result<X509Creds, String> {
    if props.contains_key("passwordid") {
        return Err(
            "tls-creds-x509: encrypted private keys ('passwordid') are not supported by blkd"
                .into(),
        );
    }
    if props.contains_key("priority") {
        // Silently ignoring a cipher policy would weaken what the operator asked for.
        return Err(
            "tls-creds-x509: 'priority' takes GnuTLS priority strings, which blkd's TLS \
             library (rustls) does not support"
                .into(),
        );
    }
    let dir = props
        .get("dir")
        .and_then(Value::as_str)
        .ok_or("Missing 'dir' property value")?;
    let dir = Path::new(dir);
    let verify_peer = bool_prop(props, "verify-peer", true)?;
    let sanity_check = bool_prop(props, "sanity-check", true)?;
    let endpoint = props
        .get("endpoint")
        .and_then(Value::as_str)
        .unwrap_or("client");
    match endpoint {
        "server" => {}
        "client" => {
            let ca_path = cred_path(dir, "ca-cert.pem", true)?.unwrap_or_default();
            let cas = load_certs(&ca_path, "CA certificate list")?;
            if sanity_check {
                cas.iter().try_for_each(|ca| check_validity(ca, &ca_path))?;
            }
            return Ok(X509Creds { server: None });
        }
        other => {
            return Err(format!(
                "Parameter 'endpoint' does not accept value '{other}'"
            ))
        }
    }

    let ca_path = cred_path(dir, "ca-cert.pem", true)?.unwrap_or_default();
    let crl_path = cred_path(dir, "ca-crl.pem", false)?;
    let cert_path = cred_path(dir, "server-cert.pem", true)?.unwrap_or_default();
    let key_path = cred_path(dir, "server-key.pem", true)?.unwrap_or_default();
    if cred_path(dir, "dh-params.pem", false)?.is_some() {
        log::debug!("tls-creds-x509: dh-params.pem is not needed: rustls only does (EC)DHE with built-in groups");
    }

    let cas = load_certs(&ca_path, "CA certificate list")?;
    let chain = load_certs(&cert_path, "certificate")?;
    if sanity_check {
        cas.iter().try_for_each(|ca| check_validity(ca, &ca_path))?;
        chain
            .first()
            .map_or(Ok(()), |cert| check_validity(cert, &cert_path))?;
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("Cannot load private key '{}': {e}", key_path.display()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = if verify_peer {
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| format!("Cannot load CA certificate '{}': {e}", ca_path.display()))?;
        }
        let crls = match &crl_path {
            Some(path) => CertificateRevocationListDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("Cannot load CRL '{}': {e}", path.display()))?,
            None => Vec::new(),
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            .build()
            .map_err(|e| format!("Cannot set up client verification: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "Cannot load certificate '{}' & key '{}': {e}",
            cert_path.display(),
            key_path.display()
        )
    })?;
    // No resumption: every connection presents, and has checked, a full client certificate.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(X509Creds {
        server: Some(ServerCreds {
            config: Arc::new(config),
            verify_peer,
        }),
    })
}
