//! Alibaba Cloud RPC client for Cloudauth `DescribeDeviceInfo` (offline face SDK licences).
//!
//! Owns: the two request signatures Alibaba Cloud accepts for RPC APIs — ACS3-HMAC-SHA256
//! (the vendor's recommended "V3" scheme: signed headers, `Authorization` header) and the
//! legacy RPC v1 HMAC-SHA1 (`Signature` query parameter) — the RFC 3986 encoding both use,
//! the `DescribeDeviceInfo` page and its `DeviceInfoList.DeviceInfo[]` nesting, paging through
//! the list to find one device, and the mapping of gateway errors to [`Failure`]. It must not
//! log or print the AccessKey secret or a signature; HMAC and SHA-256 come from ring.
//!
//! ACS3 requests are `POST /` with the action's parameters in the query string and an empty
//! body; v1 requests are `GET /?...&Signature=...`. Both are what the vendor's published
//! examples sign.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use percent_encoding::utf8_percent_encode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::crypto::{BASE64, CryptoError, hex, sha256_hex};
use crate::platform::{Failure, FailureClass};

/// Cloudauth's endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://cloudauth.aliyuncs.com";
/// The Cloudauth API version `DescribeDeviceInfo` belongs to.
pub const CLOUDAUTH_VERSION: &str = "2019-03-07";
/// The action this client calls.
pub const DESCRIBE_DEVICE_INFO: &str = "DescribeDeviceInfo";
/// Page size [`AliyunClient::find_device`] asks for.
pub const FIND_PAGE_SIZE: u32 = 50;
/// Pages [`AliyunClient::find_device`] reads at most (10 000 records), so a gateway that keeps
/// answering full pages cannot keep it looping.
pub const FIND_MAX_PAGES: u32 = 200;
/// The ACS3 signature algorithm name.
pub const ACS3_ALGORITHM: &str = "ACS3-HMAC-SHA256";

/// One entry of Cloudauth `DescribeDeviceInfo`'s `DeviceInfoList.DeviceInfo[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeviceInfo {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biz_type: Option<String>,
    /// `YYYYMMDD`.
    pub begin_day: String,
    /// `YYYYMMDD`.
    pub expired_day: String,
}

impl DeviceInfo {
    /// The first day of the licence, when `BeginDay` is a valid `YYYYMMDD`.
    pub fn begin_date(&self) -> Option<time::Date> {
        parse_day(&self.begin_day)
    }

    /// The day the licence lapses, when `ExpiredDay` is a valid `YYYYMMDD`.
    pub fn expiry_date(&self) -> Option<time::Date> {
        parse_day(&self.expired_day)
    }
}

/// Parses Cloudauth's `YYYYMMDD` day.
pub fn parse_day(text: &str) -> Option<time::Date> {
    time::Date::parse(text, format_description!("[year][month][day]")).ok()
}

/// Renders a day as `YYYY-MM-DD`.
pub fn format_day(date: time::Date) -> String {
    // Four-digit years (the only ones `parse_day` yields) always format.
    date.format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_default()
}

/// The filters and page of a `DescribeDeviceInfo` call; `None` leaves a parameter out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfoQuery {
    pub device_id: Option<String>,
    pub biz_type: Option<String>,
    pub user_device_id: Option<String>,
    pub page_size: Option<u32>,
    pub current_page: Option<u32>,
}

impl DeviceInfoQuery {
    fn params(&self) -> BTreeMap<String, String> {
        let mut params = BTreeMap::new();
        let mut put = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                params.insert(name.to_owned(), v);
            }
        };
        put("DeviceId", self.device_id.clone());
        put("BizType", self.biz_type.clone());
        put("UserDeviceId", self.user_device_id.clone());
        put("PageSize", self.page_size.map(|n| n.to_string()));
        put("CurrentPage", self.current_page.map(|n| n.to_string()));
        params
    }
}

/// One page of `DescribeDeviceInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfoPage {
    pub request_id: String,
    pub total_count: u64,
    pub page_size: u32,
    pub current_page: u32,
    pub device_info_list: Vec<DeviceInfo>,
}

/// The page as the gateway writes it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PageBody {
    request_id: String,
    total_count: u64,
    page_size: u32,
    current_page: u32,
    #[serde(default)]
    device_info_list: DeviceInfoList,
}

#[derive(Default, Deserialize)]
struct DeviceInfoList {
    #[serde(rename = "DeviceInfo", default)]
    device_info: Vec<DeviceInfo>,
}

/// The gateway's error body.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody {
    request_id: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

/// Errors of an Alibaba Cloud call.
#[derive(Debug, thiserror::Error)]
pub enum AliyunError {
    #[error("alibaba cloud endpoint {endpoint:?} is not usable: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("cannot make a request nonce")]
    Nonce(#[source] CryptoError),
    #[error("alibaba cloud endpoint {endpoint} did not answer")]
    Transport {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "alibaba cloud answered http {status}: {} {}",
        .code.as_deref().unwrap_or("(no code)"),
        .message.as_deref().unwrap_or("")
    )]
    Api {
        status: u16,
        code: Option<String>,
        message: Option<String>,
        request_id: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("alibaba cloud's answer is not of the documented shape: {reason}")]
    Malformed {
        status: u16,
        reason: String,
        request_id: Option<String>,
    },
    #[error("device {device_id} is not in Cloudauth's device list (no offline face SDK licence)")]
    DeviceNotListed {
        device_id: String,
        request_id: Option<String>,
    },
}

impl AliyunError {
    /// What the proxy needs to know of this failure.
    ///
    /// `Throttling*` or 429 → RateLimited; 5xx, `InternalError`, `ServiceUnavailable` →
    /// ServerError; other 4xx (`SignatureDoesNotMatch`, `InvalidAccessKeyId.NotFound`,
    /// `IncompleteSignature`, `MissingParameter`, ...) → Rejected.
    pub fn failure(&self) -> Failure {
        match self {
            Self::InvalidEndpoint { .. } => {
                Failure::local(FailureClass::Rejected, self.to_string())
            }
            Self::Nonce(_) | Self::Transport { .. } => {
                Failure::local(FailureClass::Transport, self.to_string())
            }
            Self::Api {
                status,
                code,
                message,
                request_id,
                retry_after,
            } => {
                let code_is = |names: &[&str]| code.as_deref().is_some_and(|c| names.contains(&c));
                let class = if *status == 429
                    || code.as_deref().is_some_and(|c| c.starts_with("Throttling"))
                {
                    FailureClass::RateLimited
                } else if *status >= 500 || code_is(&["InternalError", "ServiceUnavailable"]) {
                    FailureClass::ServerError
                } else if (400..500).contains(status) {
                    FailureClass::Rejected
                } else {
                    FailureClass::Malformed
                };
                Failure {
                    class,
                    status: *status,
                    code: code.clone(),
                    message: message.clone(),
                    request_id: request_id.clone(),
                    retry_after: *retry_after,
                }
            }
            Self::Malformed {
                status, request_id, ..
            } => Failure {
                status: *status,
                request_id: request_id.clone(),
                ..Failure::local(FailureClass::Malformed, self.to_string())
            },
            Self::DeviceNotListed { request_id, .. } => Failure {
                status: 200,
                request_id: request_id.clone(),
                ..Failure::local(FailureClass::Rejected, self.to_string())
            },
        }
    }
}

// === signing ===

/// Which request signature the client uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SignatureScheme {
    /// ACS3-HMAC-SHA256, the vendor's recommended scheme.
    #[default]
    Acs3HmacSha256,
    /// RPC signature version 1.0, HMAC-SHA1.
    RpcHmacSha1,
}

/// An AccessKey pair. The secret is never printed.
#[derive(Clone)]
pub struct AccessKey {
    pub id: String,
    secret: String,
}

impl AccessKey {
    pub fn new(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: secret.into(),
        }
    }
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The time and nonce a request is signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub time: OffsetDateTime,
    pub nonce: String,
}

impl Stamp {
    /// Now, with a fresh random nonce.
    pub fn fresh() -> Result<Self, AliyunError> {
        Ok(Self {
            time: OffsetDateTime::now_utc(),
            nonce: crate::crypto::nonce().map_err(AliyunError::Nonce)?,
        })
    }

    /// ISO 8601 UTC, `yyyy-MM-ddTHH:mm:ssZ`.
    pub fn timestamp(&self) -> String {
        let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
        // Numeric components only: formats for every year `time` represents in four digits.
        self.time
            .to_offset(time::UtcOffset::UTC)
            .format(&fmt)
            .unwrap_or_default()
    }
}

/// RFC 3986 percent-encoding as Alibaba Cloud signs with it.
pub fn percent_encode(text: &str) -> String {
    utf8_percent_encode(text, super::RFC3986).to_string()
}

/// `k=v` pairs, keys and values percent-encoded, sorted by key, joined with `&`.
pub fn canonical_query(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// RPC v1 StringToSign: `METHOD&%2F&` + the percent-encoded canonical query.
pub fn rpc_v1_string_to_sign(method: &str, params: &BTreeMap<String, String>) -> String {
    format!(
        "{method}&{}&{}",
        percent_encode("/"),
        percent_encode(&canonical_query(params))
    )
}

/// RPC v1 signature: base64 HMAC-SHA1 keyed with `secret&`.
pub fn rpc_v1_signature(secret: &str, string_to_sign: &str) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        format!("{secret}&").as_bytes(),
    );
    BASE64.encode(ring::hmac::sign(&key, string_to_sign.as_bytes()).as_ref())
}

/// ACS3 canonical request and its `SignedHeaders`. `headers` are the headers to sign, names
/// lower-case; values are trimmed here.
pub fn acs3_canonical_request(
    method: &str,
    canonical_uri: &str,
    params: &BTreeMap<String, String>,
    headers: &BTreeMap<String, String>,
    payload_sha256_hex: &str,
) -> (String, String) {
    let canonical_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    let signed_headers = headers.keys().cloned().collect::<Vec<_>>().join(";");
    let request = format!(
        "{method}\n{canonical_uri}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_sha256_hex}",
        canonical_query(params)
    );
    (request, signed_headers)
}

/// ACS3 signature: hex HMAC-SHA256 of `ACS3-HMAC-SHA256\n` + hex SHA-256(canonical request).
pub fn acs3_signature(secret: &str, canonical_request: &str) -> String {
    let string_to_sign = format!(
        "{ACS3_ALGORITHM}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex(ring::hmac::sign(&key, string_to_sign.as_bytes()).as_ref())
}

/// A signed request, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    pub method: reqwest::Method,
    /// The full URL with its query string.
    pub url: String,
    /// Headers to send (ACS3's signed headers and `authorization`; none for v1).
    pub headers: Vec<(String, String)>,
}

// === impl AliyunClient ===

/// A client of one Alibaba Cloud RPC endpoint with one AccessKey.
#[derive(Debug)]
pub struct AliyunClient {
    endpoint: reqwest::Url,
    /// `host[:port]` as sent in `Host` and signed.
    host: String,
    access_key: AccessKey,
    scheme: SignatureScheme,
    http: reqwest::Client,
}

impl AliyunClient {
    /// A client of `endpoint` (normally [`DEFAULT_ENDPOINT`]: an `https://` or `http://` URL
    /// with no path). `http` comes from [`crate::platform::http_client`].
    pub fn new(
        endpoint: &str,
        access_key: AccessKey,
        scheme: SignatureScheme,
        http: reqwest::Client,
    ) -> Result<Self, AliyunError> {
        let bad = |reason: &str| AliyunError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason: reason.to_owned(),
        };
        let url = reqwest::Url::parse(endpoint).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(bad(
                "the scheme must be https (or http for a local sandbox)",
            ));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(bad("RPC endpoints have no path or query"));
        }
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(bad("no host")),
        };
        Ok(Self {
            endpoint: url,
            host,
            access_key,
            scheme,
            http,
        })
    }

    /// Signs an RPC call of `action` (API `version`) with `params`, at `stamp`.
    pub fn sign(
        &self,
        action: &str,
        version: &str,
        params: &BTreeMap<String, String>,
        stamp: &Stamp,
    ) -> SignedRequest {
        let base = self.endpoint.as_str().trim_end_matches('/');
        match self.scheme {
            SignatureScheme::Acs3HmacSha256 => {
                let payload_hash = sha256_hex(b"");
                let headers = BTreeMap::from([
                    ("host".to_owned(), self.host.clone()),
                    ("x-acs-action".to_owned(), action.to_owned()),
                    ("x-acs-content-sha256".to_owned(), payload_hash.clone()),
                    ("x-acs-date".to_owned(), stamp.timestamp()),
                    ("x-acs-signature-nonce".to_owned(), stamp.nonce.clone()),
                    ("x-acs-version".to_owned(), version.to_owned()),
                ]);
                let (canonical, signed_headers) =
                    acs3_canonical_request("POST", "/", params, &headers, &payload_hash);
                let authorization = format!(
                    "{ACS3_ALGORITHM} Credential={},SignedHeaders={signed_headers},Signature={}",
                    self.access_key.id,
                    acs3_signature(&self.access_key.secret, &canonical)
                );
                let mut headers: Vec<(String, String)> = headers.into_iter().collect();
                headers.push(("authorization".to_owned(), authorization));
                let query = canonical_query(params);
                SignedRequest {
                    method: reqwest::Method::POST,
                    url: if query.is_empty() {
                        format!("{base}/")
                    } else {
                        format!("{base}/?{query}")
                    },
                    headers,
                }
            }
            SignatureScheme::RpcHmacSha1 => {
                let mut all = params.clone();
                for (k, v) in [
                    ("Format", "JSON"),
                    ("Version", version),
                    ("AccessKeyId", &self.access_key.id),
                    ("SignatureMethod", "HMAC-SHA1"),
                    ("Timestamp", &stamp.timestamp()),
                    ("SignatureVersion", "1.0"),
                    ("SignatureNonce", &stamp.nonce),
                    ("Action", action),
                ] {
                    all.insert(k.to_owned(), v.to_owned());
                }
                let signature =
                    rpc_v1_signature(&self.access_key.secret, &rpc_v1_string_to_sign("GET", &all));
                SignedRequest {
                    method: reqwest::Method::GET,
                    url: format!(
                        "{base}/?{}&Signature={}",
                        canonical_query(&all),
                        percent_encode(&signature)
                    ),
                    headers: Vec::new(),
                }
            }
        }
    }

    /// Calls `action`: the body of a 2xx answer and its `x-acs-request-id`; any other answer
    /// is an [`AliyunError::Api`].
    pub(crate) async fn call(
        &self,
        action: &str,
        version: &str,
        params: &BTreeMap<String, String>,
        stamp: &Stamp,
    ) -> Result<(String, Option<String>), AliyunError> {
        let signed = self.sign(action, version, params, stamp);
        let transport = |source| AliyunError::Transport {
            endpoint: self.endpoint.to_string(),
            source,
        };
        let mut request = self
            .http
            .request(signed.method, &signed.url)
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in &signed.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let header_request_id = response
            .headers()
            .get("x-acs-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = crate::platform::retry_after(response.headers());
        let body = response.bytes().await.map_err(transport)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if (200..300).contains(&status) {
            tracing::debug!(
                action,
                upstream_status = status,
                request_id = header_request_id.as_deref().unwrap_or(""),
                "alibaba cloud answered"
            );
            return Ok((body, header_request_id));
        }
        let error = read_error(status, &body, header_request_id, retry_after);
        let failure = error.failure();
        tracing::debug!(
            action,
            upstream_status = status,
            code = failure.code.as_deref().unwrap_or(""),
            request_id = failure.request_id.as_deref().unwrap_or(""),
            "alibaba cloud refused"
        );
        Err(error)
    }

    /// One page of Cloudauth's device list.
    pub async fn describe_device_info(
        &self,
        query: &DeviceInfoQuery,
    ) -> Result<DeviceInfoPage, AliyunError> {
        self.describe_device_info_stamped(query, &Stamp::fresh()?)
            .await
    }

    /// [`describe_device_info`](Self::describe_device_info) signed at `stamp`.
    pub async fn describe_device_info_stamped(
        &self,
        query: &DeviceInfoQuery,
        stamp: &Stamp,
    ) -> Result<DeviceInfoPage, AliyunError> {
        let (body, request_id) = self
            .call(
                DESCRIBE_DEVICE_INFO,
                CLOUDAUTH_VERSION,
                &query.params(),
                stamp,
            )
            .await?;
        read_page(&body).map_err(|reason| AliyunError::Malformed {
            status: 200,
            reason,
            request_id,
        })
    }

    /// The licence of `device_id` (optionally of one `biz_type`): pages through the list and
    /// returns the matching record that lapses last, since a renewed licence can be listed next
    /// to the lapsed one. Absent → [`AliyunError::DeviceNotListed`].
    ///
    /// It asks for [`FIND_PAGE_SIZE`] a page but pages by what each answer says: a gateway may
    /// cap the page (answering `"PageSize":20` to a request for 50), and the records covered so
    /// far are `(CurrentPage - 1) * PageSize` plus the rows of this page, as the answer counts
    /// them. The list ends at an empty page or when those cover `TotalCount`.
    pub async fn find_device(
        &self,
        device_id: &str,
        biz_type: Option<&str>,
    ) -> Result<DeviceInfo, AliyunError> {
        let mut latest: Option<DeviceInfo> = None;
        let mut request_id = None;
        for current_page in 1..=FIND_MAX_PAGES {
            let page = self
                .describe_device_info(&DeviceInfoQuery {
                    device_id: Some(device_id.to_owned()),
                    biz_type: biz_type.map(str::to_owned),
                    page_size: Some(FIND_PAGE_SIZE),
                    current_page: Some(current_page),
                    ..DeviceInfoQuery::default()
                })
                .await?;
            let last_page = page.device_info_list.is_empty()
                || records_covered(current_page, &page) >= page.total_count;
            request_id = Some(page.request_id);
            for info in page.device_info_list {
                let matches = info.device_id == device_id
                    && biz_type.is_none_or(|b| info.biz_type.as_deref() == Some(b));
                if matches
                    && latest
                        .as_ref()
                        .is_none_or(|l| info.expiry_date() > l.expiry_date())
                {
                    latest = Some(info);
                }
            }
            if last_page {
                break;
            }
        }
        latest.ok_or_else(|| AliyunError::DeviceNotListed {
            device_id: device_id.to_owned(),
            request_id,
        })
    }
}

/// How many records of the whole list `page` (asked for as page `current_page`) and the pages
/// before it cover, by the answer's own `PageSize`: `(page - 1) * PageSize + rows`. An answer
/// that says `PageSize` 0 (or less than it sent) is taken at its rows.
fn records_covered(current_page: u32, page: &DeviceInfoPage) -> u64 {
    let rows = page.device_info_list.len() as u64;
    let page_size = u64::from(page.page_size).max(rows);
    u64::from(current_page.saturating_sub(1)).saturating_mul(page_size) + rows
}

/// The error a non-2xx answer stands for: its body read as `{"RequestId","Code","Message"}`
/// when it is one (the body's request id, else the `x-acs-request-id` header's); anything else
/// leaves code and message empty, and the status alone classifies it.
pub fn read_error(
    status: u16,
    body: &str,
    header_request_id: Option<String>,
    retry_after: Option<Duration>,
) -> AliyunError {
    let parsed: Option<ErrorBody> = crate::json::from_str(body).ok();
    let (code, message, request_id) = match parsed {
        Some(e) => (e.code, e.message, e.request_id.or(header_request_id)),
        None => (None, None, header_request_id),
    };
    AliyunError::Api {
        status,
        code,
        message,
        request_id,
        retry_after,
    }
}

/// Reads a `DescribeDeviceInfo` page (a 2xx answer's body).
pub fn read_page(body: &str) -> Result<DeviceInfoPage, String> {
    let page: PageBody = crate::json::from_str(body).map_err(|e| e.to_string())?;
    Ok(DeviceInfoPage {
        request_id: page.request_id,
        total_count: page.total_count,
        page_size: page.page_size,
        current_page: page.current_page,
        device_info_list: page.device_info_list.device_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http() -> reqwest::Client {
        let tls = crate::tls::client_config_webpki(None, "roots").expect("tls");
        crate::platform::http_client(tls, crate::platform::DEFAULT_TIMEOUT).expect("http")
    }

    /// A client of `endpoint` with the AccessKey `id`/`secret`.
    fn client(endpoint: &str, id: &str, secret: &str, scheme: SignatureScheme) -> AliyunClient {
        AliyunClient::new(endpoint, AccessKey::new(id, secret), scheme, http()).expect("client")
    }

    fn stamp(time: time::OffsetDateTime, nonce: &str) -> Stamp {
        Stamp {
            time,
            nonce: nonce.into(),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The official v1 vector (seeds README): DescribeRegions, XML, GET.
    #[test]
    fn rpc_v1_official_vector() {
        let all = params(&[
            ("AccessKeyId", "testid"),
            ("Action", "DescribeRegions"),
            ("Format", "XML"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
            ("SignatureVersion", "1.0"),
            ("Timestamp", "2016-02-23T12:46:24Z"),
            ("Version", "2014-05-26"),
        ]);
        let string_to_sign = rpc_v1_string_to_sign("GET", &all);
        assert_eq!(
            string_to_sign,
            "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML\
             %26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf\
             %26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26"
        );
        assert_eq!(
            rpc_v1_signature("testsecret", &string_to_sign),
            "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
        );
    }

    /// The vendor's published V3 example (RunInstances, POST, empty body) through the client.
    #[test]
    fn acs3_published_vendor_example() {
        let client = client(
            "https://ecs.cn-shanghai.aliyuncs.com",
            "YourAccessKeyId",
            "YourAccessKeySecret",
            SignatureScheme::Acs3HmacSha256,
        );
        let stamp = stamp(
            time::macros::datetime!(2023-10-26 09:01:01 UTC),
            "d410180a5abf7fe235dd9b74aca91fc0",
        );
        let signed = client.sign(
            "RunInstances",
            "2014-05-26",
            &params(&[
                (
                    "ImageId",
                    "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
                ),
                ("RegionId", "cn-shanghai"),
            ]),
            &stamp,
        );
        let auth = &signed.headers.last().expect("authorization").1;
        assert_eq!(
            auth,
            "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action;\
             x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,\
             Signature=e521358f7776c97df52e6b2891a8bc73026794a071b50c3323388c4e0df64804"
        );
        assert_eq!(signed.method, reqwest::Method::POST);
        assert_eq!(
            signed.url,
            "https://ecs.cn-shanghai.aliyuncs.com/?ImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai"
        );
    }

    /// An independent computation in Python (hmac, hashlib, urllib) of the same request.
    const PYTHON_ACS3: &str = r#"
import hashlib, hmac, json, sys
from urllib.parse import quote
i = json.loads(sys.argv[1])
enc = lambda s: quote(s, safe='')
query = '&'.join(enc(k) + '=' + enc(v) for k, v in sorted(i['params'].items()))
body_hash = hashlib.sha256(b'').hexdigest()
headers = {'host': i['host'], 'x-acs-action': i['action'], 'x-acs-version': i['version'],
           'x-acs-date': i['date'], 'x-acs-signature-nonce': i['nonce'],
           'x-acs-content-sha256': body_hash}
names = sorted(headers)
canonical = '\n'.join(['POST', '/', query,
                       ''.join(n + ':' + headers[n].strip() + '\n' for n in names),
                       ';'.join(names), body_hash])
digest = hashlib.sha256(canonical.encode()).hexdigest()
sig = hmac.new(i['secret'].encode(), ('ACS3-HMAC-SHA256\n' + digest).encode(), hashlib.sha256).hexdigest()
print(digest)
print(sig)
"#;

    #[test]
    fn acs3_matches_an_independent_python_computation() {
        let secret = "s3cr3t/with+odd=chars";
        let client = client(
            "https://cloudauth.aliyuncs.com",
            "LTAI5tTestKey",
            secret,
            SignatureScheme::Acs3HmacSha256,
        );
        let stamp = stamp(time::macros::datetime!(2024-05-06 07:08:09 UTC), "NONCE123");
        let p = params(&[
            ("DeviceId", "wd.6ziU$ff~sp*A e/中"),
            ("BizType", "FACE_TEST"),
            ("PageSize", "50"),
            ("CurrentPage", "1"),
        ]);
        let input = serde_json::json!({
            "params": p, "host": "cloudauth.aliyuncs.com", "action": DESCRIBE_DEVICE_INFO,
            "version": CLOUDAUTH_VERSION, "date": "2024-05-06T07:08:09Z", "nonce": "NONCE123",
            "secret": secret,
        });
        let out = crate::test_support::run_piped(
            "python3",
            &["-c", PYTHON_ACS3, &input.to_string()],
            b"",
            "scripts/setup installs it",
        );
        let stdout = String::from_utf8(out).expect("utf-8");
        let mut lines = stdout.lines();
        let (py_digest, py_signature) = (lines.next().expect("digest"), lines.next().expect("sig"));

        let signed = client.sign(DESCRIBE_DEVICE_INFO, CLOUDAUTH_VERSION, &p, &stamp);
        let headers: BTreeMap<String, String> = signed
            .headers
            .iter()
            .filter(|(k, _)| k != "authorization")
            .cloned()
            .collect();
        let (canonical, _) = acs3_canonical_request("POST", "/", &p, &headers, &sha256_hex(b""));
        assert_eq!(sha256_hex(canonical.as_bytes()), py_digest);
        let auth = &signed.headers.last().expect("authorization").1;
        assert!(
            auth.ends_with(&format!(",Signature={py_signature}")),
            "{auth}"
        );
        assert!(auth.starts_with("ACS3-HMAC-SHA256 Credential=LTAI5tTestKey,SignedHeaders="));
    }

    #[test]
    fn percent_encoding_follows_rfc3986_as_alibaba_signs() {
        assert_eq!(
            percent_encode("a b*c~d/e+f=g&h"),
            "a%20b%2Ac~d%2Fe%2Bf%3Dg%26h"
        );
        assert_eq!(percent_encode("-_.AZaz09"), "-_.AZaz09");
        assert_eq!(percent_encode("中"), "%E4%B8%AD");
    }

    #[test]
    fn v1_request_carries_common_parameters_and_a_valid_signature() {
        let client = client(
            DEFAULT_ENDPOINT,
            "testid",
            "testsecret",
            SignatureScheme::RpcHmacSha1,
        );
        let stamp = stamp(time::macros::datetime!(2016-02-23 12:46:24 UTC), "n1");
        let signed = client.sign(
            DESCRIBE_DEVICE_INFO,
            CLOUDAUTH_VERSION,
            &params(&[("DeviceId", "d 1")]),
            &stamp,
        );
        assert_eq!(signed.method, reqwest::Method::GET);
        let url = reqwest::Url::parse(&signed.url).expect("url");
        let mut all: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
        let signature = all.remove("Signature").expect("Signature");
        assert_eq!(all["Format"], "JSON");
        assert_eq!(all["Timestamp"], "2016-02-23T12:46:24Z");
        assert_eq!(all["SignatureMethod"], "HMAC-SHA1");
        assert_eq!(all["SignatureVersion"], "1.0");
        assert_eq!(all["Action"], DESCRIBE_DEVICE_INFO);
        assert_eq!(all["Version"], CLOUDAUTH_VERSION);
        assert_eq!(all["DeviceId"], "d 1");
        assert!(signed.url.contains("DeviceId=d%201"), "{}", signed.url);
        assert_eq!(
            signature,
            rpc_v1_signature("testsecret", &rpc_v1_string_to_sign("GET", &all))
        );
    }

    #[test]
    fn endpoint_must_be_a_bare_http_url() {
        for bad in ["ftp://x", "https://x/path", "https://x/?a=b", "not a url"] {
            let err = AliyunClient::new(
                bad,
                AccessKey::new("a", "b"),
                SignatureScheme::default(),
                http(),
            )
            .expect_err("the call must fail");
            assert!(
                matches!(err, AliyunError::InvalidEndpoint { .. }),
                "{bad}: {err}"
            );
        }
        let c = client(
            "https://127.0.0.1:8443/",
            "a",
            "b",
            SignatureScheme::default(),
        );
        assert_eq!(c.host, "127.0.0.1:8443");
    }

    #[test]
    fn page_reads_the_nested_list_and_tolerates_an_empty_one() {
        let page = read_page(
            r#"{"TotalCount":1,"PageSize":20,"RequestId":"969434DF","CurrentPage":1,
                "DeviceInfoList":{"DeviceInfo":[{"DeviceId":"wd.6ziU","UserDeviceId":"3iJ1AY$oHcu7mC69",
                "BizType":"FACE_TEST","BeginDay":"20190101","ExpiredDay":"20200101"}]}}"#,
        )
        .expect("page");
        assert_eq!(page.total_count, 1);
        assert_eq!(page.device_info_list[0].device_id, "wd.6ziU");
        let info = &page.device_info_list[0];
        assert_eq!(
            info.expiry_date(),
            Some(time::macros::date!(2020 - 01 - 01))
        );
        assert_eq!(format_day(info.begin_date().expect("day")), "2019-01-01");
        let empty = read_page(r#"{"TotalCount":0,"PageSize":20,"RequestId":"r","CurrentPage":1}"#)
            .expect("empty page");
        assert!(empty.device_info_list.is_empty());
        assert!(read_page(r#"{"RequestId":"r"}"#).is_err());
    }

    #[test]
    fn records_covered_counts_pages_in_the_size_the_answer_states() {
        let page = |page_size: u32, rows: usize| DeviceInfoPage {
            request_id: "r".into(),
            total_count: 45,
            page_size,
            current_page: 1,
            device_info_list: vec![licence_row(); rows],
        };
        // Asked for 50 a page, answered 20: page 2 covers records 21 to 40.
        assert_eq!(records_covered(1, &page(20, 20)), 20);
        assert_eq!(records_covered(2, &page(20, 20)), 40);
        assert_eq!(records_covered(3, &page(20, 5)), 45);
        // An answer claiming a smaller page than it sent is taken at its rows.
        assert_eq!(records_covered(2, &page(0, 20)), 40);
        assert_eq!(records_covered(2, &page(10, 20)), 40);
    }

    fn licence_row() -> DeviceInfo {
        DeviceInfo {
            device_id: "wd.x".into(),
            user_device_id: None,
            biz_type: None,
            begin_day: "20240101".into(),
            expired_day: "20250101".into(),
        }
    }

    #[test]
    fn days_parse_only_as_yyyymmdd() {
        assert_eq!(
            parse_day("20240229"),
            Some(time::macros::date!(2024 - 02 - 29))
        );
        assert_eq!(parse_day("20230229"), None);
        assert_eq!(parse_day("2024-02-29"), None);
        assert_eq!(parse_day(""), None);
    }

    #[test]
    fn api_errors_map_to_failure_classes() {
        use FailureClass::*;
        let api = |status, code: &str| AliyunError::Api {
            status,
            code: Some(code.to_owned()),
            message: None,
            request_id: Some("rid".into()),
            retry_after: None,
        };
        for (status, code, class) in [
            (400, "Throttling.User", RateLimited),
            (503, "Throttling.Api", RateLimited),
            (429, "Anything", RateLimited),
            (500, "InternalError", ServerError),
            (503, "ServiceUnavailable", ServerError),
            (400, "ServiceUnavailable", ServerError),
            (400, "SignatureDoesNotMatch", Rejected),
            (404, "InvalidAccessKeyId.NotFound", Rejected),
            (400, "IncompleteSignature", Rejected),
            (400, "MissingParameter", Rejected),
        ] {
            let failure = api(status, code).failure();
            assert_eq!(failure.class, class, "{status} {code}");
            assert_eq!(failure.request_id.as_deref(), Some("rid"));
        }
        let not_listed = AliyunError::DeviceNotListed {
            device_id: "d".into(),
            request_id: None,
        };
        assert_eq!(not_listed.failure().class, Rejected);
        assert!(!not_listed.failure().retryable());
        assert!(
            not_listed
                .to_string()
                .contains("not in Cloudauth's device list")
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let client = client(
            DEFAULT_ENDPOINT,
            "LTAIid",
            "very-secret-value",
            SignatureScheme::default(),
        );
        let shown = format!("{client:?}");
        assert!(shown.contains("LTAIid"), "{shown}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
    }
}
