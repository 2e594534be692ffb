//! The OpenAI Batch API on top of jobs: an uploaded JSONL file of chat requests becomes one
//! job per line, run in a batch-class tier (the capacity the interactive tiers leave idle,
//! any provider of the pool).
//!
//! A batch is created whole or not at all ([`create`], one store step). The store keeps its
//! state beside its lines (phase, lines left, answered, failed), changed by the same atomic
//! step that ends, cancels or re-drives a line; a read ([`view`]) is its record and that
//! state, one store call whatever its size. A batch ends ([`end`]) when its last line is
//! over (`completed`, or `cancelled` after a cancel) or when its completion window passes
//! (`expired`: the lines not over are cancelled, never run); the store decides which, once,
//! by a compare-and-set to `finalizing`, and whoever won builds the output file (the
//! answered lines) and the error file (the others) and closes it. The worker that ends the
//! last line does it at once; [`sweep`], run by every replica every [`SWEEP_EVERY`], does it
//! for a batch whose window has passed, and for one whose ender or canceller died on the way
//! (after the store's lease: the claim visibility timeout in Redis). So a batch ends on time
//! whether or not anyone reads it. A cancel ([`cancel`]) is a compare-and-set too: it never
//! lands on a batch that has begun to end. Files and batches are kept in the job store
//! ([`JobStore::put`]) for [`KEEP`].

use super::store::{BatchState, JobStore, Outcome, Phase, Result};
use super::{Job, Status, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

/// The one endpoint a batch may run.
pub const ENDPOINT: &str = "/v1/chat/completions";

/// How often each replica looks for batches due ([`sweep`]).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long files and batches are kept.
pub const KEEP: Duration = Duration::from_secs(30 * 86_400);

/// A file as `GET /v1/files/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileObject {
    /// `file-<hex>`.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// As uploaded.
    pub filename: String,
    /// `batch`, `batch_output`.
    pub purpose: String,
    /// Always `processed`.
    pub status: String,
}

/// A stored file: its tenant, its description and its content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredFile {
    /// The tenant that may read it.
    pub tenant: Option<String>,
    /// Its description.
    pub file: FileObject,
    /// Its content (UTF-8 JSONL).
    pub content: String,
}

/// How many lines ended how.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Lines in all.
    pub total: u64,
    /// Answered.
    pub completed: u64,
    /// Failed, cancelled or expired.
    pub failed: u64,
}

/// A batch as `GET /v1/batches/{id}` shows it (OpenAI's `Batch`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    /// `batch_<hex>`.
    pub id: String,
    /// Always `batch`.
    pub object: String,
    /// `/v1/chat/completions`.
    pub endpoint: String,
    /// Always null (bad lines are refused at creation).
    pub errors: Option<Value>,
    /// The uploaded file.
    pub input_file_id: String,
    /// As asked, e.g. `24h`.
    pub completion_window: String,
    /// `in_progress`, `finalizing`, `completed`, `expired`, `cancelling`, `cancelled`.
    pub status: String,
    /// Answered lines, once over.
    pub output_file_id: Option<String>,
    /// Failed lines, once over.
    pub error_file_id: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub in_progress_at: Option<u64>,
    /// Unix seconds: the end of the completion window.
    pub expires_at: Option<u64>,
    /// Unix seconds.
    pub finalizing_at: Option<u64>,
    /// Unix seconds.
    pub completed_at: Option<u64>,
    /// Unix seconds.
    pub failed_at: Option<u64>,
    /// Unix seconds.
    pub expired_at: Option<u64>,
    /// Unix seconds.
    pub cancelling_at: Option<u64>,
    /// Unix seconds.
    pub cancelled_at: Option<u64>,
    /// Lines by outcome.
    pub request_counts: Counts,
    /// The caller's.
    pub metadata: Option<Value>,
}

impl Batch {
    /// A batch of `total` lines over file `input_file_id`, in progress from now, its window
    /// `window` (asked as `completion_window`).
    pub fn new(
        id: String,
        input_file_id: String,
        completion_window: String,
        window: Duration,
        total: u64,
        metadata: Option<Value>,
    ) -> Batch {
        let now = now_ms() / 1000;
        Batch {
            id,
            object: "batch".to_owned(),
            endpoint: ENDPOINT.to_owned(),
            errors: None,
            input_file_id,
            completion_window,
            status: Phase::InProgress.as_str().to_owned(),
            output_file_id: None,
            error_file_id: None,
            created_at: now,
            in_progress_at: Some(now),
            expires_at: Some(now + window.as_secs()),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: Counts {
                total,
                ..Counts::default()
            },
            metadata,
        }
    }
}

/// A stored batch: its tenant, the batch, and its lines' custom ids and jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredBatch {
    /// The tenant that may read it.
    pub tenant: Option<String>,
    /// The batch.
    pub batch: Batch,
    /// (custom_id, job id) per line, in file order. Stored apart ([`lines_key`]), so that a
    /// read of the batch does not carry them; read here from records stored before that.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<(String, String)>,
    /// The ids its output and error files get when it ends, chosen when it is created, so
    /// that every replica finishing it writes the same files.
    #[serde(default)]
    pub file_ids: Option<(String, String)>,
}

/// The completion window `24h` (or `<n>h`, `<n>m`, `<n>s`, at most 30 days) as a duration.
pub fn parse_window(w: &str) -> Option<Duration> {
    let unit = w.chars().last()?;
    let n: u64 = w[..w.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        'h' => n.checked_mul(3600)?,
        'm' => n.checked_mul(60)?,
        's' => n,
        _ => return None,
    };
    // Its lines are kept until the batch ends, for at most the files' retention.
    (secs > 0 && secs <= KEEP.as_secs()).then(|| Duration::from_secs(secs))
}

/// One line of an input file.
#[derive(Debug, Deserialize)]
pub struct Line {
    /// The caller's id for the line.
    pub custom_id: String,
    /// `POST`.
    pub method: String,
    /// `/v1/chat/completions`.
    pub url: String,
    /// The chat request.
    pub body: Value,
}

/// A fresh id: `prefix` + 12 random bytes in hex.
pub fn new_id(prefix: &str) -> String {
    let id = super::new_id();
    format!("{prefix}{}", &id[4..28])
}

/// Store key of a file.
pub fn file_key(id: &str) -> String {
    format!("file:{id}")
}

/// Store key of a batch.
pub fn batch_key(id: &str) -> String {
    format!("batch:{id}")
}

/// Store key of a batch's lines.
pub fn lines_key(id: &str) -> String {
    format!("batch-lines:{id}")
}

/// Stores `file`.
pub async fn save_file(store: &impl JobStore, file: &StoredFile) -> Result<()> {
    store
        .put(&file_key(&file.file.id), serde_json::to_string(file)?, KEEP)
        .await
}

/// Stores batch `stored` (in progress, its `lines` given) and queues `jobs`, its lines, in
/// one store step: all of it or, on a failure or past `bound` (the tenant's pending jobs,
/// its lines counted; 0: none), none. Its window ends `window` from now.
pub async fn create(
    store: &impl JobStore,
    mut stored: StoredBatch,
    jobs: Vec<Job>,
    window: Duration,
    bound: u64,
) -> Result<super::Created> {
    let lines = serde_json::to_string(&std::mem::take(&mut stored.lines))?;
    let record = serde_json::to_string(&stored)?;
    store
        .create_batch(&stored.batch.id, record, lines, jobs, window, bound)
        .await
}

/// Batch `id` as it stands: its record with, while it runs, its state (status, counts): one
/// store read whatever its size. `None` when unknown.
pub async fn view(store: &impl JobStore, id: &str) -> Result<Option<StoredBatch>> {
    let Some((raw, state)) = store.batch(id).await? else {
        return Ok(None);
    };
    let mut stored: StoredBatch = serde_json::from_str(&raw)?;
    if let Some(s) = state {
        let b = &mut stored.batch;
        b.status = s.phase.as_str().to_owned();
        b.request_counts = Counts {
            total: s.total,
            completed: s.completed,
            failed: s.failed,
        };
        b.cancelling_at = s.cancelling_at;
        b.finalizing_at = s.finalizing_at;
    }
    Ok(Some(stored))
}

/// Cancels batch `id`: moves it from in progress to cancelling in one compare-and-set, then
/// cancels its lines, and ends it (`cancelled`) once they are over. `None` when it is
/// cancelled (or was being cancelled already); else the status that refuses it: a batch
/// that has begun to end, or has ended, is left as it is (OpenAI answers 409).
pub async fn cancel(store: &impl JobStore, id: &str) -> Result<Option<String>> {
    match store.cancel_batch(id, now_ms() / 1000).await? {
        Some(s) if s.phase == Phase::Cancelling => {
            cancel_lines(store, &read_lines(store, id).await?).await?;
            end(store, id).await?;
            Ok(None)
        }
        Some(s) => Ok(Some(s.phase.as_str().to_owned())),
        None => Ok(Some(
            view(store, id)
                .await?
                .map_or_else(|| "unknown".to_owned(), |b| b.batch.status),
        )),
    }
}

/// Ends batch `id` if its time has come (its last line is over, its window has passed, or
/// its previous holder's lease has), and if this caller wins it: cancels the lines not over
/// of a batch expired (or of one whose canceller died), builds its files and closes it.
/// Called by the worker that ends one of its lines, by [`cancel`] and by [`sweep`]. Whether
/// it closed the batch now.
pub async fn end(store: &impl JobStore, id: &str) -> Result<bool> {
    let at = now_ms() / 1000;
    let Some(mut state) = store.end_batch(id, at).await? else {
        return Ok(false);
    };
    if state.phase == Phase::Cancelling && state.owned {
        // Its canceller stopped before every line was cancelled.
        cancel_lines(store, &read_lines(store, id).await?).await?;
        match store.end_batch(id, at).await? {
            Some(s) => state = s,
            None => return Ok(false),
        }
    }
    match state.phase {
        Phase::Finalizing(outcome) if state.owned => finalize(store, id, outcome, &state).await,
        _ => Ok(false),
    }
}

/// Ends every batch due ([`JobStore::due_batches`]): past its window, or left by a holder
/// presumed dead. Run by every replica every [`SWEEP_EVERY`]. How many it closed; a batch
/// that cannot be ended is logged and looked at again after the lease.
pub async fn sweep(store: &impl JobStore) -> Result<usize> {
    let mut closed = 0;
    for id in store.due_batches().await? {
        match end(store, &id).await {
            Ok(true) => {
                closed += 1;
                tracing::info!(batch = %id, "batch over: its files are stored");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(batch = %id, error = %e, "cannot end a batch due; it is tried again")
            }
        }
    }
    Ok(closed)
}

/// Batch `id`'s lines, (custom_id, job id) in file order.
async fn read_lines(store: &impl JobStore, id: &str) -> Result<Vec<(String, String)>> {
    match store.fetch(&lines_key(id)).await? {
        Some(raw) => Ok(serde_json::from_str(&raw)?),
        None => Ok(Vec::new()),
    }
}

/// Cancels every line not over (a no-op for the others).
async fn cancel_lines(store: &impl JobStore, lines: &[(String, String)]) -> Result<()> {
    for (_, job) in lines {
        store.cancel(job).await?;
    }
    Ok(())
}

/// Builds batch `id`'s files (it ends as `outcome`; `state` as it began to end) from its
/// lines' jobs, stores them, and closes it. Two holders finishing it at once (the first one
/// past its lease) write the same files: their ids were chosen at creation and every line
/// is over. Whether this one closed it.
async fn finalize(
    store: &impl JobStore,
    id: &str,
    outcome: Outcome,
    state: &BatchState,
) -> Result<bool> {
    let Some(raw) = store.fetch(&batch_key(id)).await? else {
        return Ok(false);
    };
    let mut stored: StoredBatch = serde_json::from_str(&raw)?;
    let lines = match std::mem::take(&mut stored.lines) {
        lines if lines.is_empty() => read_lines(store, id).await?,
        lines => lines,
    };
    let mut jobs: Vec<Option<Job>> = Vec::with_capacity(lines.len());
    for (_, job_id) in &lines {
        let mut job = store.get(job_id).await?;
        if outcome == Outcome::Expired && job.as_ref().is_some_and(|j| !j.status.is_terminal()) {
            // Not over within its window: it never runs now.
            job = store.cancel(job_id).await?;
        }
        jobs.push(job);
    }
    let (output, errors, counts) = build(&lines, &jobs, outcome);
    let now = now_ms() / 1000;
    let (output_id, error_id) = stored
        .file_ids
        .clone()
        .unwrap_or_else(|| (new_id("file-"), new_id("file-")));
    let b = &mut stored.batch;
    for (content, file_id, slot) in [
        (output, output_id, &mut b.output_file_id),
        (errors, error_id, &mut b.error_file_id),
    ] {
        if content.is_empty() {
            continue;
        }
        let file = StoredFile {
            tenant: stored.tenant.clone(),
            file: FileObject {
                id: file_id,
                object: "file".to_owned(),
                bytes: content.len() as u64,
                created_at: now,
                filename: format!("{}_output.jsonl", b.id),
                purpose: "batch_output".to_owned(),
                status: "processed".to_owned(),
            },
            content,
        };
        save_file(store, &file).await?;
        *slot = Some(file.file.id);
    }
    b.status = outcome.as_str().to_owned();
    b.request_counts = counts;
    b.cancelling_at = state.cancelling_at;
    b.finalizing_at = Some(state.finalizing_at.unwrap_or(now));
    match outcome {
        Outcome::Completed => b.completed_at = Some(now),
        Outcome::Expired => b.expired_at = Some(now),
        Outcome::Cancelled => b.cancelled_at = Some(now),
    }
    store.close_batch(id, serde_json::to_string(&stored)?).await
}

/// The output file (answered lines), the error file (the others: a failed line with its own
/// error, a line that did not run with the batch's reason) and the counts.
fn build(
    lines: &[(String, String)],
    jobs: &[Option<Job>],
    outcome: Outcome,
) -> (String, String, Counts) {
    let (reason, message) = match outcome {
        Outcome::Expired => (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        ),
        Outcome::Cancelled => (
            "batch_cancelled",
            "The batch was cancelled before this request ran.",
        ),
        Outcome::Completed => (
            "job_failed",
            "The request did not run: its job was cancelled.",
        ),
    };
    let (mut output, mut errors) = (String::new(), String::new());
    let mut counts = Counts {
        total: lines.len() as u64,
        ..Counts::default()
    };
    for ((custom_id, job_id), job) in lines.iter().zip(jobs) {
        let id = format!("batch_req_{}", job_id.trim_start_matches("job_"));
        let line = match job {
            Some(j) if j.status == Status::Completed => {
                counts.completed += 1;
                output.push_str(
                    &json!({"id": id, "custom_id": custom_id, "error": null,
                        "response": {"status_code": 200, "request_id": job_id, "body": j.result}})
                    .to_string(),
                );
                output.push('\n');
                continue;
            }
            Some(Job {
                status: Status::Failed,
                error: Some(e),
                ..
            }) => json!({"code": e.code, "message": e.message}),
            _ => json!({"code": reason, "message": message}),
        };
        counts.failed += 1;
        errors.push_str(
            &json!({"id": id, "custom_id": custom_id, "response": null, "error": line}).to_string(),
        );
        errors.push('\n');
    }
    (output, errors, counts)
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod batch_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_windows() {
        assert_eq!(parse_window("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_window("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_window("0h"), None);
        assert_eq!(parse_window("h"), None);
        assert_eq!(parse_window("24d"), None);
        assert_eq!(parse_window("720h"), Some(KEEP));
        assert_eq!(parse_window("721h"), None);
        assert_eq!(parse_window(""), None);
        // A multi-byte last character is a unit it does not know, not a panic.
        assert_eq!(parse_window("24é"), None);
    }
}
