//! `runnel-aggregator certs`: the fleet's small PKI (rcgen, ring).
//!
//! `init` makes a CA and the aggregator's server certificate; `issue-agent` makes an agent
//! certificate whose subject common name is the agent id. The aggregator trusts exactly the
//! certificates this CA signed, and takes an agent's id from its certificate, never from what
//! the agent says.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";

/// Default validity of agent and server certificates. Rotation is an operation (docs/), not
/// something a two-year certificate lets you forget.
pub const DEFAULT_VALIDITY_DAYS: u32 = 825;

/// Files written by `init`.
#[derive(Debug)]
pub struct CaFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Files written by `issue_agent`.
#[derive(Debug)]
pub struct AgentFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Agent ids become certificate names, file names and SQL values: keep them plain.
pub fn validate_agent_id(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    anyhow::ensure!(
        ok,
        "agent name {name:?} is not allowed: use 1 to 128 characters of letters, digits, '-', '_' and '.', not starting with '.'"
    );
    Ok(())
}

/// Creates a CA and a server certificate valid for `server_names` (DNS names or IP addresses)
/// in `dir`. Refuses to overwrite an existing CA unless `force`.
pub fn init(
    dir: &Path,
    server_names: &[String],
    days: u32,
    force: bool,
) -> anyhow::Result<CaFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let files = CaFiles {
        ca_cert: dir.join(CA_CERT),
        ca_key: dir.join(CA_KEY),
        server_cert: dir.join(SERVER_CERT),
        server_key: dir.join(SERVER_KEY),
    };
    if files.ca_key.exists() && !force {
        anyhow::bail!(
            "{} already exists: a new CA would lock out every enrolled agent. Pass --force to replace it",
            files.ca_key.display()
        );
    }
    let ca_key = KeyPair::generate().context("generate CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    // A name unique to this CA: an agent whose certificate comes from another Runnel CA is then
    // refused as "unknown issuer", which says what is wrong, rather than "bad signature".
    let created = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    let nonce = u32::from_le_bytes(
        ca_key.public_key_raw()[1..5]
            .try_into()
            .expect("keys are longer than 4 bytes"),
    );
    ca_params.distinguished_name = name(&format!("Runnel fleet CA {created} {nonce:08x}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).context("self-sign CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().context("generate server key")?;
    let mut server_params =
        CertificateParams::new(server_names.to_vec()).context("server names")?;
    server_params.distinguished_name = name("runnel-aggregator");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut server_params, days)?;
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .context("sign server certificate")?;

    write_private(&files.ca_key, &issuer.key().serialize_pem())?;
    write_public(&files.ca_cert, &ca_cert.pem())?;
    write_private(&files.server_key, &server_key.serialize_pem())?;
    write_public(&files.server_cert, &server_cert.pem())?;
    Ok(files)
}

/// Issues a client certificate for agent `agent_id`, signed by the CA in `dir`, written to
/// `out_dir/<agent_id>.pem` and `.key`.
pub fn issue_agent(
    dir: &Path,
    agent_id: &str,
    out_dir: &Path,
    days: u32,
) -> anyhow::Result<AgentFiles> {
    validate_agent_id(agent_id)?;
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    let ca_cert_pem = std::fs::read_to_string(&ca_cert_path).with_context(|| {
        format!(
            "read {} (run `runnel-aggregator certs init` first)",
            ca_cert_path.display()
        )
    })?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("read {}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("parse {}", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .with_context(|| format!("parse {}", ca_cert_path.display()))?;

    let key = KeyPair::generate().context("generate agent key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("agent parameters")?;
    params.distinguished_name = name(agent_id);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, days)?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("sign agent certificate")?;

    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let files = AgentFiles {
        cert: out_dir.join(format!("{agent_id}.pem")),
        key: out_dir.join(format!("{agent_id}.key")),
    };
    write_private(&files.key, &key.serialize_pem())?;
    write_public(&files.cert, &cert.pem())?;
    Ok(files)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, days: u32) -> anyhow::Result<()> {
    use chrono::Datelike;
    anyhow::ensure!(days >= 1, "--days must be at least 1");
    let start = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let end = start + chrono::Days::new(u64::from(days) + 1);
    let ymd = |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    params.not_before = ymd(start);
    params.not_after = ymd(end);
    Ok(())
}

fn write_public(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem).with_context(|| format!("write {}", path.display()))
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(pem.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("sync {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            30,
            false,
        )
        .unwrap();
        assert!(files.server_cert.exists() && files.ca_cert.exists());
        let err = init(dir.path(), &["localhost".into()], 30, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--force"), "{err}");
        let agent = issue_agent(dir.path(), "edge-1", &dir.path().join("agents"), 30).unwrap();
        let pem = std::fs::read_to_string(&agent.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&agent.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(issue_agent(dir.path(), "../evil", dir.path(), 30).is_err());
        assert!(issue_agent(dir.path(), "", dir.path(), 30).is_err());
    }
}
