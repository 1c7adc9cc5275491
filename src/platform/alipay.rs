//! Alipay OpenAPI client. (to be written: RSA2 signing, gateway client, response verification)

use serde::{Deserialize, Serialize};

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
