//! Alipay OpenAPI gateway client for `alipay.merchant.iot.device.query` (RSA2, public-key mode).
//!
//! Owns: the gateway's common request parameters, the RSA2 sign content (every parameter but
//! `sign`, sorted by key, empty values skipped, `k=v` joined with `&`, raw values), the form
//! POST, verification of the answer over the raw JSON text of the response object exactly as
//! received, and the mapping of gateway errors to [`Failure`]. It must not re-serialise an
//! answer before verifying it, must not sign with anything but [`Signer`] (ring, or a PKCS#11
//! token), and must not log keys, signatures or the app auth token. Certificate mode
//! (`alipay_cert_sn`) is not supported: the merchant configures the Alipay public key.

use std::fmt;
use std::time::Duration;

use percent_encoding::utf8_percent_encode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::macros::{format_description, offset};

use crate::crypto::{CryptoError, RsaVerifier, Signer};
use crate::platform::{Failure, FailureClass};

/// The production gateway.
pub const DEFAULT_GATEWAY: &str = "https://openapi.alipay.com/gateway.do";
/// The one method this client calls.
pub const DEVICE_QUERY_METHOD: &str = "alipay.merchant.iot.device.query";
/// The key the method's answer object sits under.
pub const DEVICE_QUERY_RESPONSE_KEY: &str = "alipay_merchant_iot_device_query_response";
/// `code` of a successful call.
pub const SUCCESS_CODE: &str = "10000";
/// `Content-Type` of a gateway request.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded;charset=utf-8";

/// The business fields of `alipay.merchant.iot.device.query`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBinding {
    /// `direct` or `indirect`.
    pub merchant_type: String,
    pub pid: String,
    pub shop_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smid: Option<String>,
}

/// How the device is named in the query (`device_id_type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceQuery {
    /// `ID`: the device's `biz_tid` (recommended by Alipay).
    Id { biz_tid: String },
    /// `SN`: supplier id and serial number together.
    Sn {
        supplier_id: String,
        device_sn: String,
    },
}

impl DeviceQuery {
    /// The `biz_content` JSON of the query.
    pub fn biz_content(&self) -> String {
        let value = match self {
            Self::Id { biz_tid } => serde_json::json!({
                "device_id_type": "ID",
                "biz_tid": biz_tid,
            }),
            Self::Sn {
                supplier_id,
                device_sn,
            } => serde_json::json!({
                "device_id_type": "SN",
                "supplier_id": supplier_id,
                "device_sn": device_sn,
            }),
        };
        value.to_string()
    }
}

/// Errors of an Alipay gateway call.
#[derive(Debug, thiserror::Error)]
pub enum AlipayError {
    #[error("cannot sign the alipay request")]
    Sign(#[source] CryptoError),
    #[error("alipay gateway {gateway} did not answer")]
    Transport {
        gateway: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("alipay gateway answered http {status}")]
    Http {
        status: u16,
        trace_id: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("alipay refused the call: {code} {msg}{}", sub_suffix(.sub_code, .sub_msg))]
    Gateway {
        code: String,
        msg: String,
        sub_code: Option<String>,
        sub_msg: Option<String>,
        trace_id: Option<String>,
    },
    #[error(
        "alipay's answer does not carry a valid signature: {reason}{}",
        .unverified.as_deref().map(|c| format!(" (unverified, it says {c})")).unwrap_or_default()
    )]
    BadSignature {
        reason: &'static str,
        /// What an unsigned answer claims (`code` and `sub_code`, letters, digits and `._-`
        /// only), for the operator to read; never acted on.
        unverified: Option<String>,
        trace_id: Option<String>,
    },
    #[error("alipay's answer is not of the documented shape: {reason}")]
    Malformed {
        reason: String,
        trace_id: Option<String>,
    },
}

fn sub_suffix(sub_code: &Option<String>, sub_msg: &Option<String>) -> String {
    match (sub_code, sub_msg) {
        (Some(c), Some(m)) => format!(" ({c}: {m})"),
        (Some(c), None) => format!(" ({c})"),
        (None, Some(m)) => format!(" ({m})"),
        (None, None) => String::new(),
    }
}

impl AlipayError {
    /// What the proxy needs to know of this failure.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Sign(err) => Failure::local(FailureClass::Transport, err.to_string()),
            Self::Transport { .. } => Failure::local(FailureClass::Transport, self.to_string()),
            Self::Http {
                status,
                trace_id,
                retry_after,
            } => Failure {
                class: match status {
                    429 => FailureClass::RateLimited,
                    500.. => FailureClass::ServerError,
                    _ => FailureClass::Rejected,
                },
                status: *status,
                code: None,
                message: Some(self.to_string()),
                request_id: trace_id.clone(),
                retry_after: *retry_after,
            },
            Self::Gateway {
                code,
                msg,
                sub_code,
                sub_msg,
                trace_id,
            } => Failure {
                class: gateway_class(code, sub_code.as_deref()),
                status: 200,
                code: Some(sub_code.clone().unwrap_or_else(|| code.clone())),
                message: Some(sub_msg.clone().unwrap_or_else(|| msg.clone())),
                request_id: trace_id.clone(),
                retry_after: None,
            },
            Self::BadSignature { trace_id, .. } => Failure {
                request_id: trace_id.clone(),
                status: 200,
                ..Failure::local(FailureClass::BadSignature, self.to_string())
            },
            Self::Malformed { trace_id, .. } => Failure {
                request_id: trace_id.clone(),
                status: 200,
                ..Failure::local(FailureClass::Malformed, self.to_string())
            },
        }
    }
}

/// Classifies a gateway error by its code and sub_code (compared case-insensitively: the
/// gateway writes `isv.invalid-signature` and `DEVICE_NOT_EXIST` alike).
///
/// - `20000` (service unavailable), `isp.*`, `aop.unknow-error` and any `*SYSTEM_ERROR`
///   (`SYSTEM_ERROR`, `ACQ.SYSTEM_ERROR`): the platform is busy, retry.
/// - `40005` (call limited), `isv.app-call-limited`, `isv.method-call-limited`: back off.
/// - anything else (`20001` token, `40001` missing, `40002` invalid arguments including
///   `isv.invalid-signature`, `40004` business failures such as `DEVICE_NOT_EXIST`,
///   `RECORD_NOT_EXIST`, `ACCESS_DENIED`, `INVALID_PARAMETER`, `40006` permissions): refused.
fn gateway_class(code: &str, sub_code: Option<&str>) -> FailureClass {
    let sub = sub_code.unwrap_or_default().to_ascii_lowercase();
    if code == "20000"
        || sub.starts_with("isp.")
        || sub == "aop.unknow-error"
        || sub.ends_with("system_error")
    {
        FailureClass::ServerError
    } else if code == "40005" || sub.ends_with("-call-limited") {
        FailureClass::RateLimited
    } else {
        FailureClass::Rejected
    }
}

// === signing ===

/// The RSA2 sign content of `params`: every parameter but `sign`, with a non-empty value,
/// sorted by key, as `k=v` joined with `&`, values raw (not URL-encoded).
pub fn sign_content<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut kept: Vec<(&str, &str)> = params
        .into_iter()
        .filter(|(k, v)| *k != "sign" && !v.is_empty())
        .collect();
    kept.sort_unstable();
    kept.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// `yyyy-MM-dd HH:mm:ss` in Beijing time (UTC+8), the gateway's `timestamp`.
pub fn gateway_timestamp(at: OffsetDateTime) -> String {
    let fmt = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    // The description has only numeric components that every date in the supported
    // range (years 1..=9999) formats; `time` fails only on out-of-range years.
    at.to_offset(offset!(+8)).format(&fmt).unwrap_or_default()
}

/// Form-encodes `params` for the request body.
fn form_body(params: &[(&str, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, super::RFC3986),
                utf8_percent_encode(v, super::RFC3986)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

// === verification ===

/// The gateway's answer envelope, with the response objects kept as the exact text received.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, rename = "alipay_merchant_iot_device_query_response")]
    response: Option<&'a RawValue>,
    #[serde(borrow)]
    error_response: Option<&'a RawValue>,
    sign: Option<String>,
}

/// The common fields every response object carries.
#[derive(Deserialize)]
struct Common {
    code: String,
    #[serde(default)]
    msg: String,
    sub_code: Option<String>,
    sub_msg: Option<String>,
}

/// The parts of an answer body the signature check needs: the exact text of the response object
/// (`alipay_merchant_iot_device_query_response`, or `error_response` when that is absent) as
/// received, and the `sign` beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedText<'a> {
    /// The response object's JSON text, byte for byte as in the body.
    pub object: &'a str,
    /// `sign`, when the answer carries one.
    pub sign: Option<String>,
}

/// Finds the response object and its `sign` in an answer body without re-serialising
/// anything. The error is the reason the body is not the gateway's shape.
pub fn signed_text(body: &str) -> Result<SignedText<'_>, String> {
    let envelope: Envelope<'_> =
        crate::json::from_str(body).map_err(|e| format!("not the gateway's JSON: {e}"))?;
    let object = envelope
        .response
        .or(envelope.error_response)
        .ok_or_else(|| {
            format!("neither {DEVICE_QUERY_RESPONSE_KEY} nor error_response in the answer")
        })?;
    Ok(SignedText {
        object: object.get(),
        sign: envelope.sign,
    })
}

/// Verifies and reads an answer body. The signature is checked over the exact text of the
/// response object (`alipay_merchant_iot_device_query_response`, or `error_response`), and every
/// answer must carry a valid one, errors included: an unsigned refusal is not trusted to be
/// Alipay's, so it is a [`AlipayError::BadSignature`] (retryable), never a permanent rejection.
/// This is what alipay-sdk-python does (`DefaultAlipayClient.__parse_response` raises when the
/// answer has no `sign`, and verifies `error_response` like any other); the Java SDK's
/// `checkResponseSign` lets an unsigned error through, which is what this client did before.
/// What an unsigned answer claims is kept, sanitised, in the error for the operator.
pub fn read_answer(
    body: &str,
    alipay_public: &RsaVerifier,
    trace_id: Option<String>,
) -> Result<DeviceBinding, AlipayError> {
    let text = signed_text(body).map_err(|reason| AlipayError::Malformed {
        reason,
        trace_id: trace_id.clone(),
    })?;
    match text.sign.as_deref() {
        Some(sign) if alipay_public.verify_base64(text.object.as_bytes(), sign) => {}
        Some(_) => {
            return Err(AlipayError::BadSignature {
                reason: "the sign does not verify with the alipay public key",
                unverified: None,
                trace_id,
            });
        }
        None => {
            return Err(AlipayError::BadSignature {
                reason: "the answer has no sign",
                unverified: crate::json::from_str::<Common>(text.object)
                    .ok()
                    .map(|c| unverified_claim(&c)),
                trace_id,
            });
        }
    }
    read_object(text.object, trace_id)
}

/// Reads a response object's text once its signature has been checked: a gateway error as
/// [`AlipayError::Gateway`], a success as its binding.
pub fn read_object(object: &str, trace_id: Option<String>) -> Result<DeviceBinding, AlipayError> {
    let malformed = |reason: String| AlipayError::Malformed {
        reason,
        trace_id: trace_id.clone(),
    };
    let common: Common = crate::json::from_str(object)
        .map_err(|e| malformed(format!("response object without code: {e}")))?;
    if common.code != SUCCESS_CODE {
        return Err(AlipayError::Gateway {
            code: common.code,
            msg: common.msg,
            sub_code: common.sub_code,
            sub_msg: common.sub_msg,
            trace_id,
        });
    }
    crate::json::from_str(object).map_err(|e| malformed(format!("no device binding: {e}")))
}

/// `code` and `sub_code` of an unverified answer, cut to 64 characters each of letters, digits
/// and `._-`: enough to read `40002 isv.invalid-app-id`, too little to carry anything else into
/// logs.
fn unverified_claim(common: &Common) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .take(64)
            .collect()
    };
    match &common.sub_code {
        Some(sub) => format!("{} {}", clean(&common.code), clean(sub)),
        None => clean(&common.code),
    }
}

// === impl AlipayClient ===

/// A client of the Alipay gateway for one app.
pub struct AlipayClient {
    gateway: String,
    app_id: String,
    app_key: Signer,
    alipay_public: RsaVerifier,
    app_auth_token: Option<String>,
    http: reqwest::Client,
}

impl fmt::Debug for AlipayClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlipayClient")
            .field("gateway", &self.gateway)
            .field("app_id", &self.app_id)
            .field("alipay_public", &self.alipay_public)
            .field(
                "app_auth_token",
                &self.app_auth_token.as_ref().map(|_| "<set>"),
            )
            .finish_non_exhaustive()
    }
}

impl AlipayClient {
    /// A client calling `gateway` (normally [`DEFAULT_GATEWAY`]) as `app_id`, signing with the
    /// app key and verifying answers with the Alipay public key. `http` comes from
    /// [`crate::platform::http_client`].
    pub fn new(
        gateway: impl Into<String>,
        app_id: impl Into<String>,
        app_key: impl Into<Signer>,
        alipay_public: RsaVerifier,
        http: reqwest::Client,
    ) -> Self {
        Self {
            gateway: gateway.into(),
            app_id: app_id.into(),
            app_key: app_key.into(),
            alipay_public,
            app_auth_token: None,
            http,
        }
    }

    /// Calls on behalf of a merchant that authorised this app (third-party mode).
    pub fn with_app_auth_token(mut self, token: impl Into<String>) -> Self {
        self.app_auth_token = Some(token.into()).filter(|t| !t.is_empty());
        self
    }

    /// The signed request parameters of `query` at `now`, `sign` last.
    pub fn signed_params(
        &self,
        query: &DeviceQuery,
        now: OffsetDateTime,
    ) -> Result<Vec<(&'static str, String)>, AlipayError> {
        let mut params = vec![
            ("app_id", self.app_id.clone()),
            ("method", DEVICE_QUERY_METHOD.to_owned()),
            // As both official SDKs send it (`AlipayConstants.FORMAT_JSON`, `_format = 'json'`).
            ("format", "json".to_owned()),
            ("charset", "utf-8".to_owned()),
            ("sign_type", "RSA2".to_owned()),
            ("timestamp", gateway_timestamp(now)),
            ("version", "1.0".to_owned()),
            ("biz_content", query.biz_content()),
        ];
        if let Some(token) = &self.app_auth_token {
            params.push(("app_auth_token", token.clone()));
        }
        let content = sign_content(params.iter().map(|(k, v)| (*k, v.as_str())));
        let sign = self
            .app_key
            .sign_base64(content.as_bytes())
            .map_err(AlipayError::Sign)?;
        params.push(("sign", sign));
        Ok(params)
    }

    /// The binding of the device named by `query`.
    pub async fn device_query(&self, query: &DeviceQuery) -> Result<DeviceBinding, AlipayError> {
        self.device_query_at(query, OffsetDateTime::now_utc()).await
    }

    /// [`device_query`](Self::device_query) with the request timestamp given.
    pub async fn device_query_at(
        &self,
        query: &DeviceQuery,
        now: OffsetDateTime,
    ) -> Result<DeviceBinding, AlipayError> {
        let params = self.signed_params(query, now)?;
        let transport = |source| AlipayError::Transport {
            gateway: self.gateway.clone(),
            source,
        };
        let response = self
            .http
            .post(&self.gateway)
            .header(reqwest::header::CONTENT_TYPE, FORM_CONTENT_TYPE)
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form_body(&params))
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        let trace_id = trace_id(response.headers());
        let retry_after = crate::platform::retry_after(response.headers());
        let body = response.bytes().await.map_err(transport)?;
        tracing::debug!(
            method = DEVICE_QUERY_METHOD,
            upstream_status = status,
            trace_id = trace_id.as_deref().unwrap_or(""),
            "alipay answered"
        );
        if status != 200 {
            return Err(AlipayError::Http {
                status,
                trace_id,
                retry_after,
            });
        }
        let body = std::str::from_utf8(&body).map_err(|_| AlipayError::Malformed {
            reason: "the body is not UTF-8".to_owned(),
            trace_id: trace_id.clone(),
        })?;
        read_answer(body, &self.alipay_public, trace_id).map_err(|err| self.redact(err))
    }

    /// Takes the app auth token out of a gateway error: on `isv.invalid-signature` the gateway
    /// echoes its whole sign content, token included, in `sub_msg`.
    fn redact(&self, mut err: AlipayError) -> AlipayError {
        if let (
            Some(token),
            AlipayError::Gateway {
                sub_msg: Some(m), ..
            },
        ) = (&self.app_auth_token, &mut err)
        {
            *m = m.replace(token.as_str(), "<app_auth_token>");
        }
        err
    }
}

/// The gateway's trace id, from its `trace_id` header (or `alipay-trace-id`).
fn trace_id(headers: &reqwest::header::HeaderMap) -> Option<String> {
    ["trace_id", "alipay-trace-id"]
        .iter()
        .find_map(|name| headers.get(*name)?.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::GeneratedKey;
    use base64::Engine as _;

    fn key(n: usize) -> &'static GeneratedKey {
        crate::crypto::test_key(n)
    }

    fn signer(n: usize) -> crate::crypto::RsaSigner {
        crate::crypto::RsaSigner::from_pem(&key(n).private_pem, "test key").expect("parse")
    }

    fn http() -> reqwest::Client {
        let tls = crate::tls::client_config_webpki(None, "roots").expect("tls");
        crate::platform::http_client(tls, crate::platform::DEFAULT_TIMEOUT).expect("http")
    }

    fn client(token: Option<&str>) -> AlipayClient {
        let c = AlipayClient::new(
            DEFAULT_GATEWAY,
            "2021000000000001",
            signer(0),
            key(1).public.clone(),
            http(),
        );
        match token {
            Some(t) => c.with_app_auth_token(t),
            None => c,
        }
    }

    #[test]
    fn sign_content_sorts_skips_empty_and_excludes_sign() {
        let content = sign_content([
            ("timestamp", "2014-07-24 03:07:50"),
            ("sign", "should-not-appear"),
            ("app_id", "2014072300007148"),
            ("app_auth_token", ""),
            (
                "biz_content",
                r#"{"device_id_type":"SN","device_sn":"a b&c"}"#,
            ),
            ("method", "alipay.merchant.iot.device.query"),
        ]);
        assert_eq!(
            content,
            "app_id=2014072300007148&biz_content={\"device_id_type\":\"SN\",\"device_sn\":\"a b&c\"}\
             &method=alipay.merchant.iot.device.query&timestamp=2014-07-24 03:07:50"
        );
    }

    #[test]
    fn biz_content_names_the_device_as_alipay_spells_it() {
        let id: serde_json::Value = serde_json::from_str(
            &DeviceQuery::Id {
                biz_tid: "0101".into(),
            }
            .biz_content(),
        )
        .expect("json");
        assert_eq!(
            id,
            serde_json::json!({"device_id_type": "ID", "biz_tid": "0101"})
        );
        let sn: serde_json::Value = serde_json::from_str(
            &DeviceQuery::Sn {
                supplier_id: "2018".into(),
                device_sn: "QCF4".into(),
            }
            .biz_content(),
        )
        .expect("json");
        assert_eq!(
            sn,
            serde_json::json!({"device_id_type": "SN", "supplier_id": "2018", "device_sn": "QCF4"})
        );
    }

    #[test]
    fn timestamp_is_beijing_time() {
        let at = time::macros::datetime!(2024-12-31 20:30:05 UTC);
        assert_eq!(gateway_timestamp(at), "2025-01-01 04:30:05");
    }

    #[test]
    fn signed_params_carry_the_common_parameters_and_a_verifiable_sign() {
        let now = time::macros::datetime!(2024-03-01 00:00:00 UTC);
        let query = DeviceQuery::Id {
            biz_tid: "tid-1".into(),
        };
        let params = client(Some("token-1"))
            .signed_params(&query, now)
            .expect("sign");
        let get = |k: &str| {
            params
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        assert_eq!(get("sign_type"), "RSA2");
        assert_eq!(get("format"), "json");
        assert_eq!(get("charset"), "utf-8");
        assert_eq!(get("version"), "1.0");
        assert_eq!(get("timestamp"), "2024-03-01 08:00:00");
        assert_eq!(get("app_auth_token"), "token-1");
        let content = sign_content(params.iter().map(|(k, v)| (*k, v.as_str())));
        assert!(
            content.contains("app_auth_token=token-1&app_id="),
            "{content}"
        );
        assert!(key(0).public.verify_base64(content.as_bytes(), get("sign")));
        let without = client(None).signed_params(&query, now).expect("sign");
        assert!(without.iter().all(|(k, _)| *k != "app_auth_token"));
    }

    /// PKCS#1 v1.5 is deterministic: OpenSSL must produce the very same RSA2 signature.
    #[test]
    fn rsa2_signature_matches_openssl() {
        let params = client(None)
            .signed_params(
                &DeviceQuery::Sn {
                    supplier_id: "201812271300540049".into(),
                    device_sn: "QCF420190316000107".into(),
                },
                OffsetDateTime::now_utc(),
            )
            .expect("sign");
        let content = sign_content(params.iter().map(|(k, v)| (*k, v.as_str())));
        let ours = &params.last().expect("sign").1;
        assert_eq!(params.last().expect("sign").0, "sign");
        assert_eq!(
            *ours,
            crate::crypto::BASE64.encode(crate::crypto::openssl_sign(
                &key(0).private_pem,
                content.as_bytes()
            ))
        );
    }

    #[test]
    fn form_body_url_encodes_values() {
        let body = form_body(&[("biz_content", r#"{"a":"b c+d&e"}"#.to_owned())]);
        assert_eq!(body, "biz_content=%7B%22a%22%3A%22b%20c%2Bd%26e%22%7D");
    }

    /// An answer as the gateway writes it: `object_text` signed with key `n`.
    fn answer(object_text: &str, signed_by: usize) -> String {
        let sign = signer(signed_by)
            .sign_base64(object_text.as_bytes())
            .expect("sign");
        format!(r#"{{"{DEVICE_QUERY_RESPONSE_KEY}":{object_text},"sign":"{sign}"}}"#)
    }

    const SUCCESS: &str = r#"{"code":"10000","msg":"Success","merchant_type":"indirect","pid":"2088101112139885","smid":"2088101112139886","shop_id":"2020081700502012300038796029"}"#;

    #[test]
    fn answer_verifies_over_the_exact_text() {
        let binding = read_answer(&answer(SUCCESS, 1), &key(1).public, None).expect("verified");
        assert_eq!(binding.pid, "2088101112139885");
        assert_eq!(binding.smid.as_deref(), Some("2088101112139886"));
        // Whitespace around the object and a sign placed first do not change the object text.
        let sign = signer(1).sign_base64(SUCCESS.as_bytes()).expect("sign");
        let spaced =
            format!("{{ \"sign\" : \"{sign}\",\n  \"{DEVICE_QUERY_RESPONSE_KEY}\" :  {SUCCESS} }}");
        read_answer(&spaced, &key(1).public, None).expect("verified");
    }

    #[test]
    fn answer_reserialised_after_signing_is_refused() {
        let sign = signer(1).sign_base64(SUCCESS.as_bytes()).expect("sign");
        let value: serde_json::Value = serde_json::from_str(SUCCESS).expect("json");
        // Re-spaced: the same JSON value, other text.
        let pretty = serde_json::to_string_pretty(&value).expect("pretty");
        // Re-ordered: serde_json's map sorts keys.
        let reordered = value.to_string();
        assert_ne!(reordered, SUCCESS);
        for text in [pretty, reordered] {
            let body = format!(r#"{{"{DEVICE_QUERY_RESPONSE_KEY}":{text},"sign":"{sign}"}}"#);
            let err = read_answer(&body, &key(1).public, None).expect_err("the call must fail");
            assert!(matches!(err, AlipayError::BadSignature { .. }), "{err}");
            assert_eq!(err.failure().class, FailureClass::BadSignature);
        }
    }

    #[test]
    fn answer_signed_with_another_key_is_refused() {
        let err =
            read_answer(&answer(SUCCESS, 0), &key(1).public, None).expect_err("the call must fail");
        assert_eq!(err.failure().class, FailureClass::BadSignature);
    }

    #[test]
    fn success_without_sign_is_refused() {
        let body = format!(r#"{{"{DEVICE_QUERY_RESPONSE_KEY}":{SUCCESS}}}"#);
        let err = read_answer(&body, &key(1).public, None).expect_err("the call must fail");
        assert!(matches!(err, AlipayError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn business_failure_carries_codes_and_is_rejected() {
        let text = r#"{"code":"40004","msg":"Business Failed","sub_code":"DEVICE_NOT_EXIST","sub_msg":"设备不存在"}"#;
        let err = read_answer(&answer(text, 1), &key(1).public, Some("trace-9".into()))
            .expect_err("the call must fail");
        let AlipayError::Gateway {
            code,
            sub_code,
            sub_msg,
            trace_id,
            ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(code, "40004");
        assert_eq!(sub_code.as_deref(), Some("DEVICE_NOT_EXIST"));
        assert_eq!(sub_msg.as_deref(), Some("设备不存在"));
        assert_eq!(trace_id.as_deref(), Some("trace-9"));
        let failure = err.failure();
        assert_eq!(failure.class, FailureClass::Rejected);
        assert!(!failure.retryable());
        assert_eq!(failure.code.as_deref(), Some("DEVICE_NOT_EXIST"));
        assert_eq!(failure.request_id.as_deref(), Some("trace-9"));
    }

    /// An unsigned refusal is not trusted (alipay-sdk-python raises on it): a retryable
    /// signature failure that shows, marked unverified, what it claimed, never a permanent
    /// `Rejected` an attacker could use to stop a terminal's checks.
    #[test]
    fn unsigned_error_response_is_refused_and_its_claim_shown_unverified() {
        let body = r#"{"error_response":{"code":"40002","msg":"Invalid Arguments","sub_code":"isv.invalid-app-id","sub_msg":"bad"}}"#;
        let err =
            read_answer(body, &key(1).public, Some("t-1".into())).expect_err("the call must fail");
        assert!(
            matches!(&err, AlipayError::BadSignature { unverified: Some(c), .. } if c == "40002 isv.invalid-app-id"),
            "{err:?}"
        );
        let failure = err.failure();
        assert_eq!(failure.class, FailureClass::BadSignature);
        assert!(failure.retryable());
        assert_eq!(failure.request_id.as_deref(), Some("t-1"));
        assert!(
            err.to_string()
                .ends_with("the answer has no sign (unverified, it says 40002 isv.invalid-app-id)"),
            "{err}"
        );
        // A business failure under the method's key, unsigned, alike; odd characters are cut.
        let body = format!(
            r#"{{"{DEVICE_QUERY_RESPONSE_KEY}":{{"code":"40004","sub_code":"DEVICE_NOT_EXIST\n<script>"}}}}"#
        );
        let err = read_answer(&body, &key(1).public, None).expect_err("the call must fail");
        assert!(
            matches!(&err, AlipayError::BadSignature { unverified: Some(c), .. } if c == "40004 DEVICE_NOT_EXISTscript"),
            "{err:?}"
        );
    }

    #[test]
    fn gateway_codes_map_to_failure_classes() {
        use FailureClass::*;
        for (code, sub, class) in [
            ("20000", Some("isp.unknow-error"), ServerError),
            ("20000", None, ServerError),
            ("40004", Some("SYSTEM_ERROR"), ServerError),
            ("40004", Some("system_error"), ServerError),
            ("40004", Some("aop.ACQ.SYSTEM_ERROR"), ServerError),
            ("40005", Some("isv.app-call-limited"), RateLimited),
            ("40004", Some("isv.METHOD-CALL-LIMITED"), RateLimited),
            ("40004", Some("DEVICE_NOT_EXIST"), Rejected),
            ("40004", Some("record_not_exist"), Rejected),
            ("40004", Some("ACCESS_DENIED"), Rejected),
            ("40004", Some("INVALID_PARAMETER"), Rejected),
            ("40002", Some("isv.invalid-signature"), Rejected),
            ("20001", Some("aop.invalid-app-auth-token"), Rejected),
        ] {
            assert_eq!(gateway_class(code, sub), class, "{code} {sub:?}");
        }
    }

    #[test]
    fn unparseable_answers_are_malformed() {
        let signed_without_code = {
            let text = r#"{"msg":"no code"}"#;
            let sign = signer(1).sign_base64(text.as_bytes()).expect("sign");
            format!(r#"{{"error_response":{text},"sign":"{sign}"}}"#)
        };
        for body in ["<html>", r#"{"sign":"x"}"#, &signed_without_code] {
            let err = read_answer(body, &key(1).public, None).expect_err("the call must fail");
            assert_eq!(
                err.failure().class,
                FailureClass::Malformed,
                "{body}: {err}"
            );
        }
        // Signed success without the business fields.
        let err = read_answer(
            &answer(r#"{"code":"10000","msg":"Success"}"#, 1),
            &key(1).public,
            None,
        )
        .expect_err("the call must fail");
        assert_eq!(err.failure().class, FailureClass::Malformed);
    }

    #[test]
    fn http_statuses_map_to_failure_classes() {
        let http = |status| AlipayError::Http {
            status,
            trace_id: None,
            retry_after: None,
        };
        assert_eq!(http(502).failure().class, FailureClass::ServerError);
        assert_eq!(http(429).failure().class, FailureClass::RateLimited);
        assert_eq!(http(404).failure().class, FailureClass::Rejected);
    }

    #[test]
    fn debug_does_not_show_the_app_auth_token() {
        let shown = format!("{:?}", client(Some("secret-token-value")));
        assert!(!shown.contains("secret-token-value"), "{shown}");
        assert!(shown.contains("<set>"), "{shown}");
    }
}
