//! WeChat Pay APIv3 client. (to be written)
