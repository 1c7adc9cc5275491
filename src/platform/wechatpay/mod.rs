//! WeChat Pay APIv3: the three calls the proxy makes on the merchant's behalf, and the
//! platform certificates it verifies them with.
//!
//! - [`sign`]: the request signature (`WECHATPAY2-SHA256-RSA2048`) made with the merchant key.
//! - [`verify`]: the keys WeChat Pay signs its answers with (public key or platform
//!   certificates) and the check of an answer's signature and timestamp.
//! - [`client`]: [`WechatPayClient`], which signs, sends, verifies and parses, and
//!   [`WechatPayError`], which maps every failure to a [`crate::platform::Failure`].
//! - [`certificates`]: `GET /v3/certificates`, the APIv3 key and AEAD_AES_256_GCM.
//!
//! Owns: the platform's signing rules, the request and answer shapes of
//! `POST /v3/offlineface/authinfo`, `GET /v3/iotmanage/device-inspections/{device_sn}`,
//! `GET /v3/iotmanage/devices` and `GET /v3/certificates`, and their error bodies. It must not
//! know about terminals or the device registry, must not retry (the caller decides from
//! [`crate::platform::Failure`]) and must never log keys, signatures, raw_data or an authinfo.

pub mod certificates;
pub mod client;
pub mod sign;
pub mod verify;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use client::{DEFAULT_BASE_URL, WechatPayClient, WechatPayError};
pub use sign::MerchantSigner;
pub use verify::{KeysError, PlatformKeys, SignatureError};

/// The most devices one `GET /v3/iotmanage/devices` page may ask for.
pub const MAX_PAGE_LIMIT: u64 = 100;
/// The most device-list requests WeChat Pay accepts per second (per merchant client).
pub const LIST_REQUESTS_PER_SECOND: u32 = 20;
/// The most device-list requests WeChat Pay accepts per day.
pub const LIST_REQUESTS_PER_DAY: u32 = 50_000;

// === offlineface/authinfo ===

/// The body of `POST /v3/offlineface/authinfo`. `raw_data` comes from the face SDK on the
/// terminal; the other fields from the proxy's registry entry for that terminal.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthinfoParams {
    pub sp_appid: String,
    /// May be empty (a sub-merchant without its own official account).
    pub sub_appid: String,
    pub sub_mchid: String,
    pub device_id: String,
    /// A secret of the face SDK: never logged (the `Debug` form leaves it out).
    pub raw_data: String,
    pub organization_id: String,
}

impl fmt::Debug for AuthinfoParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthinfoParams")
            .field("sp_appid", &self.sp_appid)
            .field("sub_appid", &self.sub_appid)
            .field("sub_mchid", &self.sub_mchid)
            .field("device_id", &self.device_id)
            .field("organization_id", &self.organization_id)
            .finish_non_exhaustive()
    }
}

/// The answer of `POST /v3/offlineface/authinfo`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authinfo {
    /// The authinfo itself, never empty. A secret: the `Debug` form shows only its fingerprint.
    pub authinfo: String,
    /// Seconds of validity, when WeChat Pay states one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
}

impl fmt::Debug for Authinfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authinfo")
            .field(
                "authinfo_fingerprint",
                &crate::crypto::secret_fingerprint(self.authinfo.as_bytes()),
            )
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

// === iotmanage/devices ===

/// A device as `GET /v3/iotmanage/devices` lists it (every field optional, as documented).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_sn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub camera_sn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_category_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_scene_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_scene: Option<String>,
    /// `ANDROID`, `LINUX` or `WINDOWS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_system: Option<String>,
    /// `ACTIVATED` or `INACTIVATED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mchid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant_shortname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_mchid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_merchant_shortname: Option<String>,
}

/// One page of `GET /v3/iotmanage/devices`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePage {
    /// May be absent in the answer when the page is empty; read as an empty list.
    #[serde(default)]
    pub data: Vec<Device>,
    /// The page's start; the requested offset when the answer leaves it out.
    pub offset: u64,
    /// The page's size limit; the requested limit when the answer leaves it out.
    pub limit: u64,
    /// Devices in the whole list; WeChat Pay sends it at least on the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<PageLinks>,
}

/// The `links` of a device page: request targets with the same limit (`next` is empty on the
/// last page, `prev` on the first).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageLinks {
    #[serde(default)]
    pub next: String,
    #[serde(default)]
    pub prev: String,
    #[serde(default, rename = "self")]
    pub self_link: String,
}

impl DevicePage {
    /// The offset of the page after this one, or `None` when this is the last page. An empty
    /// page is always the last; otherwise `total_count` decides when known, then `links.next`,
    /// and without either a full page is taken to have a successor.
    pub fn next_offset(&self) -> Option<u64> {
        if self.data.is_empty() {
            return None;
        }
        let next = self.offset.saturating_add(self.data.len() as u64);
        let more = match (self.total_count, &self.links) {
            (Some(total), _) => next < total,
            (None, Some(links)) => !links.next.is_empty(),
            (None, None) => self.data.len() as u64 >= self.limit,
        };
        more.then_some(next)
    }
}

// === iotmanage/device-inspections ===

/// The answer of `GET /v3/iotmanage/device-inspections/{device_sn}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInspection {
    pub device_sn: String,
    #[serde(default)]
    pub wired_mac: String,
    #[serde(default)]
    pub wireless_mac: String,
    #[serde(default)]
    pub bluetooth_mac: String,
    #[serde(default)]
    pub app_version: String,
    #[serde(default)]
    pub camera_sn: String,
    #[serde(default)]
    pub imei: String,
    /// `SUCCESS`, `WARN` or `FAIL`.
    pub result: String,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// RFC 3339.
    pub inspect_time: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(
        offset: u64,
        limit: u64,
        len: usize,
        total: Option<u64>,
        next: Option<&str>,
    ) -> DevicePage {
        DevicePage {
            data: vec![Device::default(); len],
            offset,
            limit,
            total_count: total,
            links: next.map(|n| PageLinks {
                next: n.to_owned(),
                ..PageLinks::default()
            }),
        }
    }

    #[test]
    fn next_offset_follows_total_count_then_links_then_page_fullness() {
        assert_eq!(page(0, 100, 100, Some(250), None).next_offset(), Some(100));
        assert_eq!(
            page(200, 100, 50, Some(250), Some("/x")).next_offset(),
            None
        );
        assert_eq!(page(100, 100, 100, Some(200), None).next_offset(), None);
        assert_eq!(
            page(
                0,
                5,
                5,
                None,
                Some("/v3/iotmanage/devices?offset=5&limit=5")
            )
            .next_offset(),
            Some(5)
        );
        assert_eq!(page(5, 5, 5, None, Some("")).next_offset(), None);
        assert_eq!(page(0, 5, 5, None, None).next_offset(), Some(5));
        assert_eq!(page(0, 5, 4, None, None).next_offset(), None);
        assert_eq!(page(0, 5, 0, Some(10), Some("/x")).next_offset(), None);
    }

    #[test]
    fn debug_forms_leave_out_raw_data_and_authinfo() {
        let params = AuthinfoParams {
            sp_appid: "wx1".into(),
            sub_appid: String::new(),
            sub_mchid: "1900000002".into(),
            device_id: "D1".into(),
            raw_data: "RAW-SECRET".into(),
            organization_id: "ORG".into(),
        };
        let shown = format!("{params:?}");
        assert!(
            shown.contains("D1") && !shown.contains("RAW-SECRET"),
            "{shown}"
        );
        let answer = Authinfo {
            authinfo: "AUTHINFO-SECRET".into(),
            expires_in: Some(3600),
        };
        let shown = format!("{answer:?}");
        assert!(!shown.contains("AUTHINFO-SECRET"), "{shown}");
        assert!(
            shown.contains(&crate::crypto::secret_fingerprint(b"AUTHINFO-SECRET")),
            "{shown}"
        );
    }

    #[test]
    fn device_page_reads_the_documented_links_object() {
        let json = r#"{"data":[{"device_sn":"SN1","activation_status":"ACTIVATED"}],"offset":0,"limit":5,
            "total_count":1,"links":{"next":"","prev":"","self":"/v3/iotmanage/devices?offset=0&limit=5"}}"#;
        let page: DevicePage = serde_json::from_str(json).expect("parse");
        assert_eq!(page.data[0].device_sn.as_deref(), Some("SN1"));
        assert_eq!(
            page.links.map(|l| l.self_link),
            Some("/v3/iotmanage/devices?offset=0&limit=5".to_owned())
        );
    }
}
