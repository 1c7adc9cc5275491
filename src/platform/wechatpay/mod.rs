//! WeChat Pay APIv3 client. (to be written: signing, client, response verification)

use serde::{Deserialize, Serialize};

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
