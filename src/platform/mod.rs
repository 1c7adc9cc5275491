//! Clients of the three platforms the proxy calls on the merchant's behalf.
//!
//! - [`wechatpay`]: WeChat Pay APIv3 (SHA256withRSA request signing, response verification).
//! - [`alipay`]: Alipay OpenAPI gateway (RSA2 sign content, response verification).
//! - [`aliyun`]: Alibaba Cloud RPC API (ACS3-HMAC-SHA256, or the v1 HMAC-SHA1 signature).
//!
//! Owns: each platform's signing rules, request and response formats and error shapes. It
//! must not know about terminals, devices' registry entries or the wire contract: the proxy
//! maps a [`Failure`] to its own error body. Every private-key operation goes through
//! [`crate::crypto::Signer`] (ring, or a key inside a PKCS#11 token).

pub mod alipay;
pub mod aliyun;
pub mod wechatpay;

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use rustls::pki_types::CertificateDer;

/// RFC 3986 percent-encoding: everything but the unreserved `A-Z a-z 0-9 - _ . ~` becomes `%XX`
/// (upper-case hex), so a space is `%20`, `*` is `%2A` and `~` stays. Alibaba Cloud signs this
/// encoding; Alipay's form bodies use it too.
pub(crate) const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What the proxy needs to know of any platform failure, whatever the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: FailureClass,
    /// HTTP status the platform answered with; 0 when it never answered.
    pub status: u16,
    /// The platform's error code (`SYSTEM_ERROR`, `isv.invalid-signature`, ...).
    pub code: Option<String>,
    pub message: Option<String>,
    /// The platform's request id (`Request-ID`, `RequestId`, `trace_id`), for support tickets.
    pub request_id: Option<String>,
    /// `Retry-After` when the platform sent one.
    pub retry_after: Option<Duration>,
}

/// The kinds of platform failure, by what the caller should do about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Never got an answer: connection, TLS or timeout. Retry later.
    Transport,
    /// 429 or the platform's frequency-limit code. Retry after backing off.
    RateLimited,
    /// 5xx or the platform's system-busy code. Retry with the same parameters.
    ServerError,
    /// The platform refused the request as such (bad parameter, no permission, unknown
    /// device, our own signature refused). Retrying the same request will not help.
    Rejected,
    /// The answer's signature is missing, does not verify, or is outside the time window.
    BadSignature,
    /// The answer is not of the documented shape.
    Malformed,
}

impl Failure {
    /// True when the same request may succeed later.
    pub fn retryable(&self) -> bool {
        !matches!(self.class, FailureClass::Rejected)
    }

    /// A failure with only a class and a message (no platform answer).
    pub fn local(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            class,
            status: 0,
            code: None,
            message: Some(message.into()),
            request_id: None,
            retry_after: None,
        }
    }
}

/// Default timeout of one platform call, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

// === the way out ===

/// How platform calls reach the platforms.
#[derive(Clone, PartialEq, Eq)]
pub enum Egress {
    /// Straight to the platform.
    Direct,
    /// Through a forward proxy (`http://[user:pass@]host:port`): an HTTPS call is a `CONNECT`
    /// tunnel, credentials go as `Proxy-Authorization: Basic`. Hosts matching `no_proxy` (the
    /// `NO_PROXY` syntax: names and their subdomains, IPs, CIDR ranges, `*`) go straight.
    Proxy {
        url: reqwest::Url,
        no_proxy: Option<String>,
    },
}

impl Egress {
    /// The proxy as it may be shown: its password, if any, replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            Self::Direct => "direct".to_owned(),
            Self::Proxy { url, no_proxy } => {
                let mut shown = url.clone();
                if shown.password().is_some() {
                    // A URL that has a password has a host, so it can hold another password.
                    let _ = shown.set_password(Some("***"));
                }
                match no_proxy {
                    Some(list) => format!("{shown} (not for {list})"),
                    None => shown.to_string(),
                }
            }
        }
    }
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Which certificate authorities platform servers are checked against (besides a platform's
/// own `ca_file`).
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// The Mozilla roots compiled into the binary (webpki-roots): the same everywhere, updated
    /// with the binary.
    Webpki,
    /// The operating system's store (`/etc/ssl/certs`, what `update-ca-certificates` writes, or
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`), read once at start.
    System(Arc<Vec<CertificateDer<'static>>>),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Webpki => f.write_str("webpki"),
            Self::System(roots) => write!(f, "system ({} roots)", roots.len()),
        }
    }
}

/// Why a platform HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot set up TLS for {what}")]
    Tls {
        what: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("the proxy {proxy} is not usable for {what}")]
    Proxy {
        what: String,
        proxy: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client for {what}")]
    Client {
        what: String,
        #[source]
        source: reqwest::Error,
    },
}

/// Everything about how platform calls go out: the way ([`Egress`]) and the roots ([`Trust`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub egress: Egress,
    pub trust: Trust,
}

impl Upstream {
    /// Straight out, checked against the compiled-in roots.
    pub fn direct() -> Self {
        Self {
            egress: Egress::Direct,
            trust: Trust::Webpki,
        }
    }

    /// A TLS config (ring) trusting [`Self::trust`] plus `extra_ca` (PEM; a platform's
    /// `ca_file`). `what` names the platform in errors.
    pub fn tls(
        &self,
        extra_ca: Option<&str>,
        what: &str,
    ) -> Result<rustls::ClientConfig, UpstreamError> {
        let tls = |source| UpstreamError::Tls {
            what: what.to_owned(),
            source,
        };
        match &self.trust {
            Trust::Webpki => crate::tls::client_config_webpki(extra_ca, what).map_err(tls),
            Trust::System(system) => {
                let mut roots = rustls::RootCertStore::empty();
                // The system's roots were parsed when loaded; one rustls does not take (an
                // unsupported key type, say) is left out, as every TLS library does.
                roots.add_parsable_certificates(system.iter().cloned());
                if let Some(pem) = extra_ca {
                    for cert in crate::tls::certificates_from_pem(pem, what).map_err(tls)? {
                        roots
                            .add(cert)
                            .map_err(|e| tls(crate::tls::TlsError::Config(e)))?;
                    }
                }
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .map_err(|e| tls(crate::tls::TlsError::Config(e)))
            }
        }
    }

    /// A client for one platform: [`Self::tls`] with `extra_ca`, the egress, `timeout`.
    pub fn client(
        &self,
        extra_ca: Option<&str>,
        what: &str,
        timeout: Duration,
    ) -> Result<reqwest::Client, UpstreamError> {
        http_client_via(self.tls(extra_ca, what)?, timeout, &self.egress, what)
    }
}

/// An HTTP client for platform calls: the given TLS config (ring), a total timeout, no
/// redirects (a signed request must not be replayed elsewhere), straight out (never a proxy from
/// the environment: that is read, if at all, by the config into an [`Egress`]).
pub fn http_client(
    tls: rustls::ClientConfig,
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    builder(tls, timeout).build()
}

/// [`http_client`] going out through `egress`.
pub fn http_client_via(
    tls: rustls::ClientConfig,
    timeout: Duration,
    egress: &Egress,
    what: &str,
) -> Result<reqwest::Client, UpstreamError> {
    let mut builder = builder(tls, timeout);
    if let Egress::Proxy { url, no_proxy } = egress {
        let proxy = reqwest::Proxy::all(url.as_str()).map_err(|source| UpstreamError::Proxy {
            what: what.to_owned(),
            proxy: egress.redacted(),
            source,
        })?;
        builder = builder
            .proxy(proxy.no_proxy(no_proxy.as_deref().and_then(reqwest::NoProxy::from_string)));
    }
    builder.build().map_err(|source| UpstreamError::Client {
        what: what.to_owned(),
        source,
    })
}

fn builder(tls: rustls::ClientConfig, timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("authinfo-proxy/", env!("CARGO_PKG_VERSION")))
}

/// Parses a `Retry-After` header given in seconds (the HTTP-date form is rare on these APIs and
/// is read as absent).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::connect_proxy::ConnectProxy;
    use crate::sandbox::test_support::{CALL_TIMEOUT, start_https};
    use crate::sandbox::{Platform, World};

    const USER: &str = "egress";
    const PASSWORD: &str = "p@ss word";

    async fn connect_proxy(credentials: Option<(&str, &str)>) -> ConnectProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        ConnectProxy::start(listener, credentials).expect("proxy")
    }

    /// `http://egress:p%40ss%20word@127.0.0.1:port`, the password percent-encoded as a URL holds it.
    fn proxy_url(proxy: &ConnectProxy, password: &str) -> reqwest::Url {
        let mut url = reqwest::Url::parse(&proxy.url(None)).expect("url");
        url.set_username(USER).expect("username");
        url.set_password(Some(password)).expect("password");
        url
    }

    fn pinned(ca_pem: &str, egress: &Egress) -> Result<reqwest::Client, UpstreamError> {
        let tls = crate::tls::client_config_pinned(ca_pem, "sandbox ca").expect("tls");
        http_client_via(tls, CALL_TIMEOUT, egress, "test")
    }

    /// A call to the sandbox through the proxy: a CONNECT to the sandbox's address carrying the
    /// credentials, and the sandbox's own answer comes back through the tunnel.
    #[tokio::test]
    async fn calls_tunnel_through_the_proxy_with_its_credentials() {
        let t = start_https(World::default()).await;
        let proxy = connect_proxy(Some((USER, PASSWORD))).await;
        let egress = Egress::Proxy {
            url: proxy_url(&proxy, PASSWORD),
            no_proxy: None,
        };
        let client = pinned(&t.ca_pem, &egress).expect("client");
        let answer = client
            .get(format!(
                "{}/v3/iotmanage/devices?offset=0&limit=1",
                t.sandbox.base_url
            ))
            .send()
            .await
            .expect("an answer through the tunnel");
        assert_eq!(
            answer.status(),
            401,
            "the sandbox's own refusal of an unsigned call"
        );
        let tunnels = proxy.tunnels();
        assert_eq!(tunnels.len(), 1, "{tunnels:?}");
        assert_eq!(tunnels[0].target, t.sandbox.addr.to_string());
        assert!(tunnels[0].opened);
        use base64::Engine as _;
        assert_eq!(
            tunnels[0].proxy_authorization.as_deref(),
            Some(&*format!(
                "Basic {}",
                crate::crypto::BASE64.encode(format!("{USER}:{PASSWORD}"))
            )),
            "the percent-encoded password is sent decoded"
        );
        assert_eq!(t.sandbox.state.received_by(Platform::WechatPay), 1);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn wrong_proxy_credentials_are_a_transport_failure_and_nothing_reaches_the_platform() {
        let t = start_https(World::default()).await;
        let proxy = connect_proxy(Some((USER, PASSWORD))).await;
        for (case, url) in [
            ("wrong password", proxy_url(&proxy, "guess")),
            (
                "no credentials",
                reqwest::Url::parse(&proxy.url(None)).expect("url"),
            ),
        ] {
            let egress = Egress::Proxy {
                url,
                no_proxy: None,
            };
            let error = pinned(&t.ca_pem, &egress)
                .expect("client")
                .get(format!("{}/gateway.do", t.sandbox.base_url))
                .send()
                .await
                .expect_err(case);
            assert!(error.is_connect(), "{case}: {error:?}");
        }
        assert!(proxy.tunnels().iter().all(|t| !t.opened));
        assert_eq!(proxy.tunnels().len(), 2);
        assert!(t.sandbox.state.received().is_empty());
        proxy.stop().await;
    }

    /// `NO_PROXY` (here the sandbox's IP) sends the call straight, past the proxy.
    #[tokio::test]
    async fn hosts_in_no_proxy_go_straight() {
        let t = start_https(World::default()).await;
        let proxy = connect_proxy(None).await;
        let egress = Egress::Proxy {
            url: reqwest::Url::parse(&proxy.url(None)).expect("url"),
            no_proxy: Some("example.com, 127.0.0.1".into()),
        };
        let answer = pinned(&t.ca_pem, &egress)
            .expect("client")
            .get(format!(
                "{}/v3/iotmanage/devices?offset=0&limit=1",
                t.sandbox.base_url
            ))
            .send()
            .await
            .expect("straight to the sandbox");
        assert_eq!(answer.status(), 401);
        assert!(proxy.tunnels().is_empty(), "{:?}", proxy.tunnels());
        proxy.stop().await;
    }

    /// `trust = "system"` checks the platform against the system's roots (here a store holding
    /// only the sandbox's CA); the compiled-in Mozilla roots do not know that CA.
    #[tokio::test]
    async fn system_trust_uses_the_systems_roots_and_webpki_does_not() {
        let t = start_https(World::default()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("ca-certificates.crt");
        std::fs::write(&store, &t.ca_pem).expect("write");
        let system = rustls_native_certs::load_certs_from_paths(Some(&store), None).certs;
        assert_eq!(system.len(), 1);
        let url = format!(
            "{}/v3/iotmanage/devices?offset=0&limit=1",
            t.sandbox.base_url
        );
        // A GET of the sandbox directly, trusting `trust` and the platform's `ca_file`.
        let get = |trust: Trust, ca_file: Option<&str>| {
            let client = Upstream {
                egress: Egress::Direct,
                trust,
            }
            .client(ca_file, "wechatpay", CALL_TIMEOUT)
            .expect("client");
            client.get(&url).send()
        };
        let answer = get(Trust::System(Arc::new(system)), None)
            .await
            .expect("the system store trusts the sandbox");
        assert_eq!(answer.status(), 401);
        let error = get(Trust::Webpki, None)
            .await
            .expect_err("the Mozilla roots do not know the sandbox CA");
        assert!(error.is_connect(), "{error:?}");
        // A platform's ca_file is added to either.
        let answer = get(Trust::Webpki, Some(&t.ca_pem)).await.expect("ca_file");
        assert_eq!(answer.status(), 401);
    }

    #[test]
    fn a_proxy_password_is_never_shown() {
        let egress = Egress::Proxy {
            url: reqwest::Url::parse("http://egress:s3cret@proxy.example:3128").expect("url"),
            no_proxy: Some("localhost".into()),
        };
        let shown = format!("{} {egress:?}", egress.redacted());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("http://egress:***@proxy.example:3128/ (not for localhost)"),
            "{shown}"
        );
        assert_eq!(Egress::Direct.redacted(), "direct");
    }
}
