//! A local certificate authority for mutual TLS: `psi-server ca init` makes
//! the operator's CA and the server's certificate; `psi-server ca issue`
//! makes an institution's client certificate, whose subject common name is
//! the institution id the server sees.
//!
//! Files (private keys mode 0600, all written atomically):
//! `ca.pem`, `ca.key`, `server.pem`, `server.key`, and per institution
//! `INSTITUTION.pem` and `INSTITUTION.key`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use psi_files::atomic::write_atomically;

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca.key";
/// The server certificate's file name.
pub const SERVER_CERT: &str = "server.pem";
/// The server key's file name.
pub const SERVER_KEY: &str = "server.key";

/// Institution ids that would name the CA's or the server's files.
const RESERVED: [&str; 2] = ["ca", "server"];

/// Whether `id` is a valid institution id: 1 to 64 of `A-Z a-z 0-9 . _ -`.
#[must_use]
pub fn is_valid_institution(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Creates the CA and the server certificate in `dir`. `server_names` are
/// DNS names or IP addresses the server is reached at.
///
/// # Errors
/// An existing CA in `dir` (never overwritten), or I/O errors.
pub fn init(dir: &Path, server_names: &[String]) -> Result<()> {
    if let Some(bad) = server_names
        .iter()
        .find(|n| n.is_empty() || n.chars().any(|c| c.is_whitespace() || c == ','))
    {
        bail!(
            "`{bad}` is not one server name: give each DNS name or IP address with its own --server-name"
        );
    }
    if dir.join(CA_KEY).exists() {
        bail!(
            "{} already holds a CA; refusing to overwrite it",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "psi-match operator CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    write_atomically(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;

    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(Vec::<String>::new())?;
    server
        .distinguished_name
        .push(DnType::CommonName, "psi-server");
    for name in server_names {
        server.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        });
    }
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer)?;
    write_atomically(
        &dir.join(SERVER_KEY),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomically(&dir.join(SERVER_CERT), server_cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Issues a client certificate for `institution`, signed by the CA in `dir`,
/// into `out_dir`. Returns the certificate and key paths.
///
/// # Errors
/// An invalid or reserved institution id, an institution that already has
/// a key in `out_dir` (unless `replace`), a missing CA, or I/O errors.
pub fn issue(
    dir: &Path,
    institution: &str,
    out_dir: &Path,
    replace: bool,
) -> Result<(PathBuf, PathBuf)> {
    if !is_valid_institution(institution) {
        bail!("institution id `{institution}` must be 1 to 64 letters, digits, '.', '_' or '-'");
    }
    // The CA's and the server's own files are ca.* and server.*: an
    // institution of that name would overwrite them.
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(institution)) {
        bail!(
            "institution id `{institution}` is reserved: the CA's and the server's files are named {}",
            [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY].join(", ")
        );
    }
    let cert_path = out_dir.join(format!("{institution}.pem"));
    let key_path = out_dir.join(format!("{institution}.key"));
    if !replace && (key_path.exists() || cert_path.exists()) {
        bail!(
            "{} already exists: institution {institution} has a certificate; pass --replace to issue a new key and certificate in its place",
            key_path.display()
        );
    }
    let ca_pem = std::fs::read_to_string(dir.join(CA_CERT)).with_context(|| {
        format!(
            "reading {} (run `psi-server ca init` first)",
            dir.join(CA_CERT).display()
        )
    })?;
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(dir.join(CA_KEY))
            .with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?,
    )?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, institution);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// The institution id in a client certificate: its subject common name.
///
/// # Errors
/// An unparsable certificate, or no valid common name.
pub fn institution_of(cert_der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|_| anyhow::anyhow!("unparsable client certificate"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .context("client certificate has no common name")?;
    if !is_valid_institution(cn) {
        bail!("client certificate's common name is not a valid institution id");
    }
    Ok(cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_institution() {
        let dir = tempfile::tempdir().unwrap();
        // Two names in one flag's value: refused, saying to repeat the flag.
        let err = init(dir.path(), &["a.example b.example".into()]).unwrap_err();
        assert!(err.to_string().contains("its own --server-name"), "{err}");
        assert!(!dir.path().join(CA_KEY).exists(), "nothing written");
        init(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(init(dir.path(), &[]).is_err(), "never overwrites a CA");
        let (cert, key) = issue(dir.path(), "bank-001", &dir.path().join("out"), false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pem = std::fs::read_to_string(cert).unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        assert_eq!(institution_of(&der).unwrap(), "bank-001");
        assert!(issue(dir.path(), "bad id!", dir.path(), false).is_err());
        // Never the CA's or the server's files, never an existing key
        // without --replace.
        let ca_key = std::fs::read(dir.path().join(CA_KEY)).unwrap();
        let server_key = std::fs::read(dir.path().join(SERVER_KEY)).unwrap();
        for reserved in ["ca", "server", "CA", "Server"] {
            let err = issue(dir.path(), reserved, dir.path(), true).unwrap_err();
            assert!(err.to_string().contains("reserved"), "{err}");
        }
        assert_eq!(std::fs::read(dir.path().join(CA_KEY)).unwrap(), ca_key);
        assert_eq!(
            std::fs::read(dir.path().join(SERVER_KEY)).unwrap(),
            server_key
        );
        let first = std::fs::read(&key).unwrap();
        let err = issue(dir.path(), "bank-001", &dir.path().join("out"), false).unwrap_err();
        assert!(err.to_string().contains("--replace"), "{err}");
        assert_eq!(std::fs::read(&key).unwrap(), first);
        issue(dir.path(), "bank-001", &dir.path().join("out"), true).unwrap();
        assert_ne!(std::fs::read(&key).unwrap(), first);
        assert!(institution_of(b"garbage").is_err());
    }
}
