//! The OpenAI Batch API on top of jobs: an uploaded JSONL file of chat requests becomes one
//! job per line, run in a batch-class tier (the capacity the interactive tiers leave idle,
//! any provider of the pool). The store counts the lines not over yet
//! ([`JobStore::open_batch`]); the worker that ends the last one builds the output and error
//! files and the batch's final state at once ([`settle`]), so they exist as soon as the batch
//! is over and outlive the lines' results. While it runs, a read computes its counts from its
//! jobs. Files and batches are kept in the job store ([`JobStore::put`]) for [`KEEP`].
//!
//! The completion window is honoured: a batch read after `expires_at` with lines still
//! unfinished cancels them, and ends `expired` with the finished lines in its output file and
//! the others in its error file (`batch_expired`), as OpenAI's does.

use super::store::{JobStore, Result};
use super::{Job, Status, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

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

/// A stored batch: its tenant, the batch, and its lines' custom ids and jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredBatch {
    /// The tenant that may read it.
    pub tenant: Option<String>,
    /// The batch.
    pub batch: Batch,
    /// (custom_id, job id) per line, in file order.
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

/// Stores `file`.
pub async fn save_file(store: &impl JobStore, file: &StoredFile) -> Result<()> {
    store
        .put(&file_key(&file.file.id), serde_json::to_string(file)?, KEEP)
        .await
}

/// Stores `batch`.
pub async fn save_batch(store: &impl JobStore, batch: &StoredBatch) -> Result<()> {
    store
        .put(
            &batch_key(&batch.batch.id),
            serde_json::to_string(batch)?,
            KEEP,
        )
        .await
}

/// Builds batch `id`'s files and final state if its last line is over (called by the worker
/// that ended a line): nothing while the store counts lines not over, else as [`refresh`].
/// Whether it ended the batch now.
pub async fn settle(store: &impl JobStore, id: &str) -> Result<bool> {
    if store.batch_left(id).await? > 0 {
        return Ok(false);
    }
    let Some(raw) = store.fetch(&batch_key(id)).await? else {
        return Ok(false);
    };
    let mut stored: StoredBatch = serde_json::from_str(&raw)?;
    if !refresh(store, &mut stored).await? {
        return Ok(false);
    }
    save_batch(store, &stored).await?;
    Ok(true)
}

/// Brings `stored` up to date with its jobs: counts, and once every line is over (or the
/// window has passed), the output and error files and the final status. Whether it ended
/// now (the counts alone are not worth storing: a read computes them again). Two replicas
/// ending it at once write the same files (ids chosen at creation, content from the same
/// finished jobs).
pub async fn refresh(store: &impl JobStore, stored: &mut StoredBatch) -> Result<bool> {
    let b = &stored.batch;
    if !matches!(b.status.as_str(), "in_progress" | "cancelling") {
        return Ok(false);
    }
    let now = now_ms() / 1000;
    let expired = b.status == "in_progress" && b.expires_at.is_some_and(|e| now >= e);
    let mut jobs: Vec<Option<Job>> = Vec::with_capacity(stored.lines.len());
    for (_, id) in &stored.lines {
        let mut job = store.get(id).await?;
        if expired && job.as_ref().is_some_and(|j| !j.status.is_terminal()) {
            job = store.cancel(id).await?;
        }
        jobs.push(job);
    }
    let over = |j: &Option<Job>| j.as_ref().is_none_or(|j| j.status.is_terminal());
    let counts = Counts {
        total: jobs.len() as u64,
        completed: jobs
            .iter()
            .filter(|j| j.as_ref().is_some_and(|j| j.status == Status::Completed))
            .count() as u64,
        failed: jobs
            .iter()
            .filter(|j| over(j) && !j.as_ref().is_some_and(|j| j.status == Status::Completed))
            .count() as u64,
    };
    stored.batch.request_counts = counts;
    if !jobs.iter().all(over) {
        return Ok(false);
    }
    let reason = if expired {
        "batch_expired"
    } else if stored.batch.status == "cancelling" {
        "batch_cancelled"
    } else {
        "job_failed"
    };
    let (mut output, mut errors) = (String::new(), String::new());
    for ((custom_id, job_id), job) in stored.lines.iter().zip(&jobs) {
        let id = format!("batch_req_{}", job_id.trim_start_matches("job_"));
        match job {
            Some(j) if j.status == Status::Completed => {
                let line = json!({"id": id, "custom_id": custom_id, "error": null,
                    "response": {"status_code": 200, "request_id": job_id, "body": j.result}});
                output.push_str(&line.to_string());
                output.push('\n');
            }
            other => {
                let (code, message) = match other.as_ref().and_then(|j| j.error.as_ref()) {
                    Some(e) if reason == "job_failed" => (e.code.clone(), e.message.clone()),
                    _ => (reason.to_owned(), format!("the line did not run: {reason}")),
                };
                let line = json!({"id": id, "custom_id": custom_id, "response": null,
                    "error": {"code": code, "message": message}});
                errors.push_str(&line.to_string());
                errors.push('\n');
            }
        }
    }
    let (output_id, error_id) = stored
        .file_ids
        .clone()
        .unwrap_or_else(|| (new_id("file-"), new_id("file-")));
    let b = &mut stored.batch;
    b.finalizing_at = Some(now);
    for (content, id, slot) in [
        (output, output_id, &mut b.output_file_id),
        (errors, error_id, &mut b.error_file_id),
    ] {
        if content.is_empty() {
            continue;
        }
        let file = StoredFile {
            tenant: stored.tenant.clone(),
            file: FileObject {
                id,
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
    match reason {
        "batch_expired" => {
            b.status = "expired".to_owned();
            b.expired_at = Some(now);
        }
        "batch_cancelled" => {
            b.status = "cancelled".to_owned();
            b.cancelled_at = Some(now);
        }
        _ => {
            b.status = "completed".to_owned();
            b.completed_at = Some(now);
        }
    }
    Ok(true)
}

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
