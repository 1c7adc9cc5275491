//! Alibaba Cloud RPC client. (to be written)
