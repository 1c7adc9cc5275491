//! TLS configuration on rustls with the ring provider, for every party in the chain.
//!
//! Owns: building client configs that trust exactly the given roots (the terminal pins the
//! proxy's CA; no system trust store, so it works on Android), server configs from PEM files,
//! and (feature `merchant`) HTTPS serving for the proxy and the sandbox, on the accept loop of
//! [`crate::serve`], and the certificate authority made on the fly for tests and the demo. It
//! must not pick a crypto provider implicitly: every config names ring, so no aws-lc enters the
//! build.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// Errors of loading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} holds no PEM certificate")]
    NoCertificate { what: String },
    #[error("{what} is not a PEM certificate file: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("{what} holds no PEM private key: {reason}")]
    BadKey { what: String, reason: String },
    #[error("tls configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM text.
pub fn certificates_from_pem(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// A client config that trusts exactly the certificates in `roots_pem` (a CA bundle).
pub fn client_config_pinned(roots_pem: &str, what: &str) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates_from_pem(roots_pem, what)? {
        roots.add(cert).map_err(TlsError::Config)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client config that trusts no certificate at all: every handshake fails. For configs made
/// in tests that never connect.
pub fn client_config_trusting_nothing() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // The ring provider supports the default protocol versions; this cannot fail.
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// A server config presenting `chain_pem` (leaf first) with `key_pem`.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    what: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates_from_pem(chain_pem, what)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::BadKey {
        what: what.to_owned(),
        reason: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(feature = "merchant")]
pub use merchant::*;

#[cfg(feature = "merchant")]
mod merchant {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::{TlsError, provider};

    /// How long a TLS handshake may take before the connection is dropped.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a client may take to send a request's headers.
    const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
    /// How long in-flight requests may run after shutdown starts.
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

    /// A client config that trusts the Mozilla roots plus the certificates in `extra_roots_pem`
    /// (the sandbox's CA, or a corporate one).
    pub fn client_config_webpki(
        extra_roots_pem: Option<&str>,
        what: &str,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(pem) = extra_roots_pem {
            for cert in super::certificates_from_pem(pem, what)? {
                roots.add(cert)?;
            }
        }
        Ok(rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// Serves `router` over HTTPS (HTTP/1.1) on `listener` until `shutdown` is cancelled, then
    /// lets in-flight requests finish for up to [`DRAIN_TIMEOUT`]. A failed handshake or a
    /// broken connection is logged at debug level and never stops the loop.
    pub async fn serve_https(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        router: axum::Router,
        shutdown: CancellationToken,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let limits = crate::serve::Http1Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_head: 64 * 1024,
            keep_alive: true,
            // A client that half-closes after its request gets its answer; an upstream call
            // already under way for a client that left runs to its end (bounded by its timeout).
            half_close: true,
        };
        let still_open = crate::serve::accept_loop(
            &listener,
            &shutdown,
            None,
            DRAIN_TIMEOUT,
            |tcp, peer| -> Option<crate::serve::Connection> {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let shutdown = shutdown.clone();
                Some(Box::pin(async move {
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(error)) => {
                                tracing::debug!(%error, %peer, "tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "tls handshake timed out");
                                return;
                            }
                        };
                    crate::serve::http1(tls, service, limits, &shutdown).await;
                }))
            },
        )
        .await;
        if still_open > 0 {
            tracing::warn!(
                open = still_open,
                "connections still open after the drain timeout; dropping them"
            );
        }
    }

    /// A certificate authority and a server certificate made on the fly (tests, the demo, the
    /// sandbox). Nothing here is ever written to the repository.
    pub struct GeneratedPki {
        /// The CA certificate, PEM: what clients pin.
        pub ca_pem: String,
        /// The server certificate, PEM.
        pub cert_pem: String,
        /// The server's private key, PKCS#8 PEM.
        pub key_pem: String,
    }

    impl std::fmt::Debug for GeneratedPki {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GeneratedPki").finish_non_exhaustive()
        }
    }

    /// Makes a CA named `ca_name` and a server certificate for `hosts` (DNS names or IPs).
    pub fn generate_pki(ca_name: &str, hosts: &[&str]) -> Result<GeneratedPki, rcgen::Error> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            hosts.first().copied().unwrap_or("localhost"),
        );
        let cert = params.signed_by(&key, &issuer)?;
        Ok(GeneratedPki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server config from a [`GeneratedPki`].
    pub fn server_config_generated(pki: &GeneratedPki) -> Result<rustls::ServerConfig, TlsError> {
        super::server_config(&pki.cert_pem, &pki.key_pem, "generated certificate")
    }
}

#[cfg(all(test, feature = "merchant"))]
mod tests {
    use super::*;

    #[test]
    fn generated_pki_makes_configs_on_both_sides() {
        let pki = generate_pki("test ca", &["localhost", "127.0.0.1"]).expect("pki");
        server_config_generated(&pki).expect("server config");
        client_config_pinned(&pki.ca_pem, "ca").expect("client config");
        client_config_webpki(Some(&pki.ca_pem), "ca").expect("webpki config");
    }

    #[test]
    fn bad_pem_is_named_in_the_error() {
        let err = client_config_pinned("nothing here", "proxy ca_file").unwrap_err();
        assert!(err.to_string().contains("proxy ca_file"), "{err}");
    }
}
