//! Loading the agent's certificates and building the QUIC client configuration (rustls on ring,
//! TLS 1.3 only, mutual TLS, ALPN `runnel/1`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use runnel_config::UplinkConfig;
pub use runnel_service::tls::{common_name, load_certs, load_key};

/// The agent's TLS identity, loaded from disk.
pub struct Identity {
    pub agent_id: String,
    pub client_config: quinn::ClientConfig,
}

/// TLS (rustls on ring) to an MQTT broker whose certificate chains to the CA in `ca` (PEM):
/// what `mqtts://` means for the MQTT sources and for MQTT actions.
pub fn mqtt_tls_transport(ca: &Path) -> anyhow::Result<rumqttc::Transport> {
    let roots = runnel_service::tls::root_store(ca, "broker CA")?;
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

pub fn load_identity(config: &UplinkConfig) -> anyhow::Result<Identity> {
    let roots = runnel_service::tls::root_store(&config.ca_cert, "uplink.ca_cert")?;
    let certs = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    let agent_id = common_name(&certs[0])
        .with_context(|| format!("agent certificate {}", config.cert.display()))?;

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
