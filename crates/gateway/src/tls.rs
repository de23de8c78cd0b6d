//! Upstream TLS, as Kong configures it: a service with `protocol: https` is reached over TLS
//! (1.3 or 1.2), presenting its `client_certificate` (an entry of `certificates`) and, with
//! `tls_verify: true`, verifying the upstream against its `ca_certificates` under the
//! service's host as the server name (for an upstream, its name). This is how the gateway
//! joins bazaar's mesh: its mesh certificate is the client certificate, the mesh CA the CA
//! certificate, and `orders.bazaar` the name orders' certificate carries.
//!
//! Without `tls_verify: true` the upstream's certificate is not checked, as in Kong (whose
//! default is off), even when `ca_certificates` are listed: bazaar's own config always sets it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

/// What a service's TLS needs, resolved from the config.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// Identifies the settings, so clients are shared only between equal ones.
    pub fingerprint: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate of a PEM text.
pub(crate) fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// Parses a PEM private key.
pub(crate) fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("not a PEM private key: {e}"))
}

impl UpstreamTls {
    /// Settings for reaching `host`: `client` (chain and key PEMs) presented, `roots`
    /// (PEMs) trusted when `verify`.
    pub fn new(host: &str, client: Option<(&str, &str)>, roots: &[&str], verify: bool) -> Result<UpstreamTls, String> {
        let server_name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if verify {
            let mut store = RootCertStore::empty();
            for pem in roots {
                for cert in certificates(pem)? {
                    store.add(cert).map_err(|e| format!("not a CA certificate: {e}"))?;
                }
            }
            builder.with_root_certificates(store)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider())))
        };
        let config = match client {
            Some((chain, key)) => builder
                .with_client_auth_cert(certificates(chain)?, private_key(key)?)
                .map_err(|e| e.to_string())?,
            None => builder.with_no_client_auth(),
        };
        let digest = |text: &str| {
            ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
                .as_ref()
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let fingerprint = format!(
            "{host}|{}|{}|{verify}",
            client.map_or(String::new(), |(c, k)| digest(&format!("{c}{k}"))),
            digest(&roots.concat())
        );
        Ok(UpstreamTls {
            config: Arc::new(config),
            server_name,
            fingerprint,
        })
    }
}

/// Accepts any server certificate (Kong's `tls_verify: false`), still checking that the
/// handshake is signed by the key it presents.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens upstream connections: plain TCP for `http://`, TLS on top for `https://`.
#[derive(Clone)]
pub(crate) struct UpstreamConnector {
    http: HttpConnector,
    tls: Option<Arc<UpstreamTls>>,
}

impl UpstreamConnector {
    /// A connector over `http` (which sets the connect timeout), adding `tls` for https.
    pub fn new(mut http: HttpConnector, tls: Option<Arc<UpstreamTls>>) -> UpstreamConnector {
        http.enforce_http(false);
        UpstreamConnector { http, tls }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme_str() == Some("https");
        let (mut http, tls) = (self.http.clone(), self.tls.clone());
        Box::pin(async move {
            let tcp = tower::Service::<Uri>::call(&mut http, uri).await?;
            if !https {
                return Ok(UpstreamStream::Plain(tcp));
            }
            let tls = tls.ok_or("an https upstream without TLS settings")?;
            let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                .connect(tls.server_name.clone(), tcp.into_inner())
                .await?;
            Ok(UpstreamStream::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// An upstream connection, plain or TLS.
pub(crate) enum UpstreamStream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(s) => s.connected(),
            UpstreamStream::Tls(s) => s.inner().get_ref().0.connected(),
        }
    }
}

impl hyper::rt::Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
