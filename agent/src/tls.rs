//! Loading the agent's certificates and building the QUIC client configuration (rustls on ring,
//! TLS 1.3 only, mutual TLS, ALPN `runnel/1`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use runnel_config::UplinkConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The agent's TLS identity, loaded from disk.
pub struct Identity {
    pub agent_id: String,
    pub client_config: quinn::ClientConfig,
}

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

/// TLS (rustls on ring) to an MQTT broker whose certificate chains to the CA in `ca` (PEM):
/// what `mqtts://` means for the MQTT sources and for MQTT actions.
pub fn mqtt_tls_transport(ca: &Path) -> anyhow::Result<rumqttc::Transport> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .with_context(|| format!("add broker CA from {}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS with the ring provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ))
}

pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("read private key from {}", path.display()))
}

/// The agent id: the common name of the certificate's subject.
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

pub fn load_identity(config: &UplinkConfig) -> anyhow::Result<Identity> {
    let ca = load_certs(&config.ca_cert)?;
    let certs = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    let agent_id = common_name(&certs[0])
        .with_context(|| format!("agent certificate {}", config.cert.display()))?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots
            .add(cert)
            .with_context(|| format!("add CA certificate from {}", config.ca_cert.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .with_context(|| {
            format!(
                "agent certificate {} and key {} do not match",
                config.cert.display(),
                config.key.display()
            )
        })?;
    tls.alpn_protocols = vec![runnel_common::wire::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(config.keep_alive_interval_ms)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms))
            .context("uplink.idle_timeout_ms")?,
    ));
    client_config.transport_config(Arc::new(transport));
    Ok(Identity {
        agent_id,
        client_config,
    })
}
