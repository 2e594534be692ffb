//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas are
//! safe: only the holder runs the controllers; the other waits and takes over when the holder
//! stops renewing (or releases the Lease on a graceful shutdown).
//!
//! Every write carries the Lease's `resourceVersion`: of two replicas racing for an expired
//! Lease, the API server accepts one and answers the other 409 Conflict.

use crate::error::{Error, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often a waiting replica tries again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// One replica's side of the election.
#[derive(Debug, Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl LeaseLock {
    /// The Lease `namespace/name`, contended for as `identity` (unique per replica).
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One attempt: takes the Lease if it is free or expired, renews it if held by us.
    /// `Ok(false)` when another replica holds it or won a race for it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(None, now)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if !acquirable(&spec, &self.identity, now) {
            return Ok(false);
        }
        lease.spec = Some(self.held_spec(Some(&spec), now));
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    fn held_spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let ours = previous.is_some_and(|p| p.holder_identity.as_deref() == Some(&self.identity));
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15)),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// Waits until this replica holds the Lease (`true`), or until `shutdown` (`false`).
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "leading");
                    return true;
                }
                Ok(false) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot read or take the Lease")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    /// Renews the Lease until `stop`; cancels `lost` (and returns) when it could not be
    /// renewed for a whole lease duration, or another replica took it.
    pub async fn hold(&self, stop: &CancellationToken, lost: &CancellationToken) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RENEW_EVERY) => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "another replica took the Lease");
                    lost.cancel();
                    return;
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot renew the Lease"),
            }
            if last_renewed.elapsed() >= LEASE_DURATION {
                tracing::error!(lease = %self.name, "Lease not renewed for a whole lease duration");
                lost.cancel();
                return;
            }
        }
    }

    /// Gives the Lease up (on a graceful shutdown), so that another replica takes over at once
    /// rather than after the lease duration.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        tracing::info!(lease = %self.name, "Lease released");
        Ok(())
    }
}

/// Whether `me` may take a Lease with `spec` at `now`: nobody holds it, `me` does, or the
/// holder's last renewal is at least a lease duration old.
pub fn acquirable(spec: &LeaseSpec, me: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    let Some(holder) = holder else {
        return true;
    };
    if holder == me {
        return true;
    }
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed
        .checked_add(duration)
        .map_or(true, |expiry| now >= expiry)
}

fn conflict_is_false<T>(result: kube::Result<T>) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(Error::Kube(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renewed_at: i64, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
            lease_duration_seconds: Some(seconds),
            ..LeaseSpec::default()
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn a_held_lease_is_taken_exactly_when_its_duration_has_passed() {
        let spec = held("a", 1_000, 15);
        assert!(!acquirable(&spec, "b", at(1_000)));
        assert!(!acquirable(&spec, "b", at(1_014)));
        assert!(!acquirable(
            &spec,
            "b",
            Timestamp::from_millisecond(1_014_999).unwrap()
        ));
        assert!(acquirable(&spec, "b", at(1_015)));
        // The holder itself renews at any time.
        assert!(acquirable(&spec, "a", at(1_001)));
    }

    #[test]
    fn a_free_or_released_lease_is_taken_at_once() {
        assert!(acquirable(&LeaseSpec::default(), "b", at(0)));
        let mut released = held("a", 1_000, 15);
        released.holder_identity = None;
        assert!(acquirable(&released, "b", at(1_000)));
        released.holder_identity = Some(String::new());
        assert!(acquirable(&released, "b", at(1_000)));
    }
}
