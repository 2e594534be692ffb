//! Batches in the in-memory store, on a paused clock: ended by their last line, by their
//! window, by a cancel, and by the sweep when whoever should have ended them stopped.

use super::*;
use crate::jobs::JobError;
use crate::jobs::memory::{LEASE, MemoryStore};
use crate::jobs::store::{Claim, Step};
use crate::jobs::tests::policy;

const ID: &str = "batch_test";
const WINDOW: Duration = Duration::from_secs(3600);

/// A batch of lines `custom_ids` created in `store`, its window `window`; its lines' jobs.
async fn created(store: &MemoryStore, custom_ids: &[&str], window: Duration) -> Vec<Job> {
    let jobs: Vec<Job> = custom_ids
        .iter()
        .map(|_| {
            let request =
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
            let mut j = Job::new(Some("acme".to_owned()), "free".to_owned(), request, 3);
            j.batch = Some(ID.to_owned());
            j
        })
        .collect();
    let stored = StoredBatch {
        tenant: Some("acme".to_owned()),
        batch: Batch::new(
            ID.to_owned(),
            "file-in".to_owned(),
            format!("{}s", window.as_secs()),
            window,
            jobs.len() as u64,
            None,
        ),
        lines: custom_ids
            .iter()
            .zip(&jobs)
            .map(|(c, j)| ((*c).to_owned(), j.id.clone()))
            .collect(),
        file_ids: Some(("file-out".to_owned(), "file-err".to_owned())),
    };
    create(store, stored, jobs, window, 0)
        .await
        .unwrap()
        .queued()
        .unwrap()
}

/// Claims the next line and writes it over as `status` (an answer, or an error); `false` if
/// the store refused (the line was over already).
async fn run_line(store: &MemoryStore, status: Status) -> (Claim, bool) {
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    let written = finish(store, &claim, status).await;
    (claim, written)
}

async fn finish(store: &MemoryStore, claim: &Claim, status: Status) -> bool {
    let mut over = claim.job.clone();
    over.status = status;
    over.result = (status == Status::Completed).then(|| json!({"answer": over.id}));
    over.error = (status == Status::Failed).then(|| JobError {
        code: "upstream_server_error".to_owned(),
        message: "503".to_owned(),
    });
    store
        .save(claim, &over, Step::Finish, &policy())
        .await
        .unwrap()
}

async fn status(store: &MemoryStore) -> String {
    view(store, ID).await.unwrap().unwrap().batch.status
}

/// (custom_id, error code) of each line of file `id`, or (custom_id, "") for an answer.
async fn file_lines(store: &MemoryStore, id: Option<&str>) -> Vec<(String, String)> {
    let Some(id) = id else { return Vec::new() };
    let raw = store.fetch(&file_key(id)).await.unwrap().unwrap();
    let file: StoredFile = serde_json::from_str(&raw).unwrap();
    file.content
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
            (v["custom_id"].as_str().unwrap().to_owned(), code)
        })
        .collect()
}

/// Advances the clock by `wait`: the sweep closes nothing a millisecond before, one batch
/// exactly then.
async fn swept_exactly_after(store: &MemoryStore, wait: Duration) {
    tokio::time::advance(wait - Duration::from_millis(1)).await;
    assert_eq!(sweep(store).await.unwrap(), 0, "not a moment early");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(sweep(store).await.unwrap(), 1, "due exactly then");
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_ended_by_its_last_line_and_its_files_outlive_the_lines_results() {
    let store = MemoryStore::new();
    created(&store, &["a", "b", "c"], WINDOW).await;
    // Line a completes, line b fails: the batch runs on; its counts are read as they are.
    assert!(run_line(&store, Status::Completed).await.1);
    assert!(!end(&store, ID).await.unwrap());
    assert!(run_line(&store, Status::Failed).await.1);
    assert!(!end(&store, ID).await.unwrap());
    let running = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(running.status, "in_progress");
    assert_eq!(
        running.request_counts,
        Counts {
            total: 3,
            completed: 1,
            failed: 1
        }
    );
    // Line c is cancelled by its caller: the last line over ends the batch, at once, once.
    let last = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    store.cancel(&last.job.id).await.unwrap();
    assert!(end(&store, ID).await.unwrap());
    assert!(!end(&store, ID).await.unwrap(), "ended once");
    let ended = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(ended.status, "completed");
    assert_eq!(
        ended.request_counts,
        Counts {
            total: 3,
            completed: 1,
            failed: 2
        }
    );
    assert_eq!(ended.output_file_id.as_deref(), Some("file-out"));
    assert_eq!(ended.error_file_id.as_deref(), Some("file-err"));
    // Past the lines' result TTL their jobs are gone; the files are not.
    tokio::time::advance(crate::jobs::CANCELLED_KEPT.max(policy().result_ttl)).await;
    assert!(store.get(&last.job.id).await.unwrap().is_none());
    assert_eq!(
        file_lines(&store, Some("file-out")).await,
        pairs(&[("a", "")])
    );
    assert_eq!(
        file_lines(&store, Some("file-err")).await,
        pairs(&[("b", "upstream_server_error"), ("c", "job_failed")])
    );
    assert_eq!(status(&store).await, "completed");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_with_a_stale_view_never_overwrites_a_batch_that_ended() {
    let store = MemoryStore::new();
    created(&store, &["a", "b"], WINDOW).await;
    // The canceller reads the batch (its tenant check): in progress.
    let stale = view(&store, ID).await.unwrap().unwrap();
    assert_eq!(stale.batch.status, "in_progress");
    // Meanwhile its last line completes and the worker ends it.
    run_line(&store, Status::Completed).await;
    run_line(&store, Status::Completed).await;
    assert!(end(&store, ID).await.unwrap());
    // The cancel arrives: refused with the status that forbids it; the batch is untouched.
    assert_eq!(
        cancel(&store, ID).await.unwrap().as_deref(),
        Some("completed")
    );
    let now = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(now.status, "completed");
    assert_eq!((now.cancelling_at, now.cancelled_at), (None, None));
    assert_eq!(now.output_file_id.as_deref(), Some("file-out"));
    assert_eq!(now.request_counts.completed, 2);

    // Begun to end (finalizing) is refused too: a cancel never lands on a batch ending.
    let store = MemoryStore::new();
    created(&store, &["a"], WINDOW).await;
    run_line(&store, Status::Completed).await;
    let ending = store.end_batch(ID, 0).await.unwrap().unwrap();
    assert!(matches!(
        ending.phase,
        Phase::Finalizing(Outcome::Completed)
    ));
    assert_eq!(
        cancel(&store, ID).await.unwrap().as_deref(),
        Some("finalizing")
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_batch_keeps_its_answers_and_ends_cancelled_once_its_lines_are_over() {
    let store = MemoryStore::new();
    created(&store, &["a", "b", "c"], WINDOW).await;
    run_line(&store, Status::Completed).await;
    // Line b runs when the batch is cancelled; line c is still queued.
    let running = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(cancel(&store, ID).await.unwrap(), None);
    // Cancelling the lines ended every one: the batch is cancelled at once.
    let ended = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(ended.status, "cancelled");
    assert!(ended.cancelling_at.is_some() && ended.cancelled_at.is_some());
    // Line b's answer comes too late: the store refuses it.
    assert!(!finish(&store, &running, Status::Completed).await);
    assert_eq!(
        file_lines(&store, ended.output_file_id.as_deref()).await,
        pairs(&[("a", "")])
    );
    assert_eq!(
        file_lines(&store, ended.error_file_id.as_deref()).await,
        pairs(&[("b", "batch_cancelled"), ("c", "batch_cancelled")])
    );
    // A second cancel is refused: the batch has ended.
    assert_eq!(
        cancel(&store, ID).await.unwrap().as_deref(),
        Some("cancelled")
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_expires_exactly_at_the_end_of_its_window_without_being_read() {
    let store = MemoryStore::new();
    let window = Duration::from_secs(60);
    created(&store, &["a", "b", "c", "d"], window).await;
    // a answered, b failed, c running, d queued when the window ends.
    run_line(&store, Status::Completed).await;
    run_line(&store, Status::Failed).await;
    let running = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    swept_exactly_after(&store, window).await;
    let ended = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(ended.status, "expired");
    assert!(ended.expired_at.is_some());
    assert_eq!(
        ended.request_counts,
        Counts {
            total: 4,
            completed: 1,
            failed: 3
        }
    );
    // What ran is in the output; a failure keeps its own error; the rest expired.
    assert_eq!(
        file_lines(&store, ended.output_file_id.as_deref()).await,
        pairs(&[("a", "")])
    );
    assert_eq!(
        file_lines(&store, ended.error_file_id.as_deref()).await,
        pairs(&[
            ("b", "upstream_server_error"),
            ("c", "batch_expired"),
            ("d", "batch_expired")
        ])
    );
    // The unfinished lines never run: the running one's answer is refused, the queued one
    // is handed over cancelled (for its caller to be told), not to be run.
    assert!(!finish(&store, &running, Status::Completed).await);
    let d = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(d.job.status, Status::Cancelled);
    assert_eq!(sweep(&store).await.unwrap(), 0, "ended once");
}

#[tokio::test(start_paused = true)]
async fn a_batch_whose_last_worker_stopped_before_ending_it_is_ended_by_the_sweep() {
    let store = MemoryStore::new();
    created(&store, &["a", "b"], WINDOW).await;
    run_line(&store, Status::Completed).await;
    // The last line's outcome is written; its worker stops before it ends the batch.
    run_line(&store, Status::Completed).await;
    // The worker's lease runs: not a moment before it ends does the sweep take it over.
    swept_exactly_after(&store, LEASE).await;
    let ended = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(ended.status, "completed");
    assert_eq!(
        file_lines(&store, ended.output_file_id.as_deref()).await,
        pairs(&[("a", ""), ("b", "")])
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_whose_canceller_stopped_is_finished_by_the_sweep() {
    let store = MemoryStore::new();
    created(&store, &["a", "b"], WINDOW).await;
    run_line(&store, Status::Completed).await;
    // The canceller moves the batch to cancelling and stops before cancelling its lines.
    let state = store.cancel_batch(ID, 0).await.unwrap().unwrap();
    assert_eq!(state.phase, Phase::Cancelling);
    assert_eq!(status(&store).await, "cancelling");
    swept_exactly_after(&store, LEASE).await;
    let ended = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(ended.status, "cancelled");
    assert_eq!(
        file_lines(&store, ended.error_file_id.as_deref()).await,
        pairs(&[("b", "batch_cancelled")])
    );
}

#[tokio::test(start_paused = true)]
async fn a_redriven_line_runs_again_in_its_batch_and_counts_once() {
    let store = MemoryStore::new();
    created(&store, &["a", "b", "c"], WINDOW).await;
    run_line(&store, Status::Completed).await;
    // Line b fails for good: dead-lettered, it counts as failed.
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    let mut dead = claim.job.clone();
    dead.status = Status::Failed;
    dead.dead_letter = true;
    assert!(
        store
            .save(&claim, &dead, Step::Finish, &policy())
            .await
            .unwrap()
    );
    let counts = view(&store, ID)
        .await
        .unwrap()
        .unwrap()
        .batch
        .request_counts;
    assert_eq!((counts.completed, counts.failed), (1, 1));
    // Re-driven, it is left again (not failed), and its success counts once.
    assert_eq!(store.redrive(Some(&claim.job.id)).await.unwrap(), 1);
    let counts = view(&store, ID)
        .await
        .unwrap()
        .unwrap()
        .batch
        .request_counts;
    assert_eq!((counts.completed, counts.failed), (1, 0));
    run_line(&store, Status::Completed).await; // c, queued before b came back
    assert!(!end(&store, ID).await.unwrap(), "b runs again");
    run_line(&store, Status::Completed).await;
    assert!(end(&store, ID).await.unwrap());
    let ended = view(&store, ID).await.unwrap().unwrap().batch;
    assert_eq!(
        ended.request_counts,
        Counts {
            total: 3,
            completed: 3,
            failed: 0
        }
    );
}
