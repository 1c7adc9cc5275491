//! Simulated Alipay gateway: `POST /gateway.do` answering `alipay.merchant.iot.device.query`.
//!
//! Owns: reading the gateway parameters (form body and query string, as the real gateway
//! accepts both), checking them as the gateway does (app id, method, `sign_type=RSA2`, a
//! timestamp within [`TIMESTAMP_WINDOW`], the RSA2 signature against the app public key),
//! looking the device up in the world's bindings, and answering in the gateway's shapes, signed
//! with Alipay's key over the exact text of the response object it emits. It must not use the
//! client's sign-content builder or verifier ([`crate::platform::alipay`]): it rebuilds the sign
//! content on its own, so a client bug shows up as `isv.invalid-signature`.
//!
//! Faults: `latency` delays the answer; `status: 429` answers `40005 isv.app-call-limited`;
//! `status: 500` answers the gateway's `20000 isp.unknow-error`; any other 5xx is a bare HTTP
//! error (what a load balancer in front of the gateway sends); `bad_signature` signs with a key
//! that is not Alipay's; `unsigned_answer` leaves `sign` out (whatever the answer);
//! `malformed_body` answers 200 with a cut-off body.
//!
//! `format` must be absent or `json`, as both official SDKs send it (the sandbox is stricter
//! here than the gateway is known to be, so that the client keeps sending what the SDKs send).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use time::OffsetDateTime;
use time::macros::{format_description, offset};

use super::{Fault, Platform, SandboxState, parse_form};
use crate::platform::alipay::DeviceBinding;

/// How far a request's `timestamp` may be from the gateway's clock.
pub const TIMESTAMP_WINDOW: Duration = Duration::from_secs(5 * 60);

const METHOD: &str = "alipay.merchant.iot.device.query";
const RESPONSE_KEY: &str = "alipay_merchant_iot_device_query_response";

/// The simulator's routes.
pub fn router(state: Arc<SandboxState>) -> axum::Router {
    axum::Router::new()
        .route("/gateway.do", axum::routing::post(gateway))
        .with_state(state)
}

/// A gateway answer before it is signed and emitted.
#[derive(Debug, Serialize)]
struct Refusal {
    code: &'static str,
    msg: &'static str,
    sub_code: &'static str,
    sub_msg: String,
}

#[derive(Debug, Serialize)]
struct Success<'a> {
    code: &'static str,
    msg: &'static str,
    #[serde(flatten)]
    binding: &'a DeviceBinding,
}

/// Which key of the envelope an answer object goes under.
enum Slot {
    /// The method's own key: successes and business failures.
    Method,
    /// `error_response`: the gateway's refusals of the request as such.
    Error,
}

impl Refusal {
    fn new(code: &'static str, sub_code: &'static str, sub_msg: impl Into<String>) -> Self {
        let msg = match code {
            "20000" => "Service Currently Unavailable",
            "40001" => "Missing Required Arguments",
            "40002" => "Invalid Arguments",
            "40005" => "Call Limited",
            _ => "Business Failed",
        };
        Self {
            code,
            msg,
            sub_code,
            sub_msg: sub_msg.into(),
        }
    }
}

async fn gateway(
    State(state): State<Arc<SandboxState>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let target = match &query {
        Some(q) => format!("/gateway.do?{q}"),
        None => "/gateway.do".to_owned(),
    };
    let fault = state.faults.take_and_delay(Platform::Alipay, &target).await;
    let mut params = parse_form(query.as_deref().unwrap_or_default());
    params.extend(parse_form(&String::from_utf8_lossy(&body)));
    let checked = check_request(&state, &params, OffsetDateTime::now_utc());
    let request = match &query {
        Some(q) => format!("POST /gateway.do?{q}"),
        None => "POST /gateway.do".to_owned(),
    };
    // Business refusals (40004) are only made after the signature verified.
    let signature_ok = checked
        .as_ref()
        .map_or_else(|r| r.code == "40004", |_| true);
    state.record(Platform::Alipay, request, signature_ok);

    match fault.status {
        Some(429) => {
            let refusal = Refusal::new(
                "40005",
                "isv.app-call-limited",
                "应用调用次数超限，包含调用频率超限",
            );
            return emit(&state, Slot::Method, &refusal, &fault);
        }
        Some(500) => {
            let refusal = Refusal::new("20000", "isp.unknow-error", "系统繁忙");
            return emit(&state, Slot::Method, &refusal, &fault);
        }
        Some(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return (status, "<html><body>bad gateway</body></html>").into_response();
        }
        None => {}
    }
    let (slot, refusal) = match checked {
        Ok(key) => match state.world().alipay_bindings.get(&key) {
            Some(_) if fault.malformed_body => {
                return (
                    [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
                    format!(r#"{{"{RESPONSE_KEY}":{{"code":"10000","msg":"Succ"#),
                )
                    .into_response();
            }
            Some(binding) => {
                let success = Success {
                    code: "10000",
                    msg: "Success",
                    binding,
                };
                return emit(&state, Slot::Method, &success, &fault);
            }
            None => (
                Slot::Method,
                Refusal::new("40004", "DEVICE_NOT_EXIST", "设备不存在"),
            ),
        },
        Err(refusal) if refusal.code == "40004" => (Slot::Method, refusal),
        Err(refusal) => (Slot::Error, refusal),
    };
    emit(&state, slot, &refusal, &fault)
}

/// Checks a request as the gateway does and names the binding it asks for (`biz_tid`, or
/// `supplier_id/device_sn`).
fn check_request(
    state: &SandboxState,
    params: &[(String, String)],
    now: OffsetDateTime,
) -> Result<String, Refusal> {
    let get = |name: &str| {
        params
            .iter()
            .rev()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };
    let required = |name: &str, sub_code: &'static str| {
        get(name).ok_or_else(|| Refusal::new("40001", sub_code, format!("缺少{name}参数")))
    };
    let app_id = required("app_id", "isv.missing-app-id")?;
    let method = required("method", "isv.missing-method")?;
    let sign = required("sign", "isv.missing-signature")?;
    let sign_type = required("sign_type", "isv.missing-signature-type")?;
    let timestamp = required("timestamp", "isv.missing-timestamp")?;
    required("version", "isv.missing-version")?;
    if app_id != state.keys.alipay_app_id {
        return Err(Refusal::new(
            "40002",
            "isv.invalid-app-id",
            "无效的AppID参数",
        ));
    }
    if method != METHOD {
        return Err(Refusal::new(
            "40002",
            "isv.invalid-method",
            "不存在的方法名",
        ));
    }
    if get("format").is_some_and(|f| f != "json") {
        return Err(Refusal::new(
            "40002",
            "isv.invalid-format",
            "无效的数据格式参数",
        ));
    }
    if sign_type != "RSA2" {
        return Err(Refusal::new(
            "40002",
            "isv.invalid-signature-type",
            "无效的签名类型",
        ));
    }
    if !timestamp_in_window(timestamp, now) {
        return Err(Refusal::new(
            "40002",
            "isv.invalid-timestamp",
            "非法的时间戳参数",
        ));
    }
    let content = rebuild_sign_content(params);
    if !state
        .keys
        .alipay_app_public
        .verify_base64(content.as_bytes(), sign)
    {
        return Err(Refusal::new(
            "40002",
            "isv.invalid-signature",
            format!(
                "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配，网关生成的验签字符串为：{content}"
            ),
        ));
    }
    let invalid =
        |why: &str| Refusal::new("40004", "INVALID_PARAMETER", format!("参数有误: {why}"));
    let biz: serde_json::Value = serde_json::from_str(get("biz_content").unwrap_or_default())
        .map_err(|_| invalid("biz_content is not JSON"))?;
    let field = |name: &str| {
        biz.get(name)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
    };
    match field("device_id_type") {
        Some("ID") => field("biz_tid")
            .map(str::to_owned)
            .ok_or_else(|| invalid("biz_tid is required with device_id_type ID")),
        Some("SN") => match (field("supplier_id"), field("device_sn")) {
            (Some(supplier), Some(sn)) => Ok(format!("{supplier}/{sn}")),
            _ => Err(invalid(
                "supplier_id and device_sn are required with device_id_type SN",
            )),
        },
        _ => Err(invalid("device_id_type must be ID or SN")),
    }
}

/// The gateway's sign content: parameters but `sign` with a value, sorted, `k=v&...`, raw.
fn rebuild_sign_content(params: &[(String, String)]) -> String {
    let sorted: BTreeMap<&str, &str> = params
        .iter()
        .filter(|(k, v)| k != "sign" && !v.is_empty())
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut content = String::new();
    for (k, v) in sorted {
        if !content.is_empty() {
            content.push('&');
        }
        content.push_str(k);
        content.push('=');
        content.push_str(v);
    }
    content
}

/// True when `timestamp` (`yyyy-MM-dd HH:mm:ss`, Beijing time) is within the window of `now`.
fn timestamp_in_window(timestamp: &str, now: OffsetDateTime) -> bool {
    let fmt = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(timestamp, &fmt)
        .map(|t| t.assume_offset(offset!(+8)))
        .is_ok_and(|t| (now - t).unsigned_abs() <= TIMESTAMP_WINDOW)
}

/// Emits `object` under its slot, signed over the exact text emitted (with another key when the
/// fault says `bad_signature`, without a `sign` when it says `unsigned_answer`).
fn emit(state: &SandboxState, slot: Slot, object: &impl Serialize, fault: &Fault) -> Response {
    let text = match serde_json::to_string(object) {
        Ok(text) => text,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    // "Another key": the sandbox's WeChat Pay platform key is a real RSA key that is not
    // Alipay's, so the signature is well-formed and only the key is wrong.
    let key = if fault.bad_signature {
        &state.keys.wechat_platform_key
    } else {
        &state.keys.alipay_platform_key
    };
    let Ok(sign) = key.sign_base64(text.as_bytes()) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let slot = match slot {
        Slot::Method => RESPONSE_KEY,
        Slot::Error => "error_response",
    };
    let trace_id = crate::crypto::nonce().unwrap_or_default().to_lowercase();
    (
        [
            (
                header::CONTENT_TYPE,
                "application/json;charset=utf-8".to_owned(),
            ),
            (header::HeaderName::from_static("trace_id"), trace_id),
        ],
        if fault.unsigned_answer {
            format!(r#"{{"{slot}":{text}}}"#)
        } else {
            format!(r#"{{"{slot}":{text},"sign":"{sign}"}}"#)
        },
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RsaSigner;
    use crate::platform::FailureClass;
    use crate::platform::alipay::{AlipayClient, AlipayError, DeviceQuery};
    use crate::sandbox::World;
    use crate::sandbox::test_support::{CALL_TIMEOUT, TestSandbox, start_https};

    fn binding(pid: &str) -> DeviceBinding {
        DeviceBinding {
            merchant_type: "indirect".into(),
            pid: pid.into(),
            shop_id: "2020081700502012300038796029".into(),
            smid: Some("2088101112139886".into()),
        }
    }

    fn world() -> World {
        World {
            alipay_bindings: BTreeMap::from([
                ("tid-1".to_owned(), binding("2088000000000001")),
                (
                    "201812271300540049/QCF42019".to_owned(),
                    binding("2088000000000002"),
                ),
            ]),
            ..World::default()
        }
    }

    fn client_with(t: &TestSandbox, app_key_pem: &str, timeout: Duration) -> AlipayClient {
        AlipayClient::new(
            format!("{}/gateway.do", t.sandbox.base_url),
            t.sandbox.state.keys.alipay_app_id.clone(),
            RsaSigner::from_pem(app_key_pem, "app key").expect("app key"),
            t.secrets.alipay_platform_public.clone(),
            t.http(timeout),
        )
    }

    fn client(t: &TestSandbox) -> AlipayClient {
        client_with(t, &t.secrets.alipay_app_private_pem, CALL_TIMEOUT)
    }

    fn by_id(tid: &str) -> DeviceQuery {
        DeviceQuery::Id {
            biz_tid: tid.into(),
        }
    }

    #[tokio::test]
    async fn binding_is_found_by_id_and_by_sn_over_https() {
        let t = start_https(world()).await;
        let c = client(&t);
        assert_eq!(
            c.device_query(&by_id("tid-1")).await.expect("by id").pid,
            "2088000000000001"
        );
        let sn = DeviceQuery::Sn {
            supplier_id: "201812271300540049".into(),
            device_sn: "QCF42019".into(),
        };
        assert_eq!(
            c.device_query(&sn).await.expect("by sn").pid,
            "2088000000000002"
        );
        let received = t.sandbox.state.received();
        assert_eq!(received.len(), 2);
        assert!(
            received
                .iter()
                .all(|r| r.signature_ok && r.platform == Platform::Alipay)
        );
    }

    #[tokio::test]
    async fn unknown_device_is_rejected_with_device_not_exist() {
        let t = start_https(world()).await;
        let err = client(&t)
            .device_query(&by_id("nope"))
            .await
            .expect_err("the call must fail");
        let failure = err.failure();
        assert_eq!(failure.class, FailureClass::Rejected, "{err}");
        assert!(!failure.retryable());
        assert_eq!(failure.code.as_deref(), Some("DEVICE_NOT_EXIST"));
        assert!(failure.request_id.is_some(), "the trace id is carried");
    }

    #[tokio::test]
    async fn request_signed_with_the_wrong_key_is_refused_and_not_retryable() {
        let t = start_https(world()).await;
        let other = crate::crypto::test_key(4);
        let err = client_with(&t, &other.private_pem, CALL_TIMEOUT)
            .device_query(&by_id("tid-1"))
            .await
            .expect_err("the call must fail");
        assert!(
            matches!(&err, AlipayError::Gateway { code, sub_code: Some(s), .. }
                if code == "40002" && s == "isv.invalid-signature"),
            "{err:?}"
        );
        assert!(!err.failure().retryable());
        assert!(!t.sandbox.state.received()[0].signature_ok);
    }

    /// The gateway echoes its sign content on a bad signature; the token must not travel on.
    #[tokio::test]
    async fn app_auth_token_echoed_by_the_gateway_is_redacted() {
        let t = start_https(world()).await;
        let other = crate::crypto::test_key(4);
        let err = client_with(&t, &other.private_pem, CALL_TIMEOUT)
            .with_app_auth_token("202401BB-secret-token")
            .device_query(&by_id("tid-1"))
            .await
            .expect_err("the call must fail");
        let shown = format!("{err} {err:?} {:?}", err.failure());
        assert!(shown.contains("app_auth_token=<app_auth_token>"), "{shown}");
        assert!(!shown.contains("202401BB-secret-token"), "{shown}");
    }

    #[tokio::test]
    async fn stale_timestamp_and_wrong_app_id_are_refused() {
        let t = start_https(world()).await;
        let stale = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        let err = client(&t)
            .device_query_at(&by_id("tid-1"), stale)
            .await
            .expect_err("the call must fail");
        assert!(err.to_string().contains("isv.invalid-timestamp"), "{err}");
        assert_eq!(err.failure().class, FailureClass::Rejected);

        let wrong_app = AlipayClient::new(
            format!("{}/gateway.do", t.sandbox.base_url),
            "2021999999999999",
            RsaSigner::from_pem(&t.secrets.alipay_app_private_pem, "k").expect("key"),
            t.secrets.alipay_platform_public.clone(),
            t.http(CALL_TIMEOUT),
        );
        let err = wrong_app
            .device_query(&by_id("tid-1"))
            .await
            .expect_err("the call must fail");
        assert!(err.to_string().contains("isv.invalid-app-id"), "{err}");
    }

    #[tokio::test]
    async fn parameters_in_the_query_string_are_accepted() {
        let t = start_https(world()).await;
        let params = client(&t)
            .signed_params(&by_id("tid-1"), OffsetDateTime::now_utc())
            .expect("sign");
        let url = reqwest::Url::parse_with_params(
            &format!("{}/gateway.do", t.sandbox.base_url),
            params.iter().map(|(k, v)| (*k, v.as_str())),
        )
        .expect("url");
        let body = t
            .http(CALL_TIMEOUT)
            .post(url)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("body");
        let binding =
            crate::platform::alipay::read_answer(&body, &t.secrets.alipay_platform_public, None)
                .expect("verified answer");
        assert_eq!(binding.pid, "2088000000000001");
    }

    /// Each fault turns into the typed error the proxy acts on, with the right retryability.
    #[tokio::test]
    async fn faults_map_to_typed_errors_and_retryability() {
        let t = start_https(world()).await;
        let arm = |fault: Fault| t.sandbox.state.faults.arm_once(Platform::Alipay, fault);
        let c = client(&t);
        let q = by_id("tid-1");

        // (fault, expected class, expected status, expected code)
        let cases = [
            (
                Fault {
                    status: Some(500),
                    ..Fault::default()
                },
                FailureClass::ServerError,
                None,
                Some("isp.unknow-error"),
            ),
            (
                Fault {
                    status: Some(503),
                    ..Fault::default()
                },
                FailureClass::ServerError,
                Some(503),
                None,
            ),
            (
                Fault {
                    status: Some(429),
                    ..Fault::default()
                },
                FailureClass::RateLimited,
                None,
                None,
            ),
            (
                Fault {
                    bad_signature: true,
                    ..Fault::default()
                },
                FailureClass::BadSignature,
                None,
                None,
            ),
            (
                Fault {
                    malformed_body: true,
                    ..Fault::default()
                },
                FailureClass::Malformed,
                None,
                None,
            ),
            // An unsigned refusal is not trusted (as alipay-sdk-python refuses it): not a
            // permanent rejection, whatever it claims.
            (
                Fault {
                    status: Some(500),
                    unsigned_answer: true,
                    ..Fault::default()
                },
                FailureClass::BadSignature,
                None,
                None,
            ),
        ];
        for (fault, class, status, code) in cases {
            let label = format!("{fault:?}");
            arm(fault);
            let f = c
                .device_query(&q)
                .await
                .expect_err("the call must fail")
                .failure();
            assert_eq!(f.class, class, "{label}");
            assert!(f.retryable(), "{label}");
            if let Some(status) = status {
                assert_eq!(f.status, status, "{label}");
            }
            if let Some(code) = code {
                assert_eq!(f.code.as_deref(), Some(code), "{label}");
            }
        }

        arm(Fault {
            latency: Some(Duration::from_millis(1500)),
            ..Fault::default()
        });
        let slow = client_with(
            &t,
            &t.secrets.alipay_app_private_pem,
            Duration::from_millis(300),
        );
        let f = slow
            .device_query(&q)
            .await
            .expect_err("the call must fail")
            .failure();
        assert_eq!(f.class, FailureClass::Transport);
        assert!(f.retryable());

        // Every fault was one-shot: the next call succeeds.
        c.device_query(&q).await.expect("fault cleared");
    }

    #[test]
    fn sign_content_is_rebuilt_sorted_without_sign_and_empty_values() {
        let params = [("b", "2"), ("sign", "x"), ("a", "1"), ("c", "")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(rebuild_sign_content(&params), "a=1&b=2");
    }
}
