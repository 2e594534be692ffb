//! Floodgate end-to-end test support.

pub mod chaos;
pub mod cluster;
pub mod gateway;
pub mod mock;
pub mod proxy;
pub mod python;
pub mod redis;
pub mod smtp;
pub mod webhook_sink;
