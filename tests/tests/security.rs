//! Security checks of the ingest endpoint (ARCHITECTURE.md guarantee 5: only enrolled agents get in).
//!
//! An agent's identity is the common name of its client certificate, verified against the fleet
//! CA during the QUIC/TLS handshake; no message carries an agent id the aggregator believes
//! (the Hello has none). So "claiming another agent's id" can only mean presenting a certificate
//! whose common name is that agent's without the fleet CA having signed it: a certificate from
//! another CA, or an expired one. A certificate the fleet CA signed for `edge-1` *is* `edge-1`.
//!
//! Each test drives a bare QUIC client with the certificate under test through the agent's
//! first exchange (Hello, read the answer), and checks it against a control: the same client
//! with a valid certificate gets its Welcome, so the refusal is the certificate's doing.
//! Missing certificates and foreign CAs with their own names are covered in `e2e.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runnel_tests::{AggregatorOptions, AggregatorProcess, Certs, TestDir, binaries, query_count};

/// What a bare client saw after its Hello.
#[derive(Debug)]
enum Outcome {
    /// The aggregator answered with a frame (a Welcome or a Refused).
    Answered(runnel_common::wire::AggregatorMessage),
    /// The handshake or the first exchange failed; the text says how.
    Refused(String),
}

/// Connects to `ingest` with `cert`/`key` as client certificate, trusting the fleet CA, and
/// tries the agent's first exchange.
async fn hello_with(
    certs: &Certs,
    cert: &Path,
    key: &Path,
    ingest: std::net::SocketAddr,
) -> Outcome {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&certs.ca_cert).expect("read CA") {
        roots.add(ca.expect("parse CA")).expect("add CA");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("read client certificate")
        .map(|c| c.expect("parse client certificate"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).expect("read client key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate and key match");
    tls.alpn_protocols = vec![runnel_common::wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("idle timeout"),
    ));
    client_config.transport_config(Arc::new(transport));
    let mut endpoint =
        quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("client endpoint");
    endpoint.set_default_client_config(client_config);

    let connection = match endpoint
        .connect(ingest, "localhost")
        .expect("start connect")
        .await
    {
        Err(error) => return Outcome::Refused(format!("handshake failed: {error}")),
        Ok(connection) => connection,
    };
    let hello = runnel_common::wire::AgentMessage::Hello(runnel_common::wire::Hello {
        min_protocol_version: runnel_common::wire::MIN_PROTOCOL_VERSION,
        max_protocol_version: runnel_common::wire::PROTOCOL_VERSION,
        agent_version: "security-test".to_owned(),
        config_hash: String::new(),
        labels: Default::default(),
        last_assigned_seq: 0,
    });
    let frame =
        runnel_common::frame::encode(&hello, runnel_common::limits::MAX_CONTROL_FRAME_BYTES)
            .expect("encode hello");
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&frame).await?;
        let mut prefix = [0u8; runnel_common::frame::LENGTH_PREFIX_BYTES];
        recv.read_exact(&mut prefix).await?;
        let n_bytes = runnel_common::frame::payload_len(
            prefix,
            runnel_common::limits::MAX_CONTROL_FRAME_BYTES,
        )?;
        let mut payload = vec![0u8; n_bytes];
        recv.read_exact(&mut payload).await?;
        let message: runnel_common::wire::AggregatorMessage =
            runnel_common::frame::decode_payload(&payload)?;
        anyhow::Ok(message)
    };
    let outcome = match tokio::time::timeout(Duration::from_secs(20), exchange).await {
        Ok(Ok(message)) => Outcome::Answered(message),
        Ok(Err(error)) => {
            let reason = connection.close_reason();
            assert!(
                !matches!(reason, Some(quinn::ConnectionError::TimedOut) | None),
                "the aggregator did not close the connection: {error:#}, close reason {reason:?}"
            );
            Outcome::Refused(format!("{error:#} (close reason {reason:?})"))
        }
        Err(_) => panic!("the aggregator neither answered nor closed the connection"),
    };
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    outcome
}

fn assert_welcomed(outcome: &Outcome, what: &str) {
    assert!(
        matches!(
            outcome,
            Outcome::Answered(runnel_common::wire::AggregatorMessage::Welcome(_))
        ),
        "{what}: the control client with a valid certificate got no Welcome: {outcome:?}"
    );
}

fn assert_refused(outcome: &Outcome, what: &str) {
    match outcome {
        Outcome::Refused(how) => eprintln!("{what}: refused: {how}"),
        Outcome::Answered(message) => {
            panic!("{what}: the aggregator let it in and answered {message:?}")
        }
    }
}

/// Waits until the aggregator's stderr has a line that says it refused a connection and
/// contains every one of `words`.
async fn wait_refusal_logged(dir: &TestDir, aggregator: &AggregatorProcess, words: &[&str]) {
    let what = format!("the aggregator logs a refusal mentioning {words:?}");
    dir.wait_until(Duration::from_secs(30), &what, || {
        let stderr = aggregator.stderr();
        async move {
            anyhow::ensure!(
                stderr
                    .lines()
                    .any(|line| line.contains("refused") && words.iter().all(|w| line.contains(w))),
                "no such line yet"
            );
            Ok(())
        }
    })
    .await;
}

fn start_aggregator(dir: &TestDir) -> (Certs, AggregatorProcess) {
    let certs = Certs::init(&dir.join("certs"));
    let aggregator =
        AggregatorProcess::start(&binaries!(), dir, &certs, AggregatorOptions::default());
    (certs, aggregator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_claiming_an_enrolled_id_is_refused() {
    let dir = TestDir::new("sec-claim-id");
    let (certs, aggregator) = start_aggregator(&dir);
    let real = certs.issue_agent("edge-1");
    let ingest = aggregator.ingest_addr();

    // Control: the enrolled edge-1 is let in.
    let outcome = hello_with(&certs, &real.cert, &real.key, ingest).await;
    assert_welcomed(&outcome, "enrolled edge-1");

    // An impostor with a certificate for the same name, "edge-1", from a CA of its own.
    let foreign = Certs::init(&dir.join("foreign-certs"));
    let impostor = foreign.issue_agent("edge-1");
    let outcome = hello_with(&certs, &impostor.cert, &impostor.key, ingest).await;
    assert_refused(&outcome, "edge-1 signed by another CA");
    wait_refusal_logged(&dir, &aggregator, &["UnknownIssuer"]).await;
    let n_events = query_count(aggregator.query_addr(), "SELECT count(*) FROM events")
        .await
        .expect("count");
    assert_eq!(n_events, 0, "nothing was sent, so nothing may be stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused() {
    let dir = TestDir::new("sec-expired");
    let (certs, aggregator) = start_aggregator(&dir);
    let ingest = aggregator.ingest_addr();
    let valid = certs.issue_agent("edge-valid");
    let outcome = hello_with(&certs, &valid.cert, &valid.key, ingest).await;
    assert_welcomed(&outcome, "edge-valid");

    let (cert, key) = issue_expired(&certs, "edge-expired", &dir.join("expired"));
    let outcome = hello_with(&certs, &cert, &key, ingest).await;
    assert_refused(
        &outcome,
        "a certificate the fleet CA signed that expired in 2020",
    );
    wait_refusal_logged(&dir, &aggregator, &["xpired"]).await;
}

/// A client certificate for `name`, signed by the fleet CA, valid only on 1 January 2020. Made
/// with the `openssl` command (`openssl ca` sets past validity dates; the harness's rcgen-based
/// `certs` code only issues certificates valid from yesterday).
fn issue_expired(certs: &Certs, name: &str, out_dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(out_dir).expect("create dir");
    let ca_key = certs.dir.join(runnel_aggregator::certs::CA_KEY);
    let config = out_dir.join("ca.cnf");
    std::fs::write(
        &config,
        "[ ca ]\n\
         default_ca = test_ca\n\
         [ test_ca ]\n\
         database = index.txt\n\
         new_certs_dir = .\n\
         serial = serial\n\
         default_md = sha256\n\
         policy = any_name\n\
         x509_extensions = client\n\
         [ any_name ]\n\
         commonName = supplied\n\
         [ client ]\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\n",
    )
    .expect("write openssl config");
    std::fs::write(out_dir.join("index.txt"), "").expect("write index");
    std::fs::write(out_dir.join("serial"), "1000\n").expect("write serial");
    let cert = out_dir.join(format!("{name}.pem"));
    let key = out_dir.join(format!("{name}.key"));
    let csr = out_dir.join(format!("{name}.csr"));
    let run = |args: &[&str]| {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(out_dir)
            .output()
            .unwrap_or_else(|error| panic!("run openssl {args:?} (is it installed?): {error}"));
        assert!(
            output.status.success(),
            "openssl {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &path(&key),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &path(&key),
        "-subj",
        &format!("/CN={name}"),
        "-out",
        &path(&csr),
    ]);
    run(&[
        "ca",
        "-batch",
        "-notext",
        "-config",
        &path(&config),
        "-cert",
        &path(&certs.ca_cert),
        "-keyfile",
        &path(&ca_key),
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
        "-in",
        &path(&csr),
        "-out",
        &path(&cert),
    ]);
    (cert, key)
}
