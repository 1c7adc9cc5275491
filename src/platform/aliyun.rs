//! Alibaba Cloud RPC client. (to be written: ACS3-HMAC-SHA256 and v1 HMAC-SHA1, DescribeDeviceInfo)

use serde::{Deserialize, Serialize};

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
