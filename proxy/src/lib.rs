//! Floodgate's data plane: an OpenAI-compatible gateway that spreads AI requests over pools
//! of provider keys without exceeding their rate limits.
//!
//! A request flows `server -> identity -> cache -> queue -> route -> providers`, in the order
//! [`pipeline`] writes down once; `config` turns manifests into the validated configuration
//! every stage reads.

pub mod budget;
pub mod cache;
pub mod config;
pub mod demand;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod jobs;
pub mod metrics;
pub mod pipeline;
pub mod providers;
pub mod route;
pub mod routing;
pub mod secret;
pub mod server;
pub mod telemetry;
