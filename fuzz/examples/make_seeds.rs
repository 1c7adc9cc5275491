//! Writes the seed corpus of every fuzz target (`fuzz/seeds/<target>/`) from real examples and
//! the sandbox's traffic: `scripts/fuzz --seeds` runs it.
//!
//! It starts the lab (the simulated platforms and the proxy over HTTPS, with fresh keys), then
//! records, in the framing the targets read (`authinfod_fuzz`'s crate doc):
//! - WeChat Pay's, Alipay's and Alibaba Cloud's answers to correctly signed requests, their
//!   refusals (unknown device, bad signature, rejected raw_data) and the sandbox's faults (5xx,
//!   429, bad or stale signature, malformed body);
//! - the proxy's answers to a device-signed terminal (every route, and its refusals: skew with
//!   its `Date`, replay, unknown route, bad body, upstream faults);
//! - the daemon's sled records after a real run against the lab;
//! - the socket API requests of the README, device Authorization headers and signing strings,
//!   the example and lab configs, and the lab's PEM files.
//!
//! Timestamps and random values differ from run to run; the file names do not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use authinfod::crypto::{self, RsaSigner, RsaVerifier};
use authinfod::demo::lab::{self, Lab};
use authinfod::platform::alipay::{AlipayClient, DeviceQuery};
use authinfod::platform::aliyun::{AccessKey, AliyunClient, SignatureScheme, Stamp};
use authinfod::platform::wechatpay::{AuthinfoParams, MerchantSigner};
use authinfod::sandbox::{Fault, Platform};
use authinfod::wire::auth::{DeviceSigner, signing_string};

type Error = Box<dyn std::error::Error>;

/// The key id the `wechatpay_verify` target signs with (its `KEY_ID`).
const VERIFY_KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000001";

struct Seeds {
    root: PathBuf,
    written: usize,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) -> Result<(), Error> {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
        self.written += 1;
        Ok(())
    }
}

/// An answer as captured: status, the headers worth keeping, body.
struct Captured {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Captured {
    async fn from(response: reqwest::Response, keep: &[&str]) -> Result<Self, Error> {
        let status = response.status().as_u16();
        let mut headers = Vec::new();
        for name in keep {
            for value in response.headers().get_all(*name) {
                headers.push(((*name).to_owned(), value.to_str()?.to_owned()));
            }
        }
        let body = response.bytes().await?.to_vec();
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The framed text: status line, headers, empty line, body.
    fn framed(&self) -> Vec<u8> {
        frame(&self.status.to_string(), &self.headers, &self.body)
    }
}

fn frame(first: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{first}\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\n"));
    }
    out.push('\n');
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The sandbox's faults, by name: `500`, `503`, `429` (with `Retry-After`), `bad-signature`,
/// `stale-timestamp` (WeChat Pay only), `malformed`.
fn faults(names: &[&'static str]) -> Vec<(&'static str, Fault)> {
    names
        .iter()
        .map(|name| {
            let fault = match *name {
                "500" => Fault {
                    status: Some(500),
                    ..Fault::default()
                },
                "503" => Fault {
                    status: Some(503),
                    ..Fault::default()
                },
                "429" => Fault {
                    status: Some(429),
                    retry_after: Some(7),
                    ..Fault::default()
                },
                "bad-signature" => Fault {
                    bad_signature: true,
                    ..Fault::default()
                },
                "stale-timestamp" => Fault {
                    stale_timestamp: Some(400),
                    ..Fault::default()
                },
                "malformed" => Fault {
                    malformed_body: true,
                    ..Fault::default()
                },
                other => panic!("no fault {other}"),
            };
            (*name, fault)
        })
        .collect()
}

fn pinned_client(ca_pem: &str) -> Result<reqwest::Client, Error> {
    let tls = authinfod::tls::client_config_pinned(ca_pem, "seed client")?;
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    // `make_seeds wechatpay_certificates`: only the seeds that need no lab, the others kept.
    if std::env::args().nth(1).as_deref() == Some("wechatpay_certificates") {
        let dir = root.join("wechatpay_certificates");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let mut seeds = Seeds { root, written: 0 };
        certificates(&mut seeds)?;
        println!("wrote {} seeds under {}", seeds.written, dir.display());
        return Ok(());
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let mut seeds = Seeds { root, written: 0 };
    certificates(&mut seeds)?;
    let dir = tempfile::tempdir()?;
    let lab = Lab::start(
        dir.path(),
        lab::world(7, 45),
        "",
        "[refresh]\nbackoff_min = \"1s\"\nbackoff_max = \"2s\"\n",
    )
    .await?;
    wechat(&mut seeds, &lab).await?;
    alipay(&mut seeds, &lab).await?;
    aliyun(&mut seeds, &lab).await?;
    proxy(&mut seeds, &lab).await?;
    store(&mut seeds, &lab).await?;
    socket(&mut seeds)?;
    device_auth(&mut seeds, &lab)?;
    configs(&mut seeds, &lab)?;
    pem(&mut seeds, &lab)?;
    lab.stop().await;
    println!(
        "wrote {} seeds under {}",
        seeds.written,
        seeds.root.display()
    );
    Ok(())
}

// === WeChat Pay ===

/// `GET /v3/certificates` answers sealed with the target's APIv3 key: certificates made for the
/// fuzz test key (rcgen; RSA signatures are deterministic, so these seeds are the same on every
/// run), and the refusals `open_answer` names (another algorithm, a wrong serial, a tag that does
/// not open, bad base64, no entries); the bare PEM for the target's sealing half.
fn certificates(seeds: &mut Seeds) -> Result<(), Error> {
    use authinfod::sandbox::wechatpay::seal_certificate;
    use authinfod_fuzz::APIV3_KEY;
    const T: &str = "wechatpay_certificates";
    let key = rcgen::KeyPair::from_pem(&authinfod_fuzz::test_key().private_pem)?;
    let certificate = |serial: &[u8]| -> Result<String, Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tenpay.com Root CA");
        params.not_before = time::macros::datetime!(2026-01-01 0:00 UTC);
        params.not_after = time::macros::datetime!(2031-01-01 0:00 UTC);
        Ok(params.self_signed(&key)?.pem())
    };
    let first = certificate(&[0x5B, 0xB0, 0x1E, 0x5A, 0xD5, 0x90, 0x4B, 0x0F])?;
    let second = certificate(&[0x00, 0x7A, 0x11, 0x02])?;
    let entry = |serial: &str, algorithm: &str, nonce: &str, pem: &str| -> Result<_, Error> {
        let ciphertext =
            seal_certificate(APIV3_KEY, nonce, "certificate", pem).map_err(|_| "sealing failed")?;
        Ok(serde_json::json!({
            "serial_no": serial,
            "effective_time": "2026-01-01T08:00:00+08:00",
            "expire_time": "2031-01-01T08:00:00+08:00",
            "encrypt_certificate": {
                "algorithm": algorithm,
                "nonce": nonce,
                "associated_data": "certificate",
                "ciphertext": ciphertext,
            },
        }))
    };
    let gcm = "AEAD_AES_256_GCM";
    let answer = |entries: Vec<serde_json::Value>| {
        serde_json::to_vec_pretty(&serde_json::json!({ "data": entries }))
    };
    seeds.put(
        T,
        "two-certificates.json",
        &answer(vec![
            entry("5BB01E5AD5904B0F", gcm, "a1b2c3d4e5f6", &first)?,
            entry("7A1102", gcm, "0f1e2d3c4b5a", &second)?,
        ])?,
    )?;
    seeds.put(
        T,
        "lower-case-serial.json",
        &answer(vec![entry(
            "5bb01e5ad5904b0f",
            gcm,
            "a1b2c3d4e5f6",
            &first,
        )?])?,
    )?;
    seeds.put(
        T,
        "other-algorithm.json",
        &answer(vec![entry(
            "5BB01E5AD5904B0F",
            "AEAD_SM4_GCM",
            "a1b2c3d4e5f6",
            &first,
        )?])?,
    )?;
    seeds.put(
        T,
        "wrong-serial.json",
        &answer(vec![entry("7A1102", gcm, "a1b2c3d4e5f6", &first)?])?,
    )?;
    let mut tampered = entry("5BB01E5AD5904B0F", gcm, "a1b2c3d4e5f6", &first)?;
    tampered["encrypt_certificate"]["associated_data"] = "certificates".into();
    seeds.put(T, "tag-does-not-open.json", &answer(vec![tampered])?)?;
    let mut short_nonce = entry("5BB01E5AD5904B0F", gcm, "a1b2c3d4e5f6", &first)?;
    short_nonce["encrypt_certificate"]["nonce"] = "a1b2".into();
    seeds.put(T, "short-nonce.json", &answer(vec![short_nonce])?)?;
    let mut not_base64 = entry("5BB01E5AD5904B0F", gcm, "a1b2c3d4e5f6", &first)?;
    not_base64["encrypt_certificate"]["ciphertext"] = "not base64!".into();
    seeds.put(T, "not-base64.json", &answer(vec![not_base64])?)?;
    seeds.put(
        T,
        "not-pem-inside.json",
        &answer(vec![entry(
            "5BB01E5AD5904B0F",
            gcm,
            "a1b2c3d4e5f6",
            "hello",
        )?])?,
    )?;
    seeds.put(T, "no-entries.json", br#"{"data":[]}"#)?;
    seeds.put(T, "array.json", br#"[{"data":[]}]"#)?;
    seeds.put(T, "certificate.pem", first.as_bytes())?;
    Ok(())
}

async fn wechat(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    let files = &lab.files;
    let http = pinned_client(&std::fs::read_to_string(files.path("sandbox-ca.pem"))?)?;
    let keys = &lab.sandbox.state.keys;
    let merchant = MerchantSigner::new(
        keys.wechat_mchid.clone(),
        keys.wechat_merchant_serial.clone(),
        RsaSigner::from_file(&files.path("wechatpay-merchant.key"))?,
    );
    let stranger = MerchantSigner::new(
        keys.wechat_mchid.clone(),
        keys.wechat_merchant_serial.clone(),
        RsaSigner::from_file(&files.path("alipay-app.key"))?,
    );
    let base = &lab.sandbox.base_url;
    let call = |signer: &MerchantSigner, method: &str, target: &str, body: Option<Vec<u8>>| {
        let request = (|| -> Result<reqwest::RequestBuilder, Error> {
            let authorization = signer.authorization(
                method,
                target,
                authinfod::units::unix_now(),
                &crypto::nonce()?,
                body.as_deref().unwrap_or_default(),
            )?;
            let mut request = http
                .request(method.parse()?, format!("{base}{target}"))
                .header("Authorization", authorization)
                .header("Accept", "application/json")
                .header("User-Agent", "authinfod-fuzz-seeds");
            if let Some(body) = body {
                request = request
                    .header("Content-Type", "application/json")
                    .body(body);
            }
            Ok(request)
        })();
        async move {
            const KEEP: &[&str] = &[
                "Request-ID",
                "Wechatpay-Serial",
                "Wechatpay-Timestamp",
                "Wechatpay-Nonce",
                "Wechatpay-Signature",
                "Retry-After",
                "Content-Type",
            ];
            Captured::from(request?.send().await?, KEEP).await
        }
    };
    let params = |raw: &str| {
        serde_json::to_vec(&AuthinfoParams {
            sp_appid: "wxsandboxspapp0001".into(),
            sub_appid: "wxsandboxsubapp0001".into(),
            sub_mchid: "1900000002".into(),
            device_id: lab::DEVICE_SN.into(),
            raw_data: raw.into(),
            organization_id: "ORG-CANTEEN-01".into(),
        })
    };
    let authinfo = "/v3/offlineface/authinfo";
    let inspection = format!("/v3/iotmanage/device-inspections/{}", lab::DEVICE_SN);
    let mut captured: Vec<(String, Captured)> = [
        (
            "authinfo-200",
            call(&merchant, "POST", authinfo, Some(params("RAW-1")?)).await?,
        ),
        (
            "inspection-200",
            call(&merchant, "GET", &inspection, None).await?,
        ),
        (
            "devices-200",
            call(
                &merchant,
                "GET",
                "/v3/iotmanage/devices?offset=0&limit=5",
                None,
            )
            .await?,
        ),
        (
            "devices-last-page",
            call(
                &merchant,
                "GET",
                "/v3/iotmanage/devices?offset=5&limit=5",
                None,
            )
            .await?,
        ),
        (
            "devices-past-the-end",
            call(
                &merchant,
                "GET",
                "/v3/iotmanage/devices?offset=100&limit=100",
                None,
            )
            .await?,
        ),
        (
            "authinfo-rejected-raw-data",
            call(
                &merchant,
                "POST",
                authinfo,
                Some(params("REJECTED-RAW-DATA")?),
            )
            .await?,
        ),
        (
            "authinfo-missing-field",
            call(&merchant, "POST", authinfo, Some(b"{}".to_vec())).await?,
        ),
        (
            "inspection-unknown-device",
            call(
                &merchant,
                "GET",
                "/v3/iotmanage/device-inspections/NOSUCHDEVICE00",
                None,
            )
            .await?,
        ),
        (
            "sign-error",
            call(&stranger, "GET", &inspection, None).await?,
        ),
    ]
    .into_iter()
    .map(|(name, answer)| (name.to_owned(), answer))
    .collect();
    for (name, fault) in faults(&[
        "500",
        "503",
        "429",
        "bad-signature",
        "stale-timestamp",
        "malformed",
    ]) {
        lab.sandbox.state.faults.set(Platform::WechatPay, fault);
        let answer = call(&merchant, "POST", authinfo, Some(params("RAW-1")?)).await?;
        captured.push((format!("fault-{name}"), answer));
        lab.sandbox.state.faults.clear(Platform::WechatPay);
    }
    for (name, answer) in &captured {
        seeds.put("wechatpay_answer", &format!("{name}.txt"), &answer.framed())?;
        seeds.put("wechatpay_verify", &format!("{name}.txt"), &answer.framed())?;
    }
    // The genuine answers the verify target signs itself: named key, placeholder signature.
    for (name, answer) in captured.iter().take(3) {
        let mut headers: Vec<(String, String)> = answer
            .headers
            .iter()
            .filter(|(n, _)| n != "Wechatpay-Serial" && n != "Wechatpay-Signature")
            .cloned()
            .collect();
        headers.push(("Wechatpay-Serial".into(), VERIFY_KEY_ID.into()));
        headers.push(("Wechatpay-Signature".into(), "GENUINE".into()));
        let genuine = frame(&answer.status.to_string(), &headers, &answer.body);
        seeds.put("wechatpay_verify", &format!("{name}.txt"), &genuine)?;
        for shift in ["299", "300", "-300"] {
            let mut shifted = headers.clone();
            shifted.push(("X-Fuzz-Now".into(), shift.into()));
            let text = frame(&answer.status.to_string(), &shifted, &answer.body);
            seeds.put("wechatpay_verify", &format!("{name}-now{shift}.txt"), &text)?;
        }
        let _ = answer.header("Wechatpay-Timestamp").ok_or("no timestamp")?;
    }
    Ok(())
}

// === Alipay ===

async fn alipay(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    let files = &lab.files;
    let http = pinned_client(&std::fs::read_to_string(files.path("sandbox-ca.pem"))?)?;
    let gateway = format!("{}/gateway.do", lab.sandbox.base_url);
    let client = |key: &str| -> Result<AlipayClient, Error> {
        Ok(AlipayClient::new(
            gateway.clone(),
            lab.sandbox.state.keys.alipay_app_id.clone(),
            RsaSigner::from_file(&files.path(key))?,
            RsaVerifier::from_pem(
                &std::fs::read_to_string(files.path("alipay-public.pem"))?,
                "alipay public key",
            )?,
            http.clone(),
        ))
    };
    let post = |client: AlipayClient, query: DeviceQuery| {
        let http = http.clone();
        let gateway = gateway.clone();
        async move {
            let params = client.signed_params(&query, time::OffsetDateTime::now_utc())?;
            let form = params
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        percent_encoding::utf8_percent_encode(
                            v,
                            percent_encoding::NON_ALPHANUMERIC
                        )
                    )
                })
                .collect::<Vec<_>>()
                .join("&");
            let response = http
                .post(&gateway)
                .header(
                    "Content-Type",
                    authinfod::platform::alipay::FORM_CONTENT_TYPE,
                )
                .body(form)
                .send()
                .await?;
            Ok::<_, Error>(response.bytes().await?.to_vec())
        }
    };
    let by_id = |tid: &str| DeviceQuery::Id {
        biz_tid: tid.into(),
    };
    seeds.put(
        "alipay_answer",
        "binding-signed.json",
        &post(client("alipay-app.key")?, by_id(lab::BIZ_TID)).await?,
    )?;
    seeds.put(
        "alipay_answer",
        "device-not-exist.json",
        &post(client("alipay-app.key")?, by_id("0101nosuchdevice")).await?,
    )?;
    seeds.put(
        "alipay_answer",
        "by-sn-not-exist.json",
        &post(
            client("alipay-app.key")?,
            DeviceQuery::Sn {
                supplier_id: "201812271300540049".into(),
                device_sn: "QCF420190316000107".into(),
            },
        )
        .await?,
    )?;
    seeds.put(
        "alipay_answer",
        "invalid-signature.json",
        &post(client("wechatpay-merchant.key")?, by_id(lab::BIZ_TID)).await?,
    )?;
    for (name, fault) in faults(&["bad-signature", "malformed", "500", "429"]) {
        lab.sandbox.state.faults.set(Platform::Alipay, fault);
        let body = post(client("alipay-app.key")?, by_id(lab::BIZ_TID)).await?;
        lab.sandbox.state.faults.clear(Platform::Alipay);
        seeds.put("alipay_answer", &format!("fault-{name}.json"), &body)?;
    }
    Ok(())
}

// === Alibaba Cloud ===

async fn aliyun(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    let http = pinned_client(&std::fs::read_to_string(lab.files.path("sandbox-ca.pem"))?)?;
    let (id, secret) = lab
        .sandbox
        .state
        .keys
        .aliyun_access_keys
        .iter()
        .next()
        .ok_or("no access key")?;
    let call = |secret: &str, scheme: SignatureScheme, device: &str| {
        let client = AliyunClient::new(
            &lab.sandbox.base_url,
            AccessKey::new(id.clone(), secret.to_owned()),
            scheme,
            http.clone(),
        );
        let http = http.clone();
        let params = BTreeMap::from([
            ("DeviceId".to_owned(), device.to_owned()),
            ("PageSize".to_owned(), "50".to_owned()),
            ("CurrentPage".to_owned(), "1".to_owned()),
        ]);
        async move {
            let signed = client?.sign(
                "DescribeDeviceInfo",
                "2019-03-07",
                &params,
                &Stamp::fresh()?,
            );
            let mut request = http
                .request(signed.method, &signed.url)
                .header("Accept", "application/json");
            for (name, value) in &signed.headers {
                request = request.header(name.as_str(), value.as_str());
            }
            Captured::from(
                request.send().await?,
                &["x-acs-request-id", "Retry-After", "Content-Type"],
            )
            .await
        }
    };
    let acs3 = SignatureScheme::Acs3HmacSha256;
    let mut captured: Vec<(String, Captured)> = vec![
        (
            "page-200",
            call(secret, acs3, lab::CLOUDAUTH_DEVICE_ID).await?,
        ),
        (
            "page-v1-200",
            call(
                secret,
                SignatureScheme::RpcHmacSha1,
                lab::CLOUDAUTH_DEVICE_ID,
            )
            .await?,
        ),
        ("page-empty", call(secret, acs3, "wd.nosuchdevice").await?),
        (
            "signature-does-not-match",
            call("wrongsecret", acs3, lab::CLOUDAUTH_DEVICE_ID).await?,
        ),
    ]
    .into_iter()
    .map(|(name, answer)| (name.to_owned(), answer))
    .collect();
    for (name, fault) in faults(&["429", "500", "malformed"]) {
        lab.sandbox.state.faults.set(Platform::Aliyun, fault);
        let answer = call(secret, acs3, lab::CLOUDAUTH_DEVICE_ID).await?;
        captured.push((format!("fault-{name}"), answer));
        lab.sandbox.state.faults.clear(Platform::Aliyun);
    }
    for (name, answer) in captured {
        seeds.put("aliyun_answer", &format!("{name}.txt"), &answer.framed())?;
    }
    Ok(())
}

// === the proxy, as a terminal sees it ===

async fn proxy(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    let files = &lab.files;
    let http = pinned_client(&std::fs::read_to_string(files.path("proxy-ca.pem"))?)?;
    let signer = DeviceSigner::new(
        lab::DEVICE_ID.into(),
        RsaSigner::from_file(&files.path("device.key"))?,
    );
    let base = format!("https://127.0.0.1:{}", lab.proxy.addr.port());
    let now = authinfod::units::unix_now;
    let call = |method: &str, path: &str, body: &[u8], timestamp: i64, nonce: Option<&str>| {
        let authorization = match nonce {
            Some(n) => signer.authorize_with_nonce(method, path, timestamp, n, body),
            None => signer.authorize(method, path, timestamp, body),
        };
        let request = (|| -> Result<reqwest::RequestBuilder, Error> {
            let mut request = http
                .request(method.parse()?, format!("{base}{path}"))
                .header("Authorization", authorization?)
                .header("Accept", "application/json");
            if !body.is_empty() {
                request = request
                    .header("Content-Type", "application/json")
                    .body(body.to_vec());
            }
            Ok(request)
        })();
        async move {
            Captured::from(
                request?.send().await?,
                &["Date", "Retry-After", "Allow", "Content-Type"],
            )
            .await
        }
    };
    let raw = |r: &str| serde_json::to_vec(&serde_json::json!({ "raw_data": r }));
    let nonce = crypto::nonce()?;
    let mut captured: Vec<(String, Captured)> = vec![
        (
            "authinfo-200",
            call("POST", "/v1/authinfo", &raw("RAW-1")?, now(), None).await?,
        ),
        (
            "inspection-200",
            call("GET", "/v1/inspection", b"", now(), None).await?,
        ),
        (
            "alipay-binding-200",
            call("GET", "/v1/alipay-binding", b"", now(), None).await?,
        ),
        (
            "licence-200",
            call("GET", "/v1/licence", b"", now(), None).await?,
        ),
        (
            "rejected-raw-data",
            call(
                "POST",
                "/v1/authinfo",
                &raw("REJECTED-RAW-DATA")?,
                now(),
                None,
            )
            .await?,
        ),
        (
            "timestamp-skew",
            call("GET", "/v1/licence", b"", now() - 1000, None).await?,
        ),
        (
            "first-of-a-replay",
            call("GET", "/v1/licence", b"", now(), Some(&nonce)).await?,
        ),
        (
            "replayed-nonce",
            call("GET", "/v1/licence", b"", now(), Some(&nonce)).await?,
        ),
        (
            "method-not-allowed",
            call("GET", "/v1/authinfo", b"", now(), None).await?,
        ),
        (
            "not-found",
            call("GET", "/v1/nope", b"", now(), None).await?,
        ),
        (
            "bad-request",
            call("POST", "/v1/authinfo", b"{\"raw\":1}", now(), None).await?,
        ),
        (
            "body-too-large",
            call(
                "POST",
                "/v1/authinfo",
                &raw(&"R".repeat(70_000))?,
                now(),
                None,
            )
            .await?,
        ),
    ]
    .into_iter()
    .map(|(name, answer)| (name.to_owned(), answer))
    .collect();
    let unsigned = http.get(format!("{base}/v1/licence")).send().await?;
    captured.push((
        "bad-authorization".to_owned(),
        Captured::from(unsigned, &["Date", "Content-Type"]).await?,
    ));
    for (name, fault) in faults(&["500", "429", "bad-signature", "malformed"]) {
        lab.sandbox.state.faults.set(Platform::WechatPay, fault);
        let answer = call("POST", "/v1/authinfo", &raw("RAW-1")?, now(), None).await?;
        captured.push((format!("upstream-{name}"), answer));
        lab.sandbox.state.faults.clear(Platform::WechatPay);
    }
    for (name, answer) in captured {
        seeds.put("proxy_request", &format!("{name}.txt"), &answer.framed())?;
    }
    for (name, body) in [
        ("request-raw-data", raw("RAW-FROM-getWxpayfaceRawdata")?),
        (
            "request-duplicate",
            br#"{"raw_data":"A","raw_data":"B"}"#.to_vec(),
        ),
        ("request-extra-field", br#"{"raw_data":"A","x":1}"#.to_vec()),
        ("request-blank", br#"{"raw_data":" \t"}"#.to_vec()),
    ] {
        seeds.put(
            "proxy_request",
            &format!("{name}.txt"),
            &frame("200", &[], &body),
        )?;
    }
    Ok(())
}

// === the daemon's store ===

async fn store(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    use authinfod::terminal::{Daemon, RunOptions, config};
    let config = config::load(&lab.daemon_config)?;
    let state_dir = config.state_dir.clone();
    let daemon = Daemon::start(config, RunOptions::default()).await?;
    let state = daemon.state();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let running = tokio::spawn(daemon.run(async move { token.cancelled().await }));
    state.accept_raw_data("RAW-1".into())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let fetched = |state: &authinfod::terminal::state::State| {
        use authinfod::terminal::doc::CheckState;
        let device = state.health().doc(state.now());
        state.current().is_some()
            && [
                device.inspection.state,
                device.alipay_binding.state,
                device.licence.state,
            ]
            .iter()
            .all(|s| *s == CheckState::Ok)
    };
    while !fetched(&state) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second refresh, so the previous authinfo is stored too.
    let seq = state.request_refresh();
    let _ = tokio::time::timeout(Duration::from_secs(60), state.wait_completion(seq)).await;
    shutdown.cancel();
    running.await?;
    drop(state);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = sled::open(state_dir.join("store"))?;
    for item in db.iter() {
        let (key, value) = item?;
        let key = String::from_utf8_lossy(&key).into_owned();
        if key == "schema" {
            continue;
        }
        seeds.put(
            "store_records",
            &format!("{key}.txt"),
            &frame(&key, &[], &value),
        )?;
    }
    for (key, text) in [
        (
            "authinfo.current",
            r#"{"authinfo":"A","fetched_at":-9223372036854775808,"expires_at":9223372036854775807}"#,
        ),
        (
            "authinfo.current",
            r#"{"authinfo":"A","fetched_at":1,"expires_at":2,"expires_in":18446744073709551615}"#,
        ),
        (
            "attempt.last",
            r#"{"at":0,"ok":false,"code":"PROXY_UNREACHABLE","error":"cannot reach the proxy","permanent":false}"#,
        ),
        (
            "health.licence",
            r#"{"value":{"device_id":"wd.x","begin_day":"2025-01-01","expired_day":"2026-01-01"},"fetched_at":1}"#,
        ),
    ] {
        let name = format!("{key}-edge-{}.txt", text.len());
        seeds.put("store_records", &name, &frame(key, &[], text.as_bytes()))?;
    }
    Ok(())
}

// === the socket API ===

fn socket(seeds: &mut Seeds) -> Result<(), Error> {
    /// A file name, the request line, headers, the body.
    type Request<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a [u8]);
    let requests: &[Request<'_>] = &[
        ("authinfo", "GET /v1/authinfo", &[], b""),
        (
            "authinfo-long-poll",
            "GET /v1/authinfo?wait=60",
            &[("If-None-Match", "\"3f0c8a\"")],
            b"",
        ),
        (
            "authinfo-star",
            "GET /v1/authinfo?wait=300",
            &[("If-None-Match", "*")],
            b"",
        ),
        (
            "authinfo-weak-list",
            "GET /v1/authinfo",
            &[("If-None-Match", "\"x\", W/\"y\"")],
            b"",
        ),
        ("authinfo-bad-wait", "GET /v1/authinfo?wait=abc", &[], b""),
        (
            "authinfo-wait-too-long",
            "GET /v1/authinfo?wait=301",
            &[],
            b"",
        ),
        (
            "raw-data",
            "PUT /v1/raw-data",
            &[("Content-Type", "application/json")],
            br#"{"raw_data":"<from getWxpayfaceRawdata>"}"#,
        ),
        (
            "raw-data-blank",
            "PUT /v1/raw-data",
            &[],
            br#"{"raw_data":"  "}"#,
        ),
        (
            "raw-data-wrong-field",
            "PUT /v1/raw-data",
            &[],
            br#"{"raw":1}"#,
        ),
        ("refresh", "POST /v1/refresh", &[], b""),
        ("refresh-wait", "POST /v1/refresh?wait=true", &[], b""),
        ("refresh-bad-wait", "POST /v1/refresh?wait=maybe", &[], b""),
        ("status", "GET /v1/status", &[], b""),
        ("device", "GET /v1/device", &[], b""),
        ("healthz", "GET /healthz", &[], b""),
        ("metrics", "GET /metrics", &[], b""),
        ("not-found", "GET /nope", &[], b""),
        ("method-not-allowed", "DELETE /v1/authinfo", &[], b""),
        ("odd-method", "BREW /v1/status", &[], b""),
    ];
    for (name, line, headers, body) in requests {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        seeds.put(
            "socket_api",
            &format!("{name}.txt"),
            &frame(line, &headers, body),
        )?;
    }
    Ok(())
}

// === device authorization ===

fn device_auth(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    let signer = DeviceSigner::new(
        lab::DEVICE_ID.into(),
        RsaSigner::from_file(&lab.files.path("device.key"))?,
    );
    let now = authinfod::units::unix_now();
    let body = br#"{"raw_data":"RAW-1"}"#;
    for (name, method, path, body) in [
        ("authinfo", "POST", "/v1/authinfo", &body[..]),
        ("licence", "GET", "/v1/licence", b""),
    ] {
        let header = signer.authorize(method, path, now, body)?;
        seeds.put("auth_header", &format!("{name}.txt"), header.as_bytes())?;
        let nonce = crypto::nonce()?;
        let signed = signing_string(method, path, now, &nonce, body);
        seeds.put(
            "signing_string",
            &format!("{name}.txt"),
            &signed[..signed.len() - 1],
        )?;
    }
    seeds.put(
        "auth_header",
        "reordered.txt",
        b"AUTHINFOD-SHA256-RSA2048 signature=\"c2ln\", nonce=\"ABCDEFGHIJKLMNOP\",timestamp=\"10\", device_id=\"d1\"",
    )?;
    seeds.put(
        "auth_header",
        "params-only.txt",
        b"device_id=\"T-1001\",timestamp=\"1763000000\",nonce=\"0123456789ABCDEF\",signature=\"AA==\"",
    )?;
    for (name, target) in [
        ("wechat-devices", "/v3/iotmanage/devices?offset=0&limit=100"),
        (
            "wechat-inspection",
            "/v3/iotmanage/device-inspections/SANDBOX0000001001",
        ),
        (
            "wechat-encoded",
            "/v3/iotmanage/device-inspections/A%20B%2FC",
        ),
    ] {
        let signed = signing_string("GET", target, now, "5K8264ILTKCH16CQ2502SI8ZNMTM67VS", b"");
        seeds.put(
            "signing_string",
            &format!("{name}.txt"),
            &signed[..signed.len() - 1],
        )?;
    }
    Ok(())
}

// === configs ===

fn configs(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let fixture_ca = format!("{}/proxy-ca.pem", authinfod_fuzz::FIXTURES);
    let example = std::fs::read_to_string(examples.join("authinfod.toml"))?
        .replace("/etc/authinfod/proxy-ca.pem", &fixture_ca);
    seeds.put("daemon_config", "example.toml", example.as_bytes())?;
    let lab_config = std::fs::read_to_string(&lab.daemon_config)?.replace(
        &lab.files.path("proxy-ca.pem").display().to_string(),
        &fixture_ca,
    );
    seeds.put("daemon_config", "lab.toml", lab_config.as_bytes())?;
    let minimal = format!(
        "device_id = \"T-1\"\nkey_file = \"/var/lib/authinfod/device.key\"\n\n[proxy]\nurl = \"https://proxy.example:8443/\"\nca_file = \"{fixture_ca}\"\n\n[refresh]\ninterval = \"1h30m\"\nbackoff_min = \"250ms\"\nbackoff_max = \"5m\"\njitter = 0.5\nraw_data_command = [\"/usr/bin/faceapp-rawdata\", \"--json\"]\n\n[socket]\npath = \"@authinfod\"\nmode = \"0600\"\nallowed_uids = [0, \"root\"]\nallowed_gids = [\"root\"]\nmax_connections = 4096\n\n[health]\ninterval = \"1d\"\nlicence = false\n"
    );
    seeds.put("daemon_config", "minimal.toml", minimal.as_bytes())?;
    seeds.put(
        "daemon_config",
        "readme-bad.toml",
        b"device_id = \"T-1\"\nkey_file = \"relative.key\"\n[proxy]\nurl = \"http://proxy.example\"\nca_file = \"/nonexistent/ca.pem\"\ntimeout = \"0s\"\n[socket]\nmode = \"0666\"\n[refresh]\nbackoff_min = \"10m\"\nbackoff_max = \"5m\"\njitter = 2.0\nextra = 1\n",
    )?;
    let proxy_example = std::fs::read_to_string(examples.join("authinfo-proxy.toml"))?;
    let devices_example = std::fs::read_to_string(examples.join("devices.toml"))?;
    seeds.put(
        "proxy_config",
        "example.toml",
        format!("{proxy_example}\n%%registry%%\n{devices_example}").as_bytes(),
    )?;
    let proxy_lab = std::fs::read_to_string(&lab.proxy_config)?;
    let devices_lab = std::fs::read_to_string(lab.files.path("devices.toml"))?;
    seeds.put(
        "proxy_config",
        "lab.toml",
        format!("{proxy_lab}\n%%registry%%\n{devices_lab}").as_bytes(),
    )?;
    Ok(())
}

// === PEM ===

fn pem(seeds: &mut Seeds, lab: &Lab) -> Result<(), Error> {
    for name in [
        "proxy-ca.pem",
        "proxy-tls.crt",
        "sandbox-ca.pem",
        "wechatpay-public.pem",
        "alipay-public.pem",
    ] {
        let text = std::fs::read(lab.files.path(name))?;
        seeds.put("pem", name, &text)?;
    }
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(lab.files.path("proxy-tls.crt"))?,
        std::fs::read_to_string(lab.files.path("proxy-ca.pem"))?
    );
    seeds.put("pem", "chain.pem", chain.as_bytes())?;
    // A WeChat Pay platform certificate: RSA, as WeChat Pay issues them.
    let rsa = crypto::generate_rsa_key(2048)?;
    let key =
        rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&rsa.private_pem, &rcgen::PKCS_RSA_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[
        0x00, 0x5E, 0x76, 0x04, 0x4B, 0x4B, 0x9C, 0x6A, 0x0B, 0xD3,
    ]));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tenpay.com Root CA");
    let cert = params.self_signed(&key)?;
    seeds.put("pem", "platform-certificate.pem", cert.pem().as_bytes())?;
    seeds.put(
        "pem",
        "rsa-public-pkcs8.pem",
        rsa.public.to_pem().as_bytes(),
    )?;
    Ok(())
}
