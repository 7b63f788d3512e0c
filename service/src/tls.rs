//! Certificates and keys from PEM files, with errors that name the file; a root store from a CA
//! file; the common name of a certificate (an agent's identity). Building the TLS configurations
//! stays with each binary: they differ (QUIC client with a client certificate, QUIC server that
//! verifies clients, MQTT and webhook clients).

use std::path::Path;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Makes rustls on ring the process's default provider, for every TLS client that does not
/// bring its own (reqwest is built without a default provider, so one must be installed before
/// any client is built). Call it first thing in `main`; later calls change nothing.
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every certificate in the PEM file at `path` (at least one).
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse PEM certificates in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// The private key in the PEM file at `path`.
pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("read private key from {}", path.display()))
}

/// A root store of the CA certificates in the PEM file at `path`; `key` names the config key
/// that gave the path, for the error.
pub fn root_store(path: &Path, key: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path).with_context(|| format!("{key} {}", path.display()))? {
        roots
            .add(cert)
            .with_context(|| format!("add CA certificate from {key} {}", path.display()))?;
    }
    Ok(roots)
}

/// The common name of the certificate's subject.
pub fn common_name(cert: &CertificateDer<'_>) -> anyhow::Result<String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).context("parse certificate")?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .context("certificate subject has no common name (CN)")?;
    Ok(cn
        .as_str()
        .context("certificate common name is not text")?
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let error = format!("{:#}", load_certs(&empty).expect_err("no certificate"));
        assert!(error.contains("empty.pem"), "{error}");
        let error = format!(
            "{:#}",
            root_store(&dir.path().join("missing.pem"), "ingest.ca_cert").expect_err("missing")
        );
        assert!(
            error.contains("ingest.ca_cert") && error.contains("missing.pem"),
            "{error}"
        );
    }
}
