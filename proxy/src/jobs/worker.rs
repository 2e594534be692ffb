//! A replica's job workers: each claims a job, runs one attempt through the pipeline in the
//! tenant's tier, and writes the outcome: completed, a retry after the TierQueue's backoff,
//! or, its attempts spent (or a failure no retry can mend), failed and dead-lettered. The
//! caller is then notified under the notification's lease ([`Notifier`]), and only then is
//! the claim acknowledged.

use super::store::{Claim, JobStore, Notice, Notifier, Step};
use super::{Channel, JobError, Jobs, Policy, Status, StoreError, now_ms, webhook};
use crate::config::Config;
use crate::identity::{Identity, Refusal};
use crate::pipeline::{self, Door, RequestCtx};
use crate::providers::types::ChatRequest;
use crate::route::{Dispatcher, ReplyBody, RouteError};
use axum::http::HeaderMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the workers share.
#[derive(Debug, Clone)]
pub struct Workers {
    /// The jobs subsystem.
    pub jobs: Arc<Jobs>,
    /// Routes the attempts.
    pub dispatcher: Arc<Dispatcher>,
    /// Finds a job's tenant by name.
    pub identity: Arc<Identity>,
    /// Sends webhooks to the TierQueue's URLs (and to jobs' own URLs when internal addresses
    /// are allowed).
    pub http: reqwest::Client,
    /// Sends webhooks to jobs' own URLs: refuses names that resolve to internal addresses
    /// ([`super::address::PublicResolver`]).
    pub guarded_http: reqwest::Client,
    /// This replica's consumer name prefix (unique per process).
    pub consumer: String,
    /// How long a claim, or a notification's lease, lasts unrenewed before another replica
    /// takes it over (`--job-visibility-ms`); both are renewed every third of it.
    pub visibility: Duration,
    /// Where notifications run (the process's tasks), so shutdown waits for them.
    pub tasks: TaskTracker,
    /// Stops the workers; a notification still retrying is given up, unacknowledged (its
    /// job is reclaimed by another replica).
    pub cancel: CancellationToken,
    /// Bounds the notifications in flight on this replica ([`MAX_NOTIFYING`]): past it, a
    /// worker waits for one to end before it takes the next job.
    pub notifying: Arc<tokio::sync::Semaphore>,
}

/// How often the pending gauges are read from the store.
pub const PENDING_EVERY: Duration = Duration::from_secs(2);

/// Notifications (webhook and email, with their retries) in flight at most on one replica.
pub const MAX_NOTIFYING: usize = 256;

/// A failed attempt: what to record, and whether another attempt may mend it.
struct Failure {
    error: JobError,
    retryable: bool,
    /// A refusal for capacity (no key with budget in time, the tenant's own limits), with
    /// when to look again: the job waits without spending an attempt.
    capacity: Option<Duration>,
}

impl Workers {
    /// Spawns `count` workers on its tasks, stopping when its `cancel` fires (a job being
    /// run is finished first), and the batch sweep ([`super::batch::sweep`], on every replica,
    /// workers or not).
    pub fn spawn(self, count: usize) {
        let jobs = self.jobs.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(super::batch::SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let swept = tokio::select! {
                    () = cancel.cancelled() => return,
                    swept = super::batch::sweep(&jobs.store) => swept,
                };
                if let Err(e) = swept {
                    tracing::warn!(error = %e, "job store unavailable; batches are swept again in 1 s");
                }
            }
        });
        let jobs = self.jobs.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            // The pending gauges, from the store's counts (shared ones with Redis).
            let mut tick = tokio::time::interval(PENDING_EVERY);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Ok(counts) = jobs.store.pending().await {
                    super::metrics::get().set_pending(&counts);
                }
            }
        });
        for i in 0..count {
            let w = self.clone();
            let cancel = self.cancel.clone();
            let consumer = format!("{}-{i}", self.consumer);
            self.tasks
                .spawn(async move { w.run(consumer, cancel).await });
        }
    }

    async fn run(self, consumer: String, cancel: CancellationToken) {
        loop {
            let claimed = tokio::select! {
                () = cancel.cancelled() => return,
                c = self.jobs.store.claim(&consumer, Duration::from_secs(1)) => c,
            };
            match claimed {
                Ok(Some(claim)) => self.handle(claim).await,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "job store unavailable; workers retry in 1 s");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// One claimed job, to its acknowledgement. Store failures leave the claim unacknowledged:
    /// the job is reclaimed after the visibility timeout.
    async fn handle(&self, claim: Claim) {
        if let Err(e) = self.attempt(&claim).await {
            tracing::warn!(job = %claim.job.id, error = %e, "job store failed during a job; it will be reclaimed");
        }
    }

    async fn attempt(&self, claim: &Claim) -> Result<(), StoreError> {
        let store = &self.jobs.store;
        let config = self.dispatcher.config();
        let policy = Policy::of(&config, &claim.job.tier);
        let mut job = claim.job.clone();
        if job.status.is_terminal() {
            // Cancelled while queued or waiting for a retry (its entry came back to be told),
            // or its previous holder wrote the outcome and died before acknowledging.
            self.line_over(claim, &job).await;
            return self.notify_and_ack(claim, job, config, policy).await;
        }
        if job.attempts >= job.max_attempts {
            // Every attempt allowed was started by a replica that died during it: a job that
            // takes its replica down must not take the next one down too.
            job.error = Some(JobError {
                code: "replica_lost".to_owned(),
                message: format!(
                    "the replica running attempt {} stopped before it ended",
                    job.attempts
                ),
            });
            job.status = Status::Failed;
            job.dead_letter = policy.dead_letters;
            return self.finish(claim, job, config, policy).await;
        }
        let queued_since = job.next_attempt_ms.unwrap_or(job.created_ms);
        job.status = Status::Running;
        job.attempts += 1;
        job.started_ms = Some(now_ms());
        job.next_attempt_ms = None;
        if !store.save(claim, &job, Step::Start, &policy).await? {
            return self.refused(claim, config, policy).await;
        }
        let m = super::metrics::get();
        m.state("running");
        let started = Instant::now();
        let outcome = self.keep_alive(claim, self.run_once(&job, &config)).await;
        let took = started.elapsed();
        self.jobs.ran(took);
        let wait = now_ms().saturating_sub(queued_since) as f64 / 1000.0 - took.as_secs_f64();
        m.attempt(&job.tier, wait.max(0.0), took.as_secs_f64());
        let ended = now_ms();
        let (error, provider) = match &outcome {
            Ok((_, provider)) => (None, provider.clone()),
            Err(f) => (Some(f.error.clone()), None),
        };
        job.history.push(super::AttemptRecord {
            attempt: job.attempts,
            started_ms: job.started_ms.unwrap_or(ended),
            ended_ms: ended,
            error,
            provider,
        });
        match outcome {
            Ok((answer, _)) => {
                job.status = Status::Completed;
                job.result = Some(answer);
                job.error = None;
            }
            Err(f) => {
                let delay = match deferral(&mut job, f.capacity) {
                    // Waiting for capacity, not failing: the attempt is given back.
                    Some(wait) => Some(wait),
                    None => f
                        .retryable
                        .then(|| job.max_attempts_backoff(&policy))
                        .flatten(),
                };
                job.error = Some(f.error);
                if let Some(delay) = delay {
                    job.status = Status::Retrying;
                    job.next_attempt_ms = Some(now_ms() + delay.as_millis() as u64);
                    if store
                        .save(claim, &job, Step::Retry { delay }, &policy)
                        .await?
                    {
                        m.state("retrying");
                    } else {
                        self.refused(claim, config, policy).await?;
                    }
                    return Ok(());
                }
                job.status = Status::Failed;
                job.dead_letter = policy.dead_letters;
            }
        }
        self.finish(claim, job, config, policy).await
    }

    /// Writes a job that is over, then notifies its caller and acknowledges its claim.
    async fn finish(
        &self,
        claim: &Claim,
        mut job: super::Job,
        config: Arc<Config>,
        policy: Policy,
    ) -> Result<(), StoreError> {
        let store = &self.jobs.store;
        let m = super::metrics::get();
        job.finished_ms = Some(now_ms());
        if !store.save(claim, &job, Step::Finish, &policy).await? {
            return self.refused(claim, config, policy).await;
        }
        m.state(job.status.as_str());
        self.line_over(claim, &job).await;
        if job.dead_letter {
            m.dead_letters.inc();
            tracing::warn!(job = %job.id, tier = %job.tier, attempts = job.attempts, "job dead-lettered");
        }
        self.notify_and_ack(claim, job, config, policy).await
    }

    /// Notifies the caller of `job` (over) and then acknowledges `claim`, in a task of its
    /// own that keeps the claim alive: a slow or failing receiver, and the backoff between
    /// its tries, hold neither a worker nor the claim's visibility timeout. The worker waits
    /// only for a slot when [`MAX_NOTIFYING`] are in flight. A job asking for no
    /// notification is acknowledged at once. Every job over goes through here, whoever
    /// finished it: the notification's lease says whether it still needs telling.
    async fn notify_and_ack(
        &self,
        claim: &Claim,
        job: super::Job,
        config: Arc<Config>,
        policy: Policy,
    ) -> Result<(), StoreError> {
        if webhook_target(&job, &config).is_none() && email_target(&job, &config).is_none() {
            return self.jobs.store.ack(claim).await;
        }
        let Ok(slot) = self.notifying.clone().acquire_owned().await else {
            return Ok(()); // closed: shutting down; the claim is reclaimed elsewhere
        };
        let w = self.clone();
        let claim = claim.clone();
        self.tasks.spawn(async move {
            let _slot = slot;
            let told = async {
                if w.report(&job, &config, &policy).await? {
                    w.jobs.store.ack(&claim).await?;
                }
                Ok::<_, StoreError>(())
            };
            let told = w.keep_alive(&claim, told);
            let result = tokio::select! {
                () = w.cancel.cancelled() => return,
                r = told => r,
            };
            if let Err(e) = result {
                tracing::warn!(job = %claim.job.id, error = %e, "job store failed while notifying; the job will be reclaimed");
            }
        });
        Ok(())
    }

    /// A save refused: the job is over already (cancelled while it ran, or finished by a
    /// holder whose claim this one outlived), or the claim is no longer this worker's (taken
    /// over while it stalled). A job over goes to [`Self::notify_and_ack`], whoever ended it:
    /// its caller is told if nobody has been (a holder that wrote the outcome may have died
    /// before telling). A job still running elsewhere is left to its holder.
    async fn refused(
        &self,
        claim: &Claim,
        config: Arc<Config>,
        policy: Policy,
    ) -> Result<(), StoreError> {
        match self.jobs.store.get(&claim.job.id).await? {
            Some(job) if job.status.is_terminal() => {
                self.line_over(claim, &job).await;
                self.notify_and_ack(claim, job, config, policy).await
            }
            Some(_) => {
                tracing::info!(job = %claim.job.id, "its claim was taken over by another holder; left to it");
                Ok(())
            }
            None => self.jobs.store.ack(claim).await,
        }
    }

    /// After `job` (over, held as `claim`) if it is a batch's line: ends the batch if it was
    /// its last line (its output and error files built and stored now,
    /// [`super::batch::end`]). A failure is logged; the batch is then ended by a replica's
    /// sweep once this worker's lease on it is over.
    async fn line_over(&self, claim: &Claim, job: &super::Job) {
        let Some(batch) = &job.batch else { return };
        // Reading a large batch's lines takes a while: the claim is kept meanwhile.
        let ended = self.keep_alive(claim, super::batch::end(&self.jobs.store, batch));
        match ended.await {
            Ok(true) => tracing::info!(batch = %batch, "batch over: its files are stored"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(batch = %batch, error = %e, "cannot end a batch whose last line is over; a sweep will");
            }
        }
    }

    /// Runs `work` while keeping `claim` alive (until it is found taken over: the work's
    /// writes are then refused).
    async fn keep_alive<T>(&self, claim: &Claim, work: impl std::future::Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        let mut tick = tokio::time::interval(self.visibility / 3);
        tick.tick().await;
        let mut held = true;
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick(), if held => match self.jobs.store.keep(claim).await {
                    Ok(true) => {}
                    Ok(false) => {
                        held = false;
                        tracing::info!(job = %claim.job.id, "its claim was taken over by another holder");
                    }
                    Err(e) => {
                        tracing::warn!(job = %claim.job.id, error = %e, "cannot keep a job's claim alive");
                    }
                },
            }
        }
    }

    /// Runs `work` while renewing `notifier`'s lease every third of the visibility timeout;
    /// `None` (the work dropped, whatever it was sending) as soon as the lease is found no
    /// longer its holder's ([`renewing`]).
    async fn holding<T>(
        &self,
        notifier: &Notifier,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let renew = || async {
            match self
                .jobs
                .store
                .renew_notice(notifier, self.visibility)
                .await
            {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(job = %notifier.job, error = %e, "cannot renew a notification's lease; once it lapses another replica may send it again (same id)");
                    true
                }
            }
        };
        renewing(self.visibility / 3, work, renew).await
    }

    /// One attempt: the job's request through the pipeline as its tenant, in its tier.
    async fn run_once(
        &self,
        job: &super::Job,
        config: &Arc<Config>,
    ) -> Result<(serde_json::Value, Option<String>), Failure> {
        let fail = |code: &str, message: String, retryable| Failure {
            error: JobError {
                code: code.to_owned(),
                message,
            },
            retryable,
            capacity: None,
        };
        let mut req: ChatRequest = serde_json::from_value(job.request.clone())
            .map_err(|e| fail("invalid_request", e.to_string(), false))?;
        req.stream = false;
        let mut ctx = RequestCtx::new(
            Door::OpenAiChat,
            &HeaderMap::new(),
            self.dispatcher.max_wait(),
        );
        ctx.job_tier = Some(Arc::from(job.tier.as_str()));
        if let Some(tenant) = &job.tenant {
            let caller = self
                .identity
                .tenant(config, self.dispatcher.budgets(), tenant)
                .ok_or_else(|| {
                    fail(
                        "tenant_unknown",
                        format!("tenant {tenant} is no longer configured"),
                        false,
                    )
                })?;
            ctx.caller = Some(caller);
        }
        let view = self.dispatcher.view();
        match pipeline::chat(&self.dispatcher, &view, &mut ctx, &req).await {
            Ok(reply) => {
                let provider = ctx.route.as_ref().map(|r| r.provider.to_string());
                match reply.body {
                    ReplyBody::Complete(answer) => serde_json::to_value(answer)
                        .map(|v| (v, provider))
                        .map_err(|e| fail("internal_error", e.to_string(), true)),
                    ReplyBody::Stream(_) => Err(fail(
                        "internal_error",
                        "a stream came for a job".to_owned(),
                        true,
                    )),
                }
            }
            Err(pipeline::Error::Refused(r)) => {
                let retryable = !matches!(r, Refusal::ModelNotAllowed(_));
                let mut f = fail(r.metric_label(), r.to_string(), retryable);
                f.capacity = r.retry_after();
                Err(f)
            }
            // A spent monthly budget renews only with the month: not worth a retry.
            Err(pipeline::Error::OverBudget(e)) => {
                Err(fail("budget_exceeded", e.to_string(), false))
            }
            Err(pipeline::Error::Route(e)) => {
                let retryable = match &e {
                    RouteError::UnknownModel(_) => false,
                    RouteError::Upstream { error, .. } => error.retryable(),
                    RouteError::Saturated { .. } | RouteError::Unavailable { .. } => true,
                };
                let mut f = fail(e.metric_label(), e.to_string(), retryable);
                if let RouteError::Saturated { retry_after } = &e {
                    f.capacity = Some(*retry_after);
                }
                Err(f)
            }
        }
    }

    /// Tells the caller of `job` (over) by webhook and/or email, if it asked and nobody has:
    /// under the notification's lease ([`Notifier`], renewed while it sends), each channel
    /// recorded as it ends, and a channel recorded already (by a holder that died before it
    /// finished) not sent again. Whether the claim may be acknowledged: `false` while another
    /// holder's lease runs (it may have died mid-delivery: the claim is left to lapse and the
    /// job looked at again once the lease has), or when this holder lost the lease while
    /// sending (it lapsed and another holder took over).
    async fn report(
        &self,
        job: &super::Job,
        config: &Config,
        policy: &Policy,
    ) -> Result<bool, StoreError> {
        let hook = webhook_target(job, config);
        let mail = email_target(job, config);
        let wanted: Vec<Channel> = [
            hook.as_ref().map(|_| Channel::Webhook),
            mail.as_ref().map(|_| Channel::Email),
        ]
        .into_iter()
        .flatten()
        .collect();
        if wanted.is_empty() {
            return Ok(true);
        }
        let store = &self.jobs.store;
        let notifier = Notifier::new(job);
        let (hook_told, mail_told) = match store.begin_notice(&notifier, self.visibility).await? {
            Notice::Granted { webhook, email } => (webhook, email),
            Notice::Busy => {
                tracing::info!(job = %job.id, "its caller is being told by another holder: not told again while its lease runs");
                return Ok(false);
            }
            Notice::Done => {
                tracing::info!(job = %job.id, "its caller was told already: not told again");
                return Ok(true);
            }
            Notice::Stale => {
                tracing::info!(job = %job.id, "re-driven since this outcome: its next outcome is told instead");
                return Ok(true);
            }
        };
        let by_hook = async {
            let Some((url, secret)) = hook.filter(|_| !hook_told) else {
                return Ok(true);
            };
            if secret.is_none() && !tier_has_webhook(config, &job.tier) {
                // Refused at POST /v1/jobs, so the tier lost its webhook settings (and the
                // secret that signed its jobs' own URLs) since this job was queued.
                tracing::warn!(job = %job.id, tier = %job.tier, "webhook sent unsigned (no floodgate-webhook-signature): the job's tier has no async.webhook settings now, whose signingSecretRef would sign it");
            }
            let tries = self.send_webhook(job, &url, secret.as_ref(), policy).await;
            store
                .record_notice(&notifier, Channel::Webhook, &tries, &wanted)
                .await
        };
        let by_mail = async {
            let Some((to, smtp)) = mail.filter(|_| !mail_told) else {
                return Ok(true);
            };
            let tries = super::email::deliver(&smtp, &to, policy.retry, job).await;
            store
                .record_notice(&notifier, Channel::Email, &tries, &wanted)
                .await
        };
        let recorded = self
            .holding(&notifier, async { tokio::join!(by_hook, by_mail) })
            .await;
        if let Some((hooked, mailed)) = recorded
            && hooked?
            && mailed?
        {
            return Ok(true);
        }
        // Lost while sending: another holder took over once the lease lapsed (this one
        // stalled), or the job was re-driven. The claim is acknowledged only in the second
        // case (its entry is over; the re-driven job has a new one).
        tracing::warn!(job = %job.id, "its notification's lease was lost while sending; left to its new holder");
        let now = store.get(&job.id).await?;
        Ok(now.is_none_or(|j| j.redrives != notifier.round))
    }

    /// Sends `job`'s webhook to `url` (a job's own URL checked against internal addresses
    /// unless they are allowed), signed with `secret`: every try.
    async fn send_webhook(
        &self,
        job: &super::Job,
        url: &str,
        secret: Option<&crate::secret::SecretString>,
        policy: &Policy,
    ) -> Vec<super::Delivery> {
        let allow = self.jobs.allow_internal_webhooks;
        let tenants_url = job.notify.webhook.is_some();
        if tenants_url && super::address::check(url, allow).is_err() {
            tracing::warn!(job = %job.id, "webhook not sent: its URL points at an internal address");
            return vec![super::Delivery {
                at_ms: now_ms(),
                channel: Channel::Webhook,
                outcome: "refused_address".to_owned(),
            }];
        }
        let http = if tenants_url && !allow {
            &self.guarded_http
        } else {
            &self.http
        };
        webhook::deliver(http, url, secret, policy.retry, job).await
    }
}

/// Runs `work`, calling `renew` every `every` (the first after `every`): `Some` with its
/// output, or `None` (the work dropped) once `renew` says the lease is no longer held. The
/// work is looked at first, and once more after a renewal refused: recording the last
/// channel ends the lease, so a renewal that went out just after that record is refused
/// although nothing was lost (the record's reply, ahead of the renewal's on the connection,
/// has completed the work by then).
async fn renewing<T, R>(
    every: Duration,
    work: impl std::future::Future<Output = T>,
    mut renew: impl FnMut() -> R,
) -> Option<T>
where
    R: std::future::Future<Output = bool>,
{
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            out = &mut work => return Some(out),
            _ = tick.tick() => if !renew().await {
                return tokio::select! {
                    biased;
                    out = &mut work => Some(out),
                    () = std::future::ready(()) => None,
                };
            },
        }
    }
}

impl super::Job {
    /// The delay before this job's next attempt under `policy`, or `None` when its
    /// attempts (its own `max_attempts`, fixed when queued) are spent.
    fn max_attempts_backoff(&self, policy: &Policy) -> Option<Duration> {
        let mut backoff = policy.retry;
        backoff.max_attempts = self.max_attempts;
        backoff.after(self.attempts)
    }
}

/// When a job refused for capacity (`wait`: when to look again) tries again without spending
/// an attempt: its attempt is given back and counted as a deferral, up to
/// [`super::MAX_DEFERRALS`]; the wait is within [1 s, 60 s]. `None`: not a refusal for
/// capacity, or deferred too often (the refusal then counts as an attempt).
fn deferral(job: &mut super::Job, wait: Option<Duration>) -> Option<Duration> {
    let wait = wait?;
    if job.deferrals >= super::MAX_DEFERRALS {
        return None;
    }
    job.deferrals += 1;
    job.attempts = job.attempts.saturating_sub(1);
    Some(wait.clamp(Duration::from_secs(1), Duration::from_secs(60)))
}

/// Where `job`'s webhook goes and what signs it: the job's own URL, else its tier's when
/// the tier notifies by webhook; the tier's signing secret.
pub fn webhook_target(
    job: &super::Job,
    config: &Config,
) -> Option<(String, Option<crate::secret::SecretString>)> {
    let tier = config
        .tier_queue
        .as_ref()
        .and_then(|tq| tq.spec.tiers.iter().find(|t| t.name == job.tier))
        .and_then(|t| t.async_.as_ref());
    let tier_url = tier
        .filter(|a| {
            a.notify
                .contains(&floodgate_crds::tier::NotifyChannel::Webhook)
        })
        .and_then(|a| a.webhook.as_ref())
        .map(|w| w.url.clone());
    let url = job.notify.webhook.clone().or(tier_url)?;
    Some((url, config.webhook_secrets.get(&job.tier).cloned()))
}

/// Whether `tier` has webhook settings (`async.webhook`): a job of it may give its own URL,
/// signed by their `signingSecretRef`.
pub fn tier_has_webhook(config: &Config, tier: &str) -> bool {
    config
        .tier_queue
        .as_ref()
        .and_then(|tq| tq.spec.tiers.iter().find(|t| t.name == tier))
        .and_then(|t| t.async_.as_ref())
        .is_some_and(|a| a.webhook.is_some())
}

/// Where `job`'s email goes and through which server: the job's own address, else its
/// tier's `async.email.to` when the tier notifies by email (not for a Batch API line: one
/// mail per line is not what a person wants), through its tier's SMTP settings.
pub fn email_target(job: &super::Job, config: &Config) -> Option<(String, super::email::Smtp)> {
    let tier_to = || {
        config
            .tier_queue
            .as_ref()?
            .spec
            .tiers
            .iter()
            .find(|t| t.name == job.tier)?
            .async_
            .as_ref()
            .filter(|a| {
                a.notify
                    .contains(&floodgate_crds::tier::NotifyChannel::Email)
            })?
            .email
            .as_ref()?
            .to
            .clone()
            .filter(|_| job.batch.is_none())
    };
    let to = job.notify.email.clone().or_else(tier_to)?;
    let smtp = config.email.get(&job.tier)?.clone();
    Some((to, smtp))
}

#[cfg(test)]
mod deferral_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_that_ends_during_a_refused_renewal_is_over_not_lost() {
        // The last channel's record ends the lease: the renewal sent after it is refused,
        // and by then the record has come back.
        let (recorded, record) = tokio::sync::oneshot::channel::<()>();
        let mut recorded = Some(recorded);
        let renew = || {
            if let Some(r) = recorded.take() {
                let _ = r.send(());
            }
            async { false }
        };
        let work = async { record.await.is_ok() };
        assert_eq!(
            renewing(Duration::from_secs(1), work, renew).await,
            Some(true)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn work_still_going_when_its_lease_is_lost_is_dropped_at_the_renewal() {
        let started = tokio::time::Instant::now();
        let renewals = std::cell::Cell::new(0);
        let renew = || {
            renewals.set(renewals.get() + 1);
            let held = renewals.get() < 3;
            async move { held }
        };
        let work = std::future::pending::<()>();
        assert_eq!(renewing(Duration::from_secs(1), work, renew).await, None);
        assert_eq!(renewals.get(), 3);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn a_refusal_for_capacity_gives_the_attempt_back_until_the_deferrals_run_out() {
        let mut job = super::super::Job::new(
            None,
            "free".to_owned(),
            serde_json::json!({"model": "m", "messages": []}),
            3,
        );
        job.attempts = 1;
        // Not for capacity: nothing deferred.
        assert_eq!(deferral(&mut job, None), None);
        assert_eq!((job.attempts, job.deferrals), (1, 0));
        // For capacity: the attempt is given back; the wait within [1 s, 60 s].
        assert_eq!(
            deferral(&mut job, Some(Duration::from_millis(10))),
            Some(Duration::from_secs(1))
        );
        assert_eq!((job.attempts, job.deferrals), (0, 1));
        job.attempts = 1;
        assert_eq!(
            deferral(&mut job, Some(Duration::from_secs(600))),
            Some(Duration::from_secs(60))
        );
        // The last deferral allowed, then refusals count as attempts.
        job.deferrals = super::super::MAX_DEFERRALS - 1;
        job.attempts = 1;
        assert!(deferral(&mut job, Some(Duration::from_secs(5))).is_some());
        job.attempts = 1;
        assert_eq!(deferral(&mut job, Some(Duration::from_secs(5))), None);
        assert_eq!(job.attempts, 1);
    }
}
