//! Alipay OpenAPI client. (to be written)
