//! Keeps WeChat Pay's platform certificates when the merchant gives its APIv3 key
//! (`[wechatpay] apiv3_key_file`): downloads them at start and every
//! [`REFRESH_INTERVAL`], verifies each download with what is already trusted (the first time,
//! with the downloaded set itself), keeps them in the proxy's store across restarts, and hands
//! the client the union of the configured keys and every downloaded certificate not yet expired.
//!
//! Owns: the merge (old certificates are kept while they are valid, so answers still signed
//! with one verify during a rotation; an expired one is dropped), the stored bundle, and the
//! schedule. It must not decrypt or verify by itself: [`WechatPayClient::download_certificates`]
//! does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store::{Store, StoreError};
use crate::platform::wechatpay::certificates::{ApiV3Key, DownloadedCertificate, Verification};
use crate::platform::wechatpay::verify::read_certificate;
use crate::platform::wechatpay::{PlatformKeys, WechatPayClient, WechatPayError};

/// How often the certificates are downloaded: WeChat Pay publishes a new certificate well before
/// the old one expires and asks merchants to fetch at least every 12 hours.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(12 * 3600);
/// A certificate this close to expiry, with no newer one published, is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// Why certificates could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum CertificatesError {
    #[error("downloading the WeChat Pay platform certificates failed")]
    Download(#[source] Box<WechatPayError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored platform certificates are not readable: {0}")]
    Stored(String),
}

/// What one refresh changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// Serials downloaded for the first time.
    pub added: Vec<String>,
    /// Every certificate now trusted (configured ones not included), by serial.
    pub kept: Vec<String>,
    /// Serials dropped because they expired.
    pub expired: Vec<String>,
    pub verification: Verification,
}

/// The proxy's certificate keeper.
pub struct CertificateKeeper {
    /// The keys from the config (public key, platform_certificates file): always trusted.
    configured: PlatformKeys,
    key: ApiV3Key,
    store: Store,
    clock: super::fleet::Clock,
}

impl std::fmt::Debug for CertificateKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateKeeper")
            .field("configured", &self.configured)
            .field("store", &self.store.path())
            .finish_non_exhaustive()
    }
}

impl CertificateKeeper {
    pub fn new(configured: PlatformKeys, key: ApiV3Key, store: Store) -> Self {
        Self {
            configured,
            key,
            store,
            clock: super::fleet::system_clock(),
        }
    }

    /// The keeper with a test's clock.
    pub fn with_clock(mut self, clock: super::fleet::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The downloaded certificates in the store, by serial.
    fn stored(&self) -> Result<BTreeMap<String, DownloadedCertificate>, CertificatesError> {
        let Some(bundle) = self.store.platform_certificates()? else {
            return Ok(BTreeMap::new());
        };
        let certificates = crate::crypto::pem_certificates(&bundle, "stored platform certificates")
            .map_err(|e| CertificatesError::Stored(e.to_string()))?;
        let mut out = BTreeMap::new();
        for (index, der) in certificates.iter().enumerate() {
            let info = read_certificate(der, "stored platform certificates", index)
                .map_err(|e| CertificatesError::Stored(crate::error_chain(&e)))?;
            let pem = crate::crypto::certificate_pem(der);
            out.insert(info.serial.clone(), DownloadedCertificate { info, pem });
        }
        Ok(out)
    }

    /// The configured keys plus `certificates`.
    fn keys_with(&self, certificates: &BTreeMap<String, DownloadedCertificate>) -> PlatformKeys {
        let mut keys = self.configured.clone();
        for certificate in certificates.values() {
            keys.add_certificate(certificate.info.clone());
        }
        keys
    }

    /// Gives `client` the configured keys and the stored certificates (at start, before any
    /// call, so a restart verifies without a download). Returns how many were stored.
    pub fn install_stored(&self, client: &WechatPayClient) -> Result<usize, CertificatesError> {
        let stored = self.stored()?;
        client.set_keys(self.keys_with(&stored));
        Ok(stored.len())
    }

    /// Downloads and verifies the certificates (with what `client` trusts now), keeps them
    /// with the stored ones still valid, stores the set and hands it to `client`.
    pub async fn refresh(&self, client: &WechatPayClient) -> Result<Refreshed, CertificatesError> {
        let download = client
            .download_certificates(&self.key)
            .await
            .map_err(|e| CertificatesError::Download(Box::new(e)))?;
        let now = (self.clock)();
        let mut known = self.stored()?;
        let mut added = Vec::new();
        for certificate in download.certificates {
            if !known.contains_key(&certificate.info.serial) {
                added.push(certificate.info.serial.clone());
            }
            known.insert(certificate.info.serial.clone(), certificate);
        }
        let expired: Vec<String> = known
            .values()
            .filter(|c| c.info.not_after < now)
            .map(|c| c.info.serial.clone())
            .collect();
        known.retain(|serial, _| !expired.contains(serial));
        let bundle: String = known.values().map(|c| c.pem.as_str()).collect();
        self.store.save_platform_certificates(&bundle).await?;
        client.set_keys(self.keys_with(&known));
        for serial in &added {
            if let Some(c) = known.get(serial) {
                tracing::info!(
                    message_id = crate::events::PLATFORM_CERTIFICATE_NEW,
                    serial = %serial,
                    not_after = %crate::units::rfc3339(c.info.not_after),
                    "new wechat pay platform certificate"
                );
            }
        }
        for serial in &expired {
            tracing::info!(serial = %serial, "expired wechat pay platform certificate dropped");
        }
        if let Some(latest) = known.values().map(|c| c.info.not_after).max() {
            let left = latest.saturating_sub(now);
            if left < i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX) {
                tracing::warn!(
                    message_id = crate::events::PLATFORM_CERTIFICATES_EXPIRING,
                    days_left = left / 86_400,
                    "every wechat pay platform certificate expires within 30 days and no newer one is published"
                );
            }
        }
        Ok(Refreshed {
            added,
            kept: known.keys().cloned().collect(),
            expired,
            verification: download.verification,
        })
    }
}

/// Refreshes every [`REFRESH_INTERVAL`] (up to 10 % early) after a first refresh `first_in`
/// from now, retrying a failed refresh with backoff (30 s doubling to 30 min), until
/// `shutdown`. A failed refresh keeps the certificates already trusted.
pub async fn run(
    keeper: Arc<CertificateKeeper>,
    client: Arc<WechatPayClient>,
    first_in: Duration,
    shutdown: CancellationToken,
) {
    let schedule = crate::schedule::Schedule {
        interval: REFRESH_INTERVAL,
        jitter: 0.1,
        backoff_min: Duration::from_secs(30),
        backoff_max: Duration::from_secs(1800),
    };
    super::periodic::repeat(
        schedule,
        first_in,
        shutdown,
        crate::events::PLATFORM_CERTIFICATES_FAILED,
        "platform certificate refresh failed; keeping the trusted ones",
        || async {
            let refreshed = keeper.refresh(&client).await?;
            tracing::info!(
                message_id = crate::events::PLATFORM_CERTIFICATES_REFRESHED,
                certificates = refreshed.kept.len(),
                added = refreshed.added.len(),
                expired = refreshed.expired.len(),
                "wechat pay platform certificates refreshed"
            );
            Ok::<(), CertificatesError>(())
        },
    )
    .await;
}

/// The certificates as a table for people (`authinfo-proxy certificates`).
pub fn render_table(certificates: &[DownloadedCertificate], verification: &Verification) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut row = |serial: &str, not_before: &str, not_after: &str| {
        let _ = writeln!(out, "{serial:<40}  {not_before:<20}  {not_after}");
    };
    row("SERIAL", "NOT_BEFORE", "NOT_AFTER");
    for c in certificates {
        row(
            &c.info.serial,
            &crate::units::rfc3339(c.info.not_before),
            &crate::units::rfc3339(c.info.not_after),
        );
    }
    let how = match verification {
        Verification::Trusted(serial) => {
            format!("the answer is signed with {serial}, which was already trusted")
        }
        Verification::FirstUse(serial) => format!(
            "the answer is signed with {serial}, one of these: a first download, trusted because every certificate opened with the APIv3 key"
        ),
    };
    let _ = writeln!(out, "{} certificate(s); {how}", certificates.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RsaSigner;
    use crate::platform::FailureClass;
    use crate::platform::wechatpay::MerchantSigner;
    use crate::sandbox::test_support::{CALL_TIMEOUT, TestSandbox, start_https};
    use crate::sandbox::{SandboxCertificate, World};
    use std::sync::atomic::{AtomicI64, Ordering};

    fn client(t: &TestSandbox) -> WechatPayClient {
        let keys = &t.sandbox.state.keys;
        let merchant = RsaSigner::from_pem(&t.secrets.wechat_merchant_private_pem, "merchant")
            .expect("merchant key");
        WechatPayClient::new(
            t.sandbox.base_url.parse().expect("url"),
            MerchantSigner::new(&keys.wechat_mchid, &keys.wechat_merchant_serial, merchant),
            PlatformKeys::new(),
            t.http(CALL_TIMEOUT),
        )
    }

    fn sorted(mut serials: Vec<String>) -> Vec<String> {
        serials.sort();
        serials
    }

    /// A rotation as WeChat Pay runs it: the next certificate is published while answers are
    /// still signed with the old one, then answers are signed with the next; the old one, no
    /// longer published, is still trusted until it expires, and then dropped. A new keeper on the
    /// same store (a restart) trusts what was kept before any download.
    #[tokio::test]
    async fn certificates_rotate_and_old_ones_are_kept_until_they_expire() {
        let t = start_https(World {
            wechat_sign_with_certificate: true,
            ..World::default()
        })
        .await;
        let sandbox = &t.sandbox.state;
        let old = sandbox.platform_certificates()[0].clone();
        let real_now = crate::units::unix_now();
        let now = Arc::new(AtomicI64::new(real_now));
        let read = now.clone();
        let store = Store::temporary().expect("store");
        let key = ApiV3Key::from_text(&t.secrets.wechat_apiv3_key).expect("apiv3 key");
        let keeper = CertificateKeeper::new(PlatformKeys::new(), key.clone(), store.clone())
            .with_clock(Arc::new(move || read.load(Ordering::SeqCst)));
        let client = client(&t);

        let first = keeper.refresh(&client).await.expect("first download");
        assert_eq!(
            first.verification,
            Verification::FirstUse(old.serial.clone())
        );
        assert_eq!(first.added, [old.serial.as_str()]);

        let next = SandboxCertificate::issue(
            &crate::crypto::test_key(1).private_pem,
            real_now - 86_400,
            old.not_after + 365 * 86_400,
        )
        .expect("certificate");
        sandbox.publish_platform_certificate(next.clone());
        let second = keeper.refresh(&client).await.expect("rotation begins");
        assert_eq!(
            second.verification,
            Verification::Trusted(old.serial.clone())
        );
        assert_eq!(second.added, [next.serial.as_str()]);
        assert_eq!(
            second.kept,
            sorted(vec![old.serial.clone(), next.serial.clone()])
        );
        sandbox.sign_with_certificate(Some(&next.serial));
        client
            .list_devices(0, 1)
            .await
            .expect("signed with the next one");

        sandbox.withdraw_platform_certificate(&old.serial);
        let third = keeper.refresh(&client).await.expect("old one withdrawn");
        assert_eq!(
            third.verification,
            Verification::Trusted(next.serial.clone())
        );
        assert_eq!(
            third.kept,
            sorted(vec![old.serial.clone(), next.serial.clone()]),
            "still valid, so still trusted"
        );
        sandbox.sign_with_certificate(Some(&old.serial));
        client
            .list_devices(0, 1)
            .await
            .expect("an answer still signed with the old one verifies");

        now.store(old.not_after + 1, Ordering::SeqCst);
        sandbox.sign_with_certificate(Some(&next.serial));
        let fourth = keeper
            .refresh(&client)
            .await
            .expect("after the old one's expiry");
        assert_eq!(fourth.expired, [old.serial.as_str()]);
        assert_eq!(fourth.kept, [next.serial.as_str()]);
        sandbox.sign_with_certificate(Some(&old.serial));
        let failure = client
            .list_devices(0, 1)
            .await
            .expect_err("the expired one is no longer trusted")
            .failure();
        assert_eq!(failure.class, FailureClass::BadSignature);

        let restarted = self::client(&t);
        let keeper = CertificateKeeper::new(PlatformKeys::new(), key, store);
        assert_eq!(keeper.install_stored(&restarted).expect("stored"), 1);
        assert!(restarted.keys().contains(&next.serial));
        assert!(!restarted.keys().contains(&old.serial));
        t.sandbox.stop().await;
    }

    #[test]
    fn table_names_serials_validity_and_how_the_answer_verified() {
        let info = crate::platform::wechatpay::verify::CertificateInfo {
            serial: "5157F09EFDC096DE15EBE81A47057A7232F1B8E1".into(),
            key: crate::crypto::test_key(0).public.clone(),
            not_before: 0,
            not_after: 86_400,
        };
        let certificates = [DownloadedCertificate {
            info,
            pem: String::new(),
        }];
        let table = render_table(
            &certificates,
            &Verification::FirstUse("5157F09EFDC096DE15EBE81A47057A7232F1B8E1".into()),
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "SERIAL                                    NOT_BEFORE            NOT_AFTER"
        );
        assert_eq!(
            lines[1],
            "5157F09EFDC096DE15EBE81A47057A7232F1B8E1  1970-01-01T00:00:00Z  1970-01-02T00:00:00Z"
        );
        assert!(lines[2].starts_with("1 certificate(s); "), "{table}");
        assert!(lines[2].contains("first download"), "{table}");
    }
}
