//! Certificates and TLS configs for Ferry's mutual-TLS QUIC links.
//!
//! The coordinator owns a CA. Every certificate it issues names its holder in a URI SAN:
//! `ferry://admin` for ferryctl, `ferry://agent/<cluster>/<member>` for an agent. The coordinator reads that
//! SAN from the verified peer certificate to decide what the peer may do, so an agent certificate can only
//! ever speak for its own cluster and member.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

use crate::protocol::ALPN;
use crate::resources::{validate_name, InvalidName};

/// How long a silent link lives before QUIC drops it. Keep-alives (below) keep healthy idle links open, so this
/// only fires when the peer is really gone; well under the 30 s quinn default, so agents notice quickly.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Keep-alive interval: keeps idle links (and NAT mappings of agents behind NAT) open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// An agent's link to the coordinator drops after this much silence (QUIC takes the lower of both sides'
/// idle timeouts): a SIGKILLed leader goes unnoticed this long at most, so agents start for the other
/// replicas within 4 s of the kill (issue 27: registered with a live one within about 5 s), not after the 20 s
/// of [`IDLE_TIMEOUT`].
pub const AGENT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// An agent's keep-alive: four per idle timeout, so up to three lost packets in a row do not end a healthy
/// link. At 10 000 agents that is about 10 000 small packets a second at the coordinator (docs/PERFORMANCE.md).
pub const AGENT_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Streams a peer may have open at once on one connection.
const MAX_STREAMS: u32 = 4;

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// ferryctl: may do everything.
    Admin,
    /// ferryctl with a read-only credential: may only `get`.
    AdminReadOnly,
    /// An agent: speaks only for this cluster and member.
    Agent { cluster: String, member: String },
}

impl Identity {
    fn uri(&self) -> String {
        match self {
            Self::Admin => "ferry://admin".to_string(),
            Self::AdminReadOnly => "ferry://admin-ro".to_string(),
            Self::Agent { cluster, member } => format!("ferry://agent/{cluster}/{member}"),
        }
    }

    fn common_name(&self) -> String {
        match self {
            Self::Admin => "ferry-admin".to_string(),
            Self::AdminReadOnly => "ferry-admin-ro".to_string(),
            Self::Agent { cluster, member } => format!("ferry-agent {cluster}/{member}"),
        }
    }

    fn from_uri(uri: &str) -> Option<Self> {
        match uri {
            "ferry://admin" => return Some(Self::Admin),
            "ferry://admin-ro" => return Some(Self::AdminReadOnly),
            _ => {}
        }
        let rest = uri.strip_prefix("ferry://agent/")?;
        let (cluster, member) = rest.split_once('/')?;
        if validate_name("cluster", cluster).is_err() || validate_name("member", member).is_err() {
            return None;
        }
        Some(Self::Agent { cluster: cluster.to_string(), member: member.to_string() })
    }

    /// Reads the identity from the first certificate of a PEM bundle.
    pub fn from_pem(cert_pem: &str) -> Result<Self, TlsError> {
        Self::from_certificate(&certs(cert_pem, "certificate")?[0])
    }

    /// Reads the identity from a (verified) peer certificate.
    pub fn from_certificate(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::Certificate(format!("unparseable peer certificate: {e}")))?;
        let san =
            cert.subject_alternative_name().map_err(|e| TlsError::Certificate(format!("bad subjectAltName: {e}")))?;
        san.into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|n| match n {
                GeneralName::URI(u) => Self::from_uri(u),
                _ => None,
            })
            .ok_or_else(|| TlsError::Certificate("certificate names no Ferry identity (ferry://… URI SAN)".into()))
    }
}

/// Building certificates or TLS configs failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Generate(rcgen::Error),
    #[error("{0}")]
    Pem(String),
    #[error("{0}")]
    Certificate(String),
    #[error("tls config: {0}")]
    Rustls(rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    #[error("quic crypto config: {0}")]
    Quic(String),
    #[error(transparent)]
    Name(#[from] InvalidName),
}

impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e)
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        Self::Rustls(e)
    }
}

impl From<rustls::server::VerifierBuilderError> for TlsError {
    fn from(e: rustls::server::VerifierBuilderError) -> Self {
        Self::Verifier(e)
    }
}

/// A PEM certificate and its private key.
#[derive(Clone)]
pub struct CertifiedPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedPem").field("key_pem", &"***").finish_non_exhaustive()
    }
}

/// An agent certificate just issued, with what the coordinator records about it.
#[derive(Debug)]
pub struct IssuedCert {
    pub pem: CertifiedPem,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    pub not_after: std::time::SystemTime,
}

/// A certificate signed for a key the CA never saw (the holder keeps it): public material only.
#[derive(Debug, Clone)]
pub struct SignedCert {
    pub cert_pem: String,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    pub not_after: std::time::SystemTime,
}

/// The public key of a signing request whose signature checked out (the requester holds its private key).
#[derive(Debug, Clone)]
pub struct CsrPublicKey(rcgen::PublicKey);

/// Reads a PEM PKCS#10 signing request and checks its signature; only its public key is kept, every name and
/// extension it asks for is dropped.
pub fn csr_public_key(csr_pem: &str) -> Result<CsrPublicKey, TlsError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| TlsError::Certificate(format!("signing request: {e}")))?;
    Ok(CsrPublicKey(csr.public_key))
}

/// A key pair made on the node that will hold it, and the signing request for it. `Debug` hides the key.
pub struct NewKey {
    pub key_pem: String,
    pub csr_pem: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey").field("key_pem", &"***").finish_non_exhaustive()
    }
}

/// A fresh key pair and a signing request for it naming `identity` (for readability only: the coordinator
/// decides the names of what it signs).
pub fn new_key_and_csr(identity: &Identity) -> Result<NewKey, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.common_name());
    params.distinguished_name = dn;
    params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
    let csr = params.serialize_request(&key)?;
    Ok(NewKey { key_pem: key.serialize_pem(), csr_pem: csr.pem()? })
}

/// Whether `key_pem` is the private key of the first certificate in `cert_pem`.
pub fn key_matches_certificate(cert_pem: &str, key_pem: &str) -> Result<bool, TlsError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem(format!("private key: {e}")))?;
    let der = &certs(cert_pem, "certificate")?[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Certificate(format!("unparseable certificate: {e}")))?;
    Ok(cert.tbs_certificate.subject_pki.raw == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice())
}

/// The serial number (lowercase hex, as [`CertAuthority::issue_agent`] records it) of a DER certificate.
pub fn certificate_serial(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Certificate(format!("unparseable peer certificate: {e}")))?;
    Ok(hex::encode(cert.tbs_certificate.raw_serial()))
}

/// The serial (as [`certificate_serial`]) and the expiry of the first certificate of a PEM bundle.
pub fn pem_serial_and_expiry(cert_pem: &str) -> Result<(String, std::time::SystemTime), TlsError> {
    let der = &certs(cert_pem, "certificate")?[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Certificate(format!("unparseable certificate: {e}")))?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok((certificate_serial(der)?, std::time::UNIX_EPOCH + Duration::from_secs(not_after)))
}

/// Whether the DER certificate `der` names the first certificate of `ca_pem` as its issuer (Ferry's CAs have
/// names of their own; the chain itself is checked by TLS).
pub fn issued_by(der: &[u8], ca_pem: &str) -> Result<bool, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Certificate(format!("unparseable certificate: {e}")))?;
    let ca_der = &certs(ca_pem, "CA certificate")?[0];
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| TlsError::Certificate(format!("unparseable CA certificate: {e}")))?;
    Ok(cert.issuer().as_raw() == ca.subject().as_raw())
}

/// The subject's common name of the first certificate of a PEM bundle (for showing a CA).
pub fn pem_common_name(cert_pem: &str) -> Result<String, TlsError> {
    let all = certs(cert_pem, "certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&all[0])
        .map_err(|e| TlsError::Certificate(format!("unparseable certificate: {e}")))?;
    let name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default();
    Ok(name.to_string())
}

/// The coordinator's certificate authority.
pub struct CertAuthority {
    pem: CertifiedPem,
    issuer: Issuer<'static, KeyPair>,
}

/// Certificates Ferry issues are valid this many years; operators rotate by re-issuing.
const CERT_VALIDITY_YEARS: i32 = 10;

fn base_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ferry");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    // Backdated to last year so a peer whose clock runs slightly behind still accepts a fresh certificate.
    p.not_before = rcgen::date_time_ymd(this_year() - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(this_year() + CERT_VALIDITY_YEARS, 1, 1);
    p
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

impl CertAuthority {
    /// A fresh CA.
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        // A name of its own: while a rotation trusts two CAs, which one issued a certificate is read from its
        // issuer name ([`issued_by`]).
        let mut params = base_params(&format!("Ferry CA {:08x}", rand::random::<u32>()));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        let pem = CertifiedPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    /// The CA saved earlier.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem(format!("CA key: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| TlsError::Pem(format!("CA certificate: {e}")))?;
        Ok(Self { pem: CertifiedPem { cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string() }, issuer })
    }

    pub fn pem(&self) -> &CertifiedPem {
        &self.pem
    }

    /// A server certificate for the coordinator, valid for every name and IP given.
    pub fn issue_server(&self, names: &[String]) -> Result<CertifiedPem, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = base_params("ferry-coordinator");
        for n in names {
            params.subject_alt_names.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// An agent's certificate, valid for `valid_for` from now, with a fresh random serial that the
    /// coordinator records (and can revoke).
    pub fn issue_agent(&self, cluster: &str, member: &str, valid_for: Duration) -> Result<IssuedCert, TlsError> {
        validate_name("cluster", cluster)?;
        validate_name("member", member)?;
        self.issue_expiring(&Identity::Agent { cluster: cluster.into(), member: member.into() }, valid_for)
    }

    /// A client certificate for `identity`, valid for `valid_for` from now, with a fresh random serial.
    pub fn issue_expiring(&self, identity: &Identity, valid_for: Duration) -> Result<IssuedCert, TlsError> {
        let key = KeyPair::generate()?;
        let signed = self.sign_expiring(identity, valid_for, &key)?;
        Ok(IssuedCert {
            pem: CertifiedPem { cert_pem: signed.cert_pem, key_pem: key.serialize_pem() },
            serial: signed.serial,
            not_after: signed.not_after,
        })
    }

    /// An agent's certificate for a public key it sent in a signing request (renewal: the key never leaves
    /// the node), valid for `valid_for` from now, with a fresh random serial. Only the key is taken from the
    /// request; names and extensions are Ferry's own for `cluster`/`member`.
    pub fn issue_agent_for_key(
        &self,
        cluster: &str,
        member: &str,
        valid_for: Duration,
        public_key: &CsrPublicKey,
    ) -> Result<SignedCert, TlsError> {
        validate_name("cluster", cluster)?;
        validate_name("member", member)?;
        let identity = Identity::Agent { cluster: cluster.into(), member: member.into() };
        self.sign_expiring(&identity, valid_for, &public_key.0)
    }

    fn sign_expiring(
        &self,
        identity: &Identity,
        valid_for: Duration,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<SignedCert, TlsError> {
        let mut params = base_params(&identity.common_name());
        // 16 random bytes, the top bit clear so the DER integer stays positive and its hex is what peers see.
        let mut serial: [u8; 16] = rand::random();
        serial[0] = (serial[0] & 0x7f) | 0x01;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let not_after = std::time::SystemTime::now() + valid_for;
        params.not_after = time::OffsetDateTime::from(not_after);
        params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(SignedCert { cert_pem: cert.pem(), serial: hex::encode(serial), not_after })
    }

    /// A client certificate for ferryctl or an agent.
    pub fn issue_client(&self, identity: &Identity) -> Result<CertifiedPem, TlsError> {
        if let Identity::Agent { cluster, member } = identity {
            validate_name("cluster", cluster)?;
            validate_name("member", member)?;
        }
        let key = KeyPair::generate()?;
        let mut params = base_params(&identity.common_name());
        params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!("{what}: no PEM certificate found")));
    }
    Ok(certs)
}

fn key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(format!("{what}: {e}")))
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c).map_err(|e| TlsError::Pem(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(transport_with(IDLE_TIMEOUT, KEEP_ALIVE))
}

fn transport_with(idle: Duration, keep_alive: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Both set deliberately: quinn's defaults are a 30 s idle timeout and no keep-alive.
    let ms = u32::try_from(idle.as_millis()).unwrap_or(u32::MAX);
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(ms))));
    t.keep_alive_interval(Some(keep_alive));
    // Ferry uses one bidirectional stream per request, one control stream per link and one job stream at a
    // time: a peer may not open more than a few at once, and no unidirectional ones.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// An agent's link config: [`quinn_client_config`] with the agent's shorter idle timeout and keep-alive.
pub fn quinn_agent_config(ca_pem: &str, client: &CertifiedPem) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = quinn_client_config(ca_pem, client)?;
    cfg.transport_config(Arc::new(transport_with(AGENT_IDLE_TIMEOUT, AGENT_KEEP_ALIVE)));
    Ok(cfg)
}

/// QUIC server config: requires a client certificate from `ca_pem`.
pub fn quinn_server_config(ca_pem: &str, server: &CertifiedPem) -> Result<quinn::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&server.cert_pem, "server certificate")?, key(&server.key_pem, "server key")?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// QUIC client config: trusts only `ca_pem` and presents `client`.
pub fn quinn_client_config(ca_pem: &str, client: &CertifiedPem) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs(&client.cert_pem, "client certificate")?, key(&client.key_pem, "client key")?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// A `host:port` could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve coordinator address {addr:?} (expected HOST:PORT, e.g. 127.0.0.1:7443): {reason}")]
pub struct ResolveError {
    pub addr: String,
    pub reason: String,
}

/// Resolves `host:port` and returns the address to dial plus the name to verify the certificate against.
pub async fn resolve(addr: &str) -> Result<(SocketAddr, String), ResolveError> {
    let err = |reason: String| ResolveError { addr: addr.to_string(), reason };
    let (host, _) = addr.rsplit_once(':').ok_or_else(|| err("no port".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let sa = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no addresses".into()))?;
    Ok((sa, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = CertAuthority::generate().unwrap();
        let agent = Identity::Agent { cluster: "prod".into(), member: "m1".into() };
        let pem = ca.issue_client(&agent).unwrap();
        let der = certs(&pem.cert_pem, "t").unwrap();
        assert_eq!(Identity::from_certificate(&der[0]).unwrap(), agent);
        let admin = ca.issue_client(&Identity::Admin).unwrap();
        assert_eq!(Identity::from_certificate(&certs(&admin.cert_pem, "t").unwrap()[0]).unwrap(), Identity::Admin);
        let ro = ca.issue_expiring(&Identity::AdminReadOnly, Duration::from_secs(60)).unwrap();
        let ro_der = certs(&ro.pem.cert_pem, "t").unwrap();
        assert_eq!(Identity::from_certificate(&ro_der[0]).unwrap(), Identity::AdminReadOnly);
        // A reloaded CA signs certificates that chain to the same root.
        let again = CertAuthority::from_pem(&ca.pem().cert_pem, &ca.pem().key_pem).unwrap();
        again.issue_server(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(ca.issue_client(&Identity::Agent { cluster: "Bad/Name".into(), member: "m".into() }).is_err());
    }

    #[test]
    fn agent_certificates_carry_serial_and_expiry() {
        let ca = CertAuthority::generate().unwrap();
        let issued = ca.issue_agent("prod", "m1", Duration::from_secs(3600)).unwrap();
        let der = certs(&issued.pem.cert_pem, "t").unwrap();
        assert_eq!(certificate_serial(&der[0]).unwrap(), issued.serial);
        assert_eq!(issued.serial.len(), 32);
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        let not_after = cert.validity().not_after.timestamp();
        let want = issued.not_after.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((not_after - want).abs() <= 1, "{not_after} vs {want}");
        assert_eq!(
            Identity::from_certificate(&der[0]).unwrap(),
            Identity::Agent { cluster: "prod".into(), member: "m1".into() }
        );
    }

    #[test]
    fn a_signing_request_gives_only_its_key_the_names_are_the_cas() {
        let ca = CertAuthority::generate().unwrap();
        let other = Identity::Agent { cluster: "other".into(), member: "m9".into() };
        let new = new_key_and_csr(&other).unwrap();
        assert!(!format!("{new:?}").contains("PRIVATE KEY"));
        let key = csr_public_key(&new.csr_pem).unwrap();
        let signed = ca.issue_agent_for_key("prod", "m1", Duration::from_secs(120), &key).unwrap();
        assert_eq!(
            Identity::from_pem(&signed.cert_pem).unwrap(),
            Identity::Agent { cluster: "prod".into(), member: "m1".into() }
        );
        assert!(key_matches_certificate(&signed.cert_pem, &new.key_pem).unwrap());
        let unrelated = KeyPair::generate().unwrap().serialize_pem();
        assert!(!key_matches_certificate(&signed.cert_pem, &unrelated).unwrap());
        let pair = CertifiedPem { cert_pem: signed.cert_pem.clone(), key_pem: new.key_pem.clone() };
        quinn_client_config(&ca.pem().cert_pem, &pair).unwrap();
        // A request whose signature does not match its key is refused.
        let mut tampered = new.csr_pem.clone().into_bytes();
        let mid = tampered.len() / 2;
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        assert!(csr_public_key(&String::from_utf8(tampered).unwrap()).is_err());
        assert!(csr_public_key("not a csr").is_err());
    }

    #[test]
    fn a_certificate_names_the_ca_that_issued_it() {
        let (old, new) = (CertAuthority::generate().unwrap(), CertAuthority::generate().unwrap());
        let cert = new.issue_agent("c", "m", Duration::from_secs(60)).unwrap();
        let der = &certs(&cert.pem.cert_pem, "t").unwrap()[0];
        assert!(issued_by(der, &new.pem().cert_pem).unwrap());
        assert!(!issued_by(der, &old.pem().cert_pem).unwrap());
        assert!(pem_common_name(&new.pem().cert_pem).unwrap().starts_with("Ferry CA "));
        // A bundle of both CAs is what clients trust during a rotation.
        let both = format!("{}{}", old.pem().cert_pem, new.pem().cert_pem);
        quinn_client_config(&both, &cert.pem).unwrap();
    }

    #[test]
    fn configs_build() {
        let ca = CertAuthority::generate().unwrap();
        let server = ca.issue_server(&["localhost".into()]).unwrap();
        quinn_server_config(&ca.pem().cert_pem, &server).unwrap();
        let client = ca.issue_client(&Identity::Admin).unwrap();
        quinn_client_config(&ca.pem().cert_pem, &client).unwrap();
    }
}
