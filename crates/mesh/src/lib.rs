//! Workload identity and mutual TLS, built into every role rather than a sidecar.
//!
//! An installation has a mesh CA ([`Authority`]); it issues each role instance a short-lived
//! certificate ([`Leaf`]) whose identity is a SPIFFE-style URI SAN,
//! `spiffe://<trust-domain>/role/<role>` ([`Identity`]), beside DNS SANs `<role>` and
//! `<role>.<trust-domain>`; clients name the role as the TLS server name, so stock WebPKI
//! verification checks *which role* answered, whatever address it was reached on. Servers
//! demand a client certificate from a trusted CA; [`peer_identity`] reads who the client is.
//! Connections are TLS 1.3 only, on rustls with ring.
//!
//! A role reads its material from files ([`MeshFiles`]: certificate, key, trust bundle) and
//! [`Tls::reload_if_changed`] picks up renewed ones without a restart: new connections use
//! the new certificate, open ones finish on the old. The trust bundle may hold several CAs, so
//! a CA rotation trusts old and new side by side until every old leaf has expired.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use serde::{Deserialize, Serialize};

/// Why mesh material could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A key or certificate could not be generated.
    #[error("cannot generate {what}: {cause}")]
    Generate {
        /// What was being made.
        what: String,
        /// Why it failed.
        cause: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path}: {why}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A name that cannot be an identity.
    #[error("`{0}` is not a workload identity (spiffe://<trust-domain>/<role|tool>/<name>, lower-case letters, digits, `-` and `.`)")]
    BadIdentity(String),
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Tls(String),
}

/// What kind of workload an identity names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// A role instance of the role table (`role/<name>`).
    Role,
    /// An operator's tool (`tool/<name>`), issued by `bazaar mesh issue`.
    Tool,
}

impl Workload {
    fn segment(self) -> &'static str {
        match self {
            Workload::Role => "role",
            Workload::Tool => "tool",
        }
    }
}

/// A workload identity: `spiffe://<trust-domain>/<role|tool>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    trust_domain: String,
    kind: Workload,
    name: String,
}

fn valid_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !text.starts_with(['-', '.'])
        && !text.ends_with(['-', '.'])
}

impl Identity {
    /// The identity of `name` of `kind` in `trust_domain`.
    pub fn new(trust_domain: &str, kind: Workload, name: &str) -> Result<Identity, MeshError> {
        if !valid_label(trust_domain) || !valid_label(name) {
            return Err(MeshError::BadIdentity(format!(
                "spiffe://{trust_domain}/{}/{name}",
                kind.segment()
            )));
        }
        Ok(Identity {
            trust_domain: trust_domain.to_string(),
            kind,
            name: name.to_string(),
        })
    }

    /// The identity of role `role`.
    pub fn role(trust_domain: &str, role: &str) -> Result<Identity, MeshError> {
        Identity::new(trust_domain, Workload::Role, role)
    }

    /// Reads `spiffe://<trust-domain>/<role|tool>/<name>`.
    pub fn parse(uri: &str) -> Result<Identity, MeshError> {
        let bad = || MeshError::BadIdentity(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(domain), Some(kind), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let kind = match kind {
            "role" => Workload::Role,
            "tool" => Workload::Tool,
            _ => return Err(bad()),
        };
        Identity::new(domain, kind, name)
    }

    /// The URI form.
    pub fn uri(&self) -> String {
        format!("spiffe://{}/{}/{}", self.trust_domain, self.kind.segment(), self.name)
    }

    /// The role or tool name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Role or tool.
    pub fn kind(&self) -> Workload {
        self.kind
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The DNS name clients verify: the role's name, as a Kubernetes Service of that name
    /// is reached (`https://orders:8103`); `<name>.tool.<trust-domain>` for a tool.
    pub fn server_name(&self) -> String {
        match self.kind {
            Workload::Role => self.name.clone(),
            Workload::Tool => format!("{}.tool.{}", self.name, self.trust_domain),
        }
    }

    /// The DNS names its certificate carries: the server name, and for a role also
    /// `<name>.<trust-domain>`.
    pub fn dns_names(&self) -> Vec<String> {
        match self.kind {
            Workload::Role => vec![self.name.clone(), format!("{}.{}", self.name, self.trust_domain)],
            Workload::Tool => vec![self.server_name()],
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

/// What is stored beside the CA's key to sign with it again later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorityInfo {
    trust_domain: String,
    common_name: String,
    /// Seconds since the epoch.
    not_after: i64,
}

/// A mesh CA: it signs the leaves of one trust domain.
pub struct Authority {
    info: AuthorityInfo,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authority({})", self.info.common_name)
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn at(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn generate(what: &str, e: impl std::fmt::Display) -> MeshError {
    MeshError::Generate {
        what: what.to_string(),
        cause: e.to_string(),
    }
}

impl Authority {
    /// A new CA for `trust_domain`, valid for `lifetime`.
    pub fn create(trust_domain: &str, lifetime: Duration) -> Result<Authority, MeshError> {
        if !valid_label(trust_domain) {
            return Err(MeshError::BadIdentity(format!("spiffe://{trust_domain}")));
        }
        let key = KeyPair::generate().map_err(|e| generate("the CA key", e))?;
        let now = now_secs();
        let info = AuthorityInfo {
            trust_domain: trust_domain.to_string(),
            common_name: format!("bazaar mesh CA {trust_domain} {}", uuid::Uuid::now_v7().simple()),
            not_after: now + lifetime.as_secs() as i64,
        };
        let mut params = Authority::params(&info);
        params.not_before = at(now - 300);
        params.not_after = at(info.not_after);
        let cert = params
            .self_signed(&key)
            .map_err(|e| generate("the CA certificate", e))?;
        Ok(Authority {
            info,
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The parameters that make the CA's name, constraints and key identifiers; the same
    /// each time, so a CA loaded from disk signs leaves its own certificate verifies.
    fn params(info: &AuthorityInfo) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, info.common_name.clone());
        name.push(DnType::OrganizationName, "bazaar");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    /// Loads the CA kept in `dir` (`ca.crt`, `ca.key`, `ca.json`).
    pub fn load(dir: &Path) -> Result<Authority, MeshError> {
        let info_path = dir.join("ca.json");
        let info: AuthorityInfo = serde_json::from_str(&read(&info_path)?).map_err(|e| MeshError::BadFile {
            path: info_path.clone(),
            why: e.to_string(),
        })?;
        let key_path = dir.join("ca.key");
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| MeshError::BadFile {
            path: key_path,
            why: e.to_string(),
        })?;
        let cert_pem = read(&dir.join("ca.crt"))?;
        let params = Authority::params(&info);
        Ok(Authority {
            info,
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Writes the CA to `dir` (the key readable by its owner only).
    pub fn save(&self, dir: &Path) -> Result<(), MeshError> {
        std::fs::create_dir_all(dir).map_err(|source| MeshError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let info = serde_json::to_string_pretty(&self.info).map_err(|e| generate("ca.json", e))?;
        write_private(&dir.join("ca.key"), &self.issuer_key_pem())?;
        write_private(&dir.join("ca.crt"), &self.cert_pem)?;
        write_private(&dir.join("ca.json"), &info)
    }

    fn issuer_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate (PEM): what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The trust domain it issues for.
    pub fn trust_domain(&self) -> &str {
        &self.info.trust_domain
    }

    /// Its name.
    pub fn common_name(&self) -> &str {
        &self.info.common_name
    }

    /// When it expires (seconds since the epoch).
    pub fn not_after(&self) -> i64 {
        self.info.not_after
    }

    /// The SHA-256 of its certificate, hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_pem)
    }

    /// A certificate for `identity`, valid from now for `lifetime`.
    pub fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<Leaf, MeshError> {
        let now = now_secs();
        self.issue_between(identity, now - 60, now + lifetime.as_secs() as i64)
    }

    /// A certificate for `identity` valid between two instants (seconds since the epoch).
    pub fn issue_between(&self, identity: &Identity, not_before: i64, not_after: i64) -> Result<Leaf, MeshError> {
        if identity.trust_domain() != self.trust_domain() {
            return Err(MeshError::BadIdentity(format!(
                "{identity} (this CA issues for {})",
                self.trust_domain()
            )));
        }
        let key = KeyPair::generate().map_err(|e| generate("a leaf key", e))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.uri());
        params.distinguished_name = name;
        let uri = identity.uri().try_into().map_err(|e| generate("the URI SAN", e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for name in identity.dns_names() {
            let dns = name.try_into().map_err(|e| generate("a DNS SAN", e))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = at(not_before);
        params.not_after = at(not_after.min(self.info.not_after));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| generate(&format!("the certificate of {identity}"), e))?;
        Ok(Leaf {
            identity: identity.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: not_after.min(self.info.not_after),
        })
    }
}

/// A workload's certificate and key.
#[derive(Clone)]
pub struct Leaf {
    /// Whose it is.
    pub identity: Identity,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
    /// When it expires (seconds since the epoch).
    pub not_after: i64,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Leaf({}, until {})", self.identity, self.not_after)
    }
}

impl Leaf {
    /// Writes the certificate and key to `files` (owner-only; the key last, then renamed into
    /// place, so a reader never sees a new certificate with an old key for long).
    pub fn write(&self, files: &MeshFiles) -> Result<(), MeshError> {
        write_private(&files.cert, &self.cert_pem)?;
        write_private(&files.key, &self.key_pem)
    }

    /// Writes the certificate and key to `files` beside `bundle` (the CA certificates to
    /// trust, PEM) and loads them: a workload's whole TLS material in one step.
    pub fn install(&self, files: &MeshFiles, bundle: &str) -> Result<Tls, MeshError> {
        self.write(files)?;
        write_private(&files.bundle, bundle)?;
        Tls::load(files.clone())
    }
}

/// The SHA-256 of the first certificate in `pem`, hex.
pub fn fingerprint(pem: &str) -> String {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
        .unwrap_or_default();
    ring::digest::digest(&ring::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read(path: &Path) -> Result<String, MeshError> {
    std::fs::read_to_string(path).map_err(|source| MeshError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` to `path` readable by its owner only ([`bazaar_trust::files`]).
fn write_private(path: &Path, contents: &str) -> Result<(), MeshError> {
    bazaar_trust::files::write_private(path, contents).map_err(|source| MeshError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Where a workload's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshFiles {
    /// Its certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificates it trusts (PEM, one or more).
    pub bundle: PathBuf,
}

impl MeshFiles {
    /// The files of instance `name` under `dir`: `NAME.crt`, `NAME.key`, and the shared
    /// `bundle.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> MeshFiles {
        MeshFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            bundle: dir.join("bundle.pem"),
        }
    }

    /// A digest of the three files' contents (the files are small; modification times
    /// can repeat within a clock tick, contents cannot hide a change).
    fn digest(&self) -> Vec<u8> {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for path in [&self.cert, &self.key, &self.bundle] {
            context.update(&std::fs::read(path).unwrap_or_default());
            context.update(&[0]);
        }
        context.finish().as_ref().to_vec()
    }
}

/// The provider every mesh connection uses: ring, TLS 1.3.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A workload's TLS configurations, made from its files and remade when they change.
pub struct Tls {
    files: MeshFiles,
    identity: Identity,
    state: Arc<RwLock<TlsState>>,
    /// Built once; presents and verifies with whatever the state holds at each handshake,
    /// so a long-lived client (a pool) follows renewals and rotations.
    client: Arc<ClientConfig>,
}

struct TlsState {
    server: Arc<ServerConfig>,
    certified: Arc<rustls::sign::CertifiedKey>,
    server_verifier: Arc<rustls::client::WebPkiServerVerifier>,
    digest: Vec<u8>,
}

/// Reads the current certificate and trust bundle of a [`Tls`] at each client handshake.
struct Live(Arc<RwLock<TlsState>>);

impl Live {
    fn state(&self) -> std::sync::RwLockReadGuard<'_, TlsState> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl rustls::client::ResolvesClientCert for Live {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.state().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::client::danger::ServerCertVerifier for Live {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verifier = self.state().server_verifier.clone();
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let verifier = self.state().server_verifier.clone();
        verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let verifier = self.state().server_verifier.clone();
        verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.state().server_verifier.supported_verify_schemes()
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({})", self.identity)
    }
}

impl Tls {
    /// Loads `files`; fails with the file and the reason when any is missing or unusable.
    pub fn load(files: MeshFiles) -> Result<Tls, MeshError> {
        let (state, identity) = TlsState::load(&files)?;
        let state = Arc::new(RwLock::new(state));
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| MeshError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Live(state.clone())))
            .with_client_cert_resolver(Arc::new(Live(state.clone())));
        Ok(Tls {
            files,
            identity,
            state,
            client: Arc::new(client),
        })
    }

    /// Whose certificate this is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The files it reads.
    pub fn files(&self) -> &MeshFiles {
        &self.files
    }

    /// For accepting: TLS 1.3, a client certificate from a trusted CA required.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).server.clone()
    }

    /// For connecting: TLS 1.3, presenting this workload's certificate, trusting the bundle
    /// (both as they are at each handshake, renewals included).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// Reloads the files when any changed since the last load; true when it did. A set of
    /// files that does not load (a renewal half-written) keeps the old configurations.
    pub fn reload_if_changed(&self) -> Result<bool, MeshError> {
        if self.state.read().unwrap_or_else(|e| e.into_inner()).digest == self.files.digest() {
            return Ok(false);
        }
        let (state, identity) = TlsState::load(&self.files)?;
        if identity != self.identity {
            return Err(MeshError::BadFile {
                path: self.files.cert.clone(),
                why: format!("now names {identity}, not {}", self.identity),
            });
        }
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        Ok(true)
    }
}

impl TlsState {
    fn load(files: &MeshFiles) -> Result<(TlsState, Identity), MeshError> {
        let digest = files.digest();
        let bad = |path: &Path, why: String| MeshError::BadFile {
            path: path.to_path_buf(),
            why,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(read(&files.cert)?.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&files.cert, format!("not a PEM certificate: {e}")))?;
        let first = chain
            .first()
            .ok_or_else(|| bad(&files.cert, "holds no certificate".into()))?;
        let identity = peer_identity(std::slice::from_ref(first))
            .ok_or_else(|| bad(&files.cert, "names no workload identity".into()))?;
        let key = PrivateKeyDer::from_pem_slice(read(&files.key)?.as_bytes())
            .map_err(|e| bad(&files.key, format!("not a PEM private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(read(&files.bundle)?.as_bytes()) {
            let cert = cert.map_err(|e| bad(&files.bundle, format!("not a PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(&files.bundle, format!("not a CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad(&files.bundle, "trusts no CA".into()));
        }
        let roots = Arc::new(roots);
        let tls = |e: rustls::Error| MeshError::Tls(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| MeshError::Tls(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls)?;
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| MeshError::Tls(e.to_string()))?;
        let signing = provider().key_provider.load_private_key(key).map_err(tls)?;
        let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, signing));
        Ok((
            TlsState {
                server: Arc::new(server),
                certified,
                server_verifier,
                digest,
            },
            identity,
        ))
    }
}

/// Who called, on a connection the mesh authenticated; every request served by
/// [`serve_mtls`] carries it in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Identity);

/// How long a client gets to complete the TLS handshake before the connection is cut.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long open connections get to finish once `stop` has fired.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Serves `router` over mutual TLS on `listener` until `stop` resolves, then lets open
/// requests finish (up to 30 s). A client without a certificate from the trust bundle fails
/// the handshake; every request carries its caller's [`PeerIdentity`]. Each accepted
/// connection uses the configuration current at that moment, so renewed certificates apply
/// to new connections at once.
pub async fn serve_mtls(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Arc<Tls>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let drain = bazaar_drain::Drain::new();
    let connections = tokio_util::task::TaskTracker::new();
    // A client that never finishes its request head is cut, as one that never finishes the
    // handshake is; past the cap, new connections wait in the backlog.
    let builder = bazaar_drain::connections::connection_builder();
    let cap = bazaar_drain::connections::ConnectionCap::new(bazaar_drain::connections::MAX_CONNECTIONS, "mesh");
    tokio::pin!(stop);
    while let Some((slot, stream, peer)) = cap.accept(&listener, &mut stop).await {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let (router, builder, watcher) = (router.clone(), builder.clone(), drain.watcher());
        connections.spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    metrics::counter!("bazaar_mesh_handshake_failures_total").increment(1);
                    tracing::info!(%peer, error = %e, "mesh: handshake refused");
                    return;
                }
                Err(_) => {
                    metrics::counter!("bazaar_mesh_handshake_failures_total").increment(1);
                    tracing::info!(%peer, "mesh: handshake not finished in time");
                    return;
                }
            };
            let Some(identity) = stream.get_ref().1.peer_certificates().and_then(peer_identity) else {
                tracing::info!(%peer, "mesh: a trusted certificate without a workload identity");
                return;
            };
            let caller = PeerIdentity(identity);
            let requests = bazaar_drain::Requests::default();
            let begun = requests.clone();
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                begun.begin();
                request.extensions_mut().insert(caller.clone());
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
            let connection = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned(), requests).await {
                tracing::debug!(%peer, error = %e, "mesh: connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_LIMIT, drain.shutdown()).await.is_err() {
        tracing::warn!("mesh: connections still open after {CLOSE_LIMIT:?}; leaving them to the exit");
    }
    connections.close();
    // A connection still mid-handshake gets at most its handshake timeout.
    if tokio::time::timeout(HANDSHAKE_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "mesh: connections still open; leaving them to the exit"
        );
    }
    Ok(())
}

/// A client that presents this workload's certificate and trusts the bundle; each of
/// `peers` (a role's server name and the IP it is reached at) is resolved there, so
/// `https://users:8101/…` reaches users on this machine and verifies that users answered.
pub fn http_client(
    tls: &Tls,
    timeout: Duration,
    peers: &[(String, std::net::IpAddr)],
) -> Result<reqwest::Client, MeshError> {
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls((*tls.client_config()).clone())
        .pool_idle_timeout(bazaar_drain::connections::CLIENT_POOL_IDLE)
        .timeout(timeout);
    for (name, ip) in peers {
        builder = builder.resolve(name, std::net::SocketAddr::new(*ip, 0));
    }
    builder.build().map_err(|e| MeshError::Tls(e.to_string()))
}

/// The TLS server name to verify when connecting to `identity`.
pub fn server_name(identity: &Identity) -> Result<ServerName<'static>, MeshError> {
    ServerName::try_from(identity.server_name()).map_err(|e| MeshError::BadIdentity(format!("{identity}: {e}")))
}

/// The workload identity in the end-entity certificate of a verified chain (the first URI
/// SAN that is one), or `None`.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<Identity> {
    let cert = chain.first()?;
    uri_sans(cert).into_iter().find_map(|uri| Identity::parse(&uri).ok())
}

/// The URI entries of a certificate's subjectAltName extension, read straight from the DER
/// (Certificate -> TBSCertificate -> [3] extensions -> subjectAltName -> [6] URIs).
fn uri_sans(der: &[u8]) -> Vec<String> {
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
    let mut uris = Vec::new();
    let Some((0x30, cert, _)) = bazaar_trust::der::element(der) else {
        return uris;
    };
    let Some((0x30, mut tbs, _)) = bazaar_trust::der::element(cert) else {
        return uris;
    };
    while let Some((tag, content, rest)) = bazaar_trust::der::element(tbs) {
        tbs = rest;
        if tag != 0xa3 {
            continue;
        }
        let Some((0x30, mut extensions, _)) = bazaar_trust::der::element(content) else {
            break;
        };
        while let Some((0x30, extension, rest)) = bazaar_trust::der::element(extensions) {
            extensions = rest;
            let Some((0x06, oid, mut fields)) = bazaar_trust::der::element(extension) else {
                continue;
            };
            if oid != SAN_OID {
                continue;
            }
            // An optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
            while let Some((tag, value, rest)) = bazaar_trust::der::element(fields) {
                fields = rest;
                if tag != 0x04 {
                    continue;
                }
                let Some((0x30, mut names, _)) = bazaar_trust::der::element(value) else {
                    break;
                };
                while let Some((tag, name, rest)) = bazaar_trust::der::element(names) {
                    names = rest;
                    if tag == 0x86 {
                        uris.push(String::from_utf8_lossy(name).into_owned());
                    }
                }
            }
        }
    }
    uris
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HOUR: Duration = Duration::from_secs(3600);

    fn files_for(dir: &Path, ca_pems: &[&str], leaf: &Leaf, name: &str) -> MeshFiles {
        let files = MeshFiles::in_dir(dir, name);
        leaf.install(&files, &ca_pems.concat()).unwrap();
        files
    }

    /// Why a handshake between `server` and `client` (expecting `expect`) failed.
    async fn refusal(server: &Tls, client: Option<&Tls>, anonymous: &Tls, expect: &Identity) -> String {
        handshake(server, client, anonymous, expect)
            .await
            .expect_err("the handshake succeeded")
    }

    /// Runs a TLS handshake between a server with `server` and a client presenting `client`
    /// (or none) that expects `expect` to answer; the server's view of the client, or why it
    /// failed.
    async fn handshake(
        server: &Tls,
        client: Option<&Tls>,
        trust_of_anonymous: &Tls,
        expect: &Identity,
    ) -> Result<Option<Identity>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let config = match client {
            Some(tls) => tls.client_config(),
            None => {
                // A client with the right roots but no certificate of its own.
                let roots = {
                    let mut roots = RootCertStore::empty();
                    for cert in
                        CertificateDer::pem_slice_iter(read(&trust_of_anonymous.files().bundle).unwrap().as_bytes())
                    {
                        roots.add(cert.unwrap()).unwrap();
                    }
                    roots
                };
                Arc::new(
                    ClientConfig::builder_with_provider(provider())
                        .with_protocol_versions(&[&rustls::version::TLS13])
                        .unwrap()
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                )
            }
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = server_name(expect).unwrap();
        let served = tokio::spawn(async move {
            let mut stream = acceptor.accept(a).await.map_err(|e| e.to_string())?;
            let peer = stream.get_ref().1.peer_certificates().and_then(peer_identity);
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            stream.write_all(b"k").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        });
        let talked = async {
            let mut stream = connector.connect(name, b).await.map_err(|e| e.to_string())?;
            stream.write_all(b"?").await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }
        .await;
        let peer = served.await.unwrap();
        talked?;
        peer
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ca: Authority,
        users: Tls,
        gateway: Tls,
        users_id: Identity,
        dir: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::create("test.local", 24 * HOUR).unwrap();
        let users_id = Identity::role("test.local", "users").unwrap();
        let gateway_id = Identity::role("test.local", "gateway").unwrap();
        let users = Tls::load(files_for(
            dir.path(),
            &[ca.cert_pem()],
            &ca.issue(&users_id, HOUR).unwrap(),
            "users",
        ))
        .unwrap();
        let gateway = Tls::load(files_for(
            dir.path(),
            &[ca.cert_pem()],
            &ca.issue(&gateway_id, HOUR).unwrap(),
            "gateway",
        ))
        .unwrap();
        Fixture {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            ca,
            users,
            gateway,
            users_id,
        }
    }

    #[test]
    fn identities_read_and_write_as_spiffe_uris() {
        let id = Identity::parse("spiffe://bazaar.local/role/orders").unwrap();
        assert_eq!(
            (id.name(), id.kind(), id.server_name().as_str()),
            ("orders", Workload::Role, "orders")
        );
        assert_eq!(id.dns_names(), ["orders", "orders.bazaar.local"]);
        assert_eq!(id.uri(), "spiffe://bazaar.local/role/orders");
        for bad in [
            "spiffe://bazaar.local/orders",
            "https://x/role/y",
            "spiffe://B/role/y",
            "spiffe://a/role/y/z",
            "spiffe://a/admin/y",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_client_with_a_mesh_certificate_is_served_and_named() {
        let f = fixture();
        let peer = handshake(&f.users, Some(&f.gateway), &f.gateway, &f.users_id)
            .await
            .unwrap();
        assert_eq!(
            peer.map(|p| p.uri()).as_deref(),
            Some("spiffe://test.local/role/gateway")
        );
        assert_eq!(f.users.identity(), &f.users_id);
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_fails_the_handshake() {
        let f = fixture();
        let refused = refusal(&f.users, None, &f.gateway, &f.users_id).await;
        assert!(
            refused.contains("CertificateRequired") || refused.contains("certificate"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_fails_the_handshake() {
        let f = fixture();
        let stranger_ca = Authority::create("test.local", 24 * HOUR).unwrap();
        let mallory = stranger_ca
            .issue(&Identity::role("test.local", "gateway").unwrap(), HOUR)
            .unwrap();
        // Mallory trusts the real CA (to reach users) but holds a certificate of her own CA.
        let mallory = Tls::load(files_for(&f.dir, &[f.ca.cert_pem()], &mallory, "mallory")).unwrap();
        let refused = refusal(&f.users, Some(&mallory), &f.gateway, &f.users_id).await;
        assert!(
            refused.contains("UnknownCA") || refused.contains("UnknownIssuer"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn an_expired_certificate_fails_the_handshake() {
        let f = fixture();
        let now = now_secs();
        let old =
            f.ca.issue_between(
                &Identity::role("test.local", "gateway").unwrap(),
                now - 7200,
                now - 3600,
            )
            .unwrap();
        let old = Tls::load(files_for(&f.dir, &[f.ca.cert_pem()], &old, "old")).unwrap();
        let refused = refusal(&f.users, Some(&old), &f.gateway, &f.users_id).await;
        assert!(refused.contains("Expired"), "{refused}");
    }

    #[tokio::test]
    async fn a_client_refuses_a_server_that_is_not_the_role_it_called() {
        let f = fixture();
        // The gateway expects users but reaches a workload holding orders' certificate.
        let orders_id = Identity::role("test.local", "orders").unwrap();
        let orders = Tls::load(files_for(
            &f.dir,
            &[f.ca.cert_pem()],
            &f.ca.issue(&orders_id, HOUR).unwrap(),
            "orders",
        ))
        .unwrap();
        let refused = refusal(&orders, Some(&f.gateway), &f.gateway, &f.users_id).await;
        assert!(refused.contains("not valid for name \"users\""), "{refused}");
    }

    #[tokio::test]
    async fn during_a_ca_rotation_old_and_new_leaves_both_verify_and_renewals_load_without_a_restart() {
        let f = fixture();
        let next = Authority::create("test.local", 24 * HOUR).unwrap();
        // Both CAs in every bundle; users renewed by the new CA, the gateway still on the old.
        // A client made before the rotation (a pool, say) is the one used after it.
        let pooled = f.gateway.client_config();
        let bundle = [next.cert_pem(), f.ca.cert_pem()].concat();
        write_private(&f.users.files().bundle, &bundle).unwrap();
        next.issue(&f.users_id, HOUR).unwrap().write(f.users.files()).unwrap();
        assert!(f.users.reload_if_changed().unwrap(), "the renewal is picked up");
        assert!(!f.users.reload_if_changed().unwrap(), "and only once");
        f.gateway.reload_if_changed().unwrap();
        let peer = handshake(&f.users, Some(&f.gateway), &f.gateway, &f.users_id)
            .await
            .unwrap();
        assert_eq!(peer.unwrap().name(), "gateway");
        assert!(Arc::ptr_eq(&pooled, &f.gateway.client_config()));
    }

    #[test]
    fn a_ca_saved_and_loaded_signs_leaves_its_certificate_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::create("test.local", 24 * HOUR).unwrap();
        ca.save(dir.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let loaded = Authority::load(dir.path()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let id = Identity::role("test.local", "users").unwrap();
        let leaf = loaded.issue(&id, HOUR).unwrap();
        let files = files_for(dir.path(), &[ca.cert_pem()], &leaf, "users");
        assert_eq!(Tls::load(files).unwrap().identity(), &id);
        assert!(ca
            .issue(&Identity::role("other.domain", "users").unwrap(), HOUR)
            .is_err());
    }
}
