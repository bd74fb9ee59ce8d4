//! TLS settings built from PEM files: rustls with the `ring` provider, so that neither OpenSSL
//! nor aws-lc is compiled in.
//!
//! * Client API (`--cert-file`, `--key-file`, optionally `--trusted-ca-file` with
//!   `--client-cert-auth`): a [`ServerConfig`] for the client port.
//! * Peers (`--peer-cert-file`, `--peer-key-file`, `--peer-trusted-ca-file`): a [`ServerConfig`]
//!   that requires a client certificate signed by the peer CA, and a [`ClientConfig`] that
//!   trusts only that CA and presents the same certificate; every peer connection is thus
//!   mutually authenticated.
//!
//! Every config names its provider explicitly instead of relying on a process-wide default:
//! tests start several nodes in one process, and nothing has to be installed first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate flags as given (see [`crate::config::Config::tls_files`]); clap checks that
/// they come in the right combinations.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    pub cert_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
    pub trusted_ca_file: Option<&'a Path>,
    pub client_cert_auth: bool,
    pub peer_cert_file: Option<&'a Path>,
    pub peer_key_file: Option<&'a Path>,
    pub peer_trusted_ca_file: Option<&'a Path>,
}

/// Why TLS settings could not be built; each names the flag's file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {}: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what} {} holds no PEM certificate", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    BadCa {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA file {}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {} with key {}: {source}", cert.display(), key.display())]
    KeyPair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The only crypto provider this crate uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// HTTP/1.1 is all the servers and the peer client speak; ALPN says so to curl and friends.
const ALPN_HTTP1: &[u8] = b"http/1.1";

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = |source| Error::Pem {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| Error::Pem {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|source| Error::BadCa {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

/// A server config presenting `cert`/`key`; with `client_ca`, a client must present a
/// certificate signed by it or the handshake fails.
fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>> {
    let certs = load_certs("certificate file", cert)?;
    let key_der = load_key("key file", key)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = load_roots("CA file", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|source| Error::Verifier {
                    path: ca.to_path_buf(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key_der)
        .map_err(|source| Error::KeyPair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// TLS for the client API port, if `--cert-file` is given.
pub fn client_api_server(cfg: &TlsFiles) -> Result<Option<Arc<ServerConfig>>> {
    let (Some(cert), Some(key)) = (cfg.cert_file, cfg.key_file) else {
        return Ok(None);
    };
    let ca = if cfg.client_cert_auth {
        cfg.trusted_ca_file
    } else {
        None
    };
    server_config(cert, key, ca).map(Some)
}

/// The three peer TLS files, if configured (clap makes them come together).
fn peer_files<'a>(cfg: &TlsFiles<'a>) -> Option<(&'a Path, &'a Path, &'a Path)> {
    match (
        cfg.peer_cert_file,
        cfg.peer_key_file,
        cfg.peer_trusted_ca_file,
    ) {
        (Some(c), Some(k), Some(ca)) => Some((c, k, ca)),
        _ => None,
    }
}

/// TLS for the peer listener, if peer TLS is configured: peers must present a certificate
/// signed by `--peer-trusted-ca-file`.
pub fn peer_server(cfg: &TlsFiles) -> Result<Option<Arc<ServerConfig>>> {
    match peer_files(cfg) {
        Some((cert, key, ca)) => server_config(cert, key, Some(ca)).map(Some),
        None => Ok(None),
    }
}

/// TLS for requests to peers, if peer TLS is configured: trust only the peer CA and present
/// this node's peer certificate.
pub fn peer_client(cfg: &TlsFiles) -> Result<Option<ClientConfig>> {
    let Some((cert, key, ca)) = peer_files(cfg) else {
        return Ok(None);
    };
    let roots = load_roots("peer CA file", ca)?;
    let certs = load_certs("peer certificate file", cert)?;
    let key_der = load_key("peer key file", key)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key_der)
        .map_err(|source| Error::KeyPair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    // No ALPN here: the connector that uses this config sets it (to HTTP/1.1).
    Ok(Some(config))
}

/// A client config that trusts nothing: what the plain-HTTP peer client carries, so that an
/// `https://` URL in a plain cluster fails instead of being trusted by accident.
pub fn trust_nothing() -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}
