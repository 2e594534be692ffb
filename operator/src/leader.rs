//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas are
//! safe: only the holder runs the controllers; the other waits and takes over when the holder
//! stops renewing (or releases the Lease on a graceful shutdown).
//!
//! The timing follows client-go's leader election, so that two replicas never lead at once:
//! - Every write carries the Lease's `resourceVersion`: of two replicas racing for an expired
//!   Lease, the API server accepts one and answers the other 409 Conflict.
//! - A follower never compares its clock with the holder's `renewTime` (the two clocks may
//!   differ by any amount). It notes the local, monotonic time at which it *observed* the
//!   Lease's record change (client-go's `observedTime`) and takes the Lease only when the
//!   record has not changed for the Lease's whole duration since.
//! - The leader steps down (cancels its controllers, and aborts the reconciles in flight) when
//!   it has not renewed for [`RENEW_DEADLINE`], counted from the *start* of its last successful
//!   renewal, which is before any follower can have observed it. The deadline is shorter than
//!   [`LEASE_DURATION`], so the old leader has stopped before a follower may take over.
//! - Each Lease API call has its own timeout ([`CALL_TIMEOUT`]), far under the renew deadline
//!   (kube's default read timeout is about 295 s), and a renewal still under way at the
//!   deadline does not keep the leader leading.

use crate::error::{Error, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a Lease holds without renewal (written into the Lease).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long the leader leads without a successful renewal before it steps down.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the leader renews, and how often a waiting replica tries again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// The longest one Lease API call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A Lease record as a follower last saw it, and when (local monotonic time).
#[derive(Debug, Clone)]
struct Observed {
    spec: LeaseSpec,
    at: Instant,
}

/// One replica's side of the election.
#[derive(Debug, Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    observed: Arc<Mutex<Option<Observed>>>,
}

impl LeaseLock {
    /// The Lease `namespace/name`, contended for as `identity` (unique per replica).
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            observed: Arc::default(),
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Notes `spec` as seen at `at`, keeping the earlier time when the record is unchanged.
    fn observe(&self, spec: &LeaseSpec, at: Instant) {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        if observed.as_ref().is_none_or(|o| o.spec != *spec) {
            *observed = Some(Observed {
                spec: spec.clone(),
                at,
            });
        }
    }

    /// When the record now held was first observed unchanged.
    fn observed_at(&self) -> Option<Instant> {
        let observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        observed.as_ref().map(|o| o.at)
    }

    /// One attempt: takes the Lease if it is free or expired, renews it if held by us.
    /// `Ok(false)` when another replica holds it or won a race for it; an error when a call
    /// failed or took longer than [`CALL_TIMEOUT`].
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let Some(mut lease) = within(CALL_TIMEOUT, self.api.get_opt(&self.name)).await? else {
            let spec = self.held_spec(None, Timestamp::now());
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec.clone()),
            };
            let created = conflict_is_false(
                within(
                    CALL_TIMEOUT,
                    self.api.create(&PostParams::default(), &lease),
                )
                .await,
            )?;
            if created {
                self.observe(&spec, Instant::now());
            }
            return Ok(created);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        self.observe(&spec, Instant::now());
        if !acquirable(&spec, &self.identity, self.observed_at(), Instant::now()) {
            return Ok(false);
        }
        let mine = self.held_spec(Some(&spec), Timestamp::now());
        lease.spec = Some(mine.clone());
        let written = conflict_is_false(
            within(
                CALL_TIMEOUT,
                self.api.replace(&self.name, &PostParams::default(), &lease),
            )
            .await,
        )?;
        if written {
            self.observe(&mine, Instant::now());
        }
        Ok(written)
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

    /// Waits until this replica holds the Lease, or until `shutdown` (`None`). Returns the
    /// start of the attempt that took it: the time the renew deadline is counted from.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<Instant> {
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "leading");
                    return Some(started);
                }
                Ok(false) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot read or take the Lease")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    /// Renews the Lease every [`RETRY_EVERY`] until `stop`. Cancels `lost` (and returns) when
    /// another replica took it, or when no renewal has succeeded for [`RENEW_DEADLINE`] since
    /// the start of the last one that did (`renewed`, at first the start of the attempt that
    /// took the Lease); a renewal still under way at the deadline counts as failed.
    pub async fn hold(&self, renewed: Instant, stop: &CancellationToken, lost: &CancellationToken) {
        let mut renewed = renewed;
        loop {
            let deadline = renewed + RENEW_DEADLINE;
            let attempt = async {
                tokio::time::sleep(RETRY_EVERY).await;
                let started = Instant::now();
                (started, self.try_acquire_or_renew().await)
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::error!(
                        lease = %self.name,
                        deadline = ?RENEW_DEADLINE,
                        "Lease not renewed within the renew deadline; stepping down"
                    );
                    lost.cancel();
                    return;
                }
                (started, result) = attempt => match result {
                    Ok(true) => renewed = started,
                    Ok(false) => {
                        tracing::error!(lease = %self.name, "another replica took the Lease; stepping down");
                        lost.cancel();
                        return;
                    }
                    Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot renew the Lease"),
                },
            }
        }
    }

    /// Gives the Lease up (on a graceful shutdown), so that another replica takes over at once
    /// rather than after the lease duration.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = within(CALL_TIMEOUT, self.api.get_opt(&self.name)).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        within(
            CALL_TIMEOUT,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await?;
        tracing::info!(lease = %self.name, "Lease released");
        Ok(())
    }
}

/// Whether `me` may take a Lease with `spec` at `now`: nobody holds it, `me` does, or its
/// record has stayed unchanged for the Lease's duration since this replica first observed it
/// (`observed_at`, local monotonic time). The holder's own timestamps are never compared with
/// this replica's clock.
pub fn acquirable(spec: &LeaseSpec, me: &str, observed_at: Option<Instant>, now: Instant) -> bool {
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    let Some(holder) = holder else {
        return true;
    };
    if holder == me {
        return true;
    }
    let Some(observed_at) = observed_at else {
        return false;
    };
    let seconds = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(0);
    now >= observed_at + Duration::from_secs(seconds)
}

/// `call`, or [`Error::LeaseCallTimeout`] when it takes longer than `limit`.
async fn within<T>(limit: Duration, call: impl Future<Output = kube::Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::LeaseCallTimeout(limit)),
    }
}

fn conflict_is_false<T>(result: Result<T>) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs `work` (a reconcile) unless leadership is `lost` first: at that moment `work` is
/// dropped, so a reconcile in flight when the Lease is lost makes no request afterwards.
pub async fn fenced<T>(
    lost: CancellationToken,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        biased;
        () = lost.cancelled() => Err(Error::LeaseLost),
        result = work => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use k8s_openapi::jiff::SignedDuration;
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::sync::atomic::{AtomicBool, Ordering};

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";

    /// The Lease as the API server stores it, shared by the replicas of a test.
    #[derive(Default)]
    struct Store {
        lease: Option<Value>,
        version: u64,
    }

    type Shared = Arc<Mutex<Store>>;

    impl Store {
        fn put(&mut self, mut lease: Value) -> Value {
            self.version += 1;
            lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
            self.lease = Some(lease.clone());
            lease
        }

        /// Writes the Lease as held by `holder`, renewed at `renewed` by the holder's clock.
        fn held_by(&mut self, holder: &str, renewed: Timestamp) {
            let spec = LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            };
            self.put(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "lock", "namespace": "ns"},
                "spec": serde_json::to_value(spec).unwrap_or_default()
            }));
        }

        fn holder(&self) -> Option<String> {
            self.lease
                .as_ref()
                .and_then(|l| l["spec"]["holderIdentity"].as_str())
                .map(str::to_owned)
        }

        fn answer(
            &mut self,
            method: &Method,
            path: &str,
            body: Option<Value>,
        ) -> (StatusCode, Value) {
            let conflict = (StatusCode::CONFLICT, status(409, "Conflict"));
            match (method, path.strip_prefix(PATH)) {
                (&Method::GET, Some("/lock")) => match &self.lease {
                    Some(l) => (StatusCode::OK, l.clone()),
                    None => (StatusCode::NOT_FOUND, status(404, "NotFound")),
                },
                (&Method::POST, Some("")) if self.lease.is_none() => {
                    (StatusCode::CREATED, self.put(body.unwrap_or_default()))
                }
                (&Method::POST, Some("")) => conflict,
                (&Method::PUT, Some("/lock")) => {
                    let body = body.unwrap_or_default();
                    let current = self
                        .lease
                        .as_ref()
                        .map(|l| &l["metadata"]["resourceVersion"]);
                    if current == Some(&body["metadata"]["resourceVersion"]) {
                        (StatusCode::OK, self.put(body))
                    } else {
                        conflict
                    }
                }
                _ => panic!("unexpected {method} {path}"),
            }
        }
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    }

    /// A replica `identity` whose API calls `store` answers, unless its network is cut
    /// (`cut` set): then its requests are taken and never answered.
    fn replica(store: &Shared, identity: &str) -> (LeaseLock, Arc<AtomicBool>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let cut = Arc::new(AtomicBool::new(false));
        let (store, network) = (store.clone(), cut.clone());
        tokio::spawn(async move {
            let mut unanswered = Vec::new();
            while let Some((request, reply)) = handle.next_request().await {
                if network.load(Ordering::SeqCst) {
                    unanswered.push(reply);
                    continue;
                }
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice(&bytes).ok();
                let (code, value) = store.lock().unwrap_or_else(|p| p.into_inner()).answer(
                    &parts.method,
                    parts.uri.path(),
                    body,
                );
                let response = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(value.to_string().into_bytes()));
                if let Ok(response) = response {
                    reply.send_response(response);
                }
            }
        });
        let client = Client::new(service, "ns");
        (LeaseLock::new(client, "ns", "lock", identity), cut)
    }

    fn holder(store: &Shared) -> Option<String> {
        store.lock().unwrap_or_else(|p| p.into_inner()).holder()
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_cut_off_steps_down_exactly_at_the_renew_deadline() {
        let store = Shared::default();
        let (a, cut) = replica(&store, "a");
        let start = Instant::now();
        let since = a.acquire(&CancellationToken::new()).await;
        assert_eq!(since, Some(start));
        let lost = CancellationToken::new();
        let holding = {
            let (a, lost) = (a.clone(), lost.clone());
            tokio::spawn(async move {
                a.hold(start, &CancellationToken::new(), &lost).await;
                Instant::now()
            })
        };
        // Renewals at 2, 4 and 6 s succeed; from 7 s on no call is answered.
        tokio::time::sleep(Duration::from_secs(7)).await;
        cut.store(true, Ordering::SeqCst);
        tokio::time::sleep_until(
            start + Duration::from_secs(6) + RENEW_DEADLINE - Duration::from_millis(1),
        )
        .await;
        assert!(!lost.is_cancelled(), "stepped down before the deadline");
        let stepped_down = holding.await.unwrap_or(start);
        assert_eq!(
            stepped_down - start,
            Duration::from_secs(6) + RENEW_DEADLINE
        );
        assert!(lost.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_call_gives_up_after_its_own_timeout() {
        let store = Shared::default();
        let (a, cut) = replica(&store, "a");
        cut.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let result = a.try_acquire_or_renew().await;
        assert!(
            matches!(result, Err(Error::LeaseCallTimeout(_))),
            "{result:?}"
        );
        assert_eq!(start.elapsed(), CALL_TIMEOUT);
        assert!(CALL_TIMEOUT * 2 < RENEW_DEADLINE && RENEW_DEADLINE < LEASE_DURATION);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_counts_the_lease_from_when_it_saw_it_whatever_the_holders_clock() {
        // The holder's clock an hour behind, in step, an hour ahead of the follower's.
        for skew in [-3600, 0, 3600] {
            let store = Shared::default();
            let renewed = Timestamp::now()
                .checked_add(SignedDuration::from_secs(skew))
                .unwrap_or(Timestamp::UNIX_EPOCH);
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .held_by("a", renewed);
            let (b, _) = replica(&store, "b");
            let seen = Instant::now();
            assert!(
                !b.try_acquire_or_renew().await.unwrap_or(true),
                "skew {skew}"
            );
            tokio::time::sleep_until(seen + LEASE_DURATION - Duration::from_millis(1)).await;
            assert!(
                !b.try_acquire_or_renew().await.unwrap_or(true),
                "skew {skew}"
            );
            tokio::time::sleep_until(seen + LEASE_DURATION).await;
            assert!(
                b.try_acquire_or_renew().await.unwrap_or(false),
                "skew {skew}"
            );
            assert_eq!(holder(&store).as_deref(), Some("b"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_renews_keeps_the_lease_even_with_its_clock_far_behind() {
        let store = Shared::default();
        let long_ago = Timestamp::UNIX_EPOCH;
        store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held_by("a", long_ago);
        let (b, _) = replica(&store, "b");
        let shutdown = CancellationToken::new();
        let follower = {
            let (b, shutdown) = (b.clone(), shutdown.clone());
            tokio::spawn(async move { b.acquire(&shutdown).await })
        };
        // "a" renews every 2 s by its own (stopped, 1970) clock: only the record changes.
        for i in 1..=30 {
            tokio::time::sleep(RETRY_EVERY).await;
            let renewed = long_ago
                .checked_add(SignedDuration::from_secs(i))
                .unwrap_or(long_ago);
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .held_by("a", renewed);
        }
        shutdown.cancel();
        assert_eq!(follower.await.ok().flatten(), None);
        assert_eq!(holder(&store).as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_old_leader_has_stepped_down_before_a_follower_takes_over() {
        let store = Shared::default();
        let (a, cut) = replica(&store, "a");
        let (b, _) = replica(&store, "b");
        let start = Instant::now();
        let since = a.acquire(&CancellationToken::new()).await.unwrap_or(start);
        let lost = CancellationToken::new();
        let leading_a = {
            let (a, lost) = (a.clone(), lost.clone());
            tokio::spawn(async move {
                a.hold(since, &CancellationToken::new(), &lost).await;
                Instant::now()
            })
        };
        let leading_b = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(&CancellationToken::new()).await })
        };
        // "a" is cut off from the API server between its renewals; "b" is not.
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        cut.store(true, Ordering::SeqCst);
        let a_stopped = leading_a.await.unwrap_or(start);
        let b_leads = leading_b.await.ok().flatten().unwrap_or(start);
        assert!(lost.is_cancelled());
        assert!(
            a_stopped + (LEASE_DURATION - RENEW_DEADLINE) <= b_leads,
            "a led until {:?}, b from {:?}",
            a_stopped - start,
            b_leads - start
        );
        assert_eq!(holder(&store).as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_in_flight_when_the_lease_is_lost_writes_nothing_after() {
        let lost = CancellationToken::new();
        let wrote = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        {
            let lost = lost.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                lost.cancel();
            });
        }
        let reconcile = {
            let wrote = wrote.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(20)).await;
                wrote.store(true, Ordering::SeqCst);
                Ok(())
            }
        };
        let result = fenced(lost, reconcile).await;
        assert!(matches!(result, Err(Error::LeaseLost)), "{result:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!wrote.load(Ordering::SeqCst));
    }
}
