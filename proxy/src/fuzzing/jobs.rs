//! The async doors' parsers: a `POST /v1/files` upload (multipart, then the JSONL lines of
//! its file) and a `POST /v1/jobs` body (the job, its notification addresses, and the job as
//! the store keeps it).

use crate::jobs::{Job, address, batch, email};
use crate::providers::estimate_prompt_tokens;
use crate::server::batches::{multipart, parse_line};
use crate::server::jobs::parse_job;

/// The boundary of the bodies this target builds.
const BOUNDARY: &str = "fuzz-b0undary";

/// `POST /v1/files`: the input's first line is the boundary (as the `Content-Type` header
/// gives it), the rest the body. Every part read lies inside the body, and the lines of a
/// `file` part parse as the batch door parses them. Then the input as a file's content in a
/// body built around it: it reads back as exactly the two parts sent, unless it holds the
/// delimiter itself. And the input as the content of a file: its lines.
pub fn batch_upload(data: &[u8]) {
    let (boundary, body) = match memchr::memchr(b'\n', data) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let boundary = String::from_utf8_lossy(boundary);
    let boundary = boundary.trim_end_matches('\r');
    let _ = batch::parse_window(boundary);
    if let Some(parts) = multipart(body, boundary) {
        for part in &parts {
            let (whole, inside) = (body.as_ptr_range(), part.data.as_ptr_range());
            assert!(
                whole.start <= inside.start && inside.end <= whole.end,
                "a part's data is not inside the body"
            );
            if part.name == "file"
                && let Ok(text) = std::str::from_utf8(part.data)
            {
                lines(text);
            }
        }
    }
    reads_back(data);
    if let Ok(text) = std::str::from_utf8(data) {
        lines(text);
    }
}

/// A body with a `purpose` part and `file` as the `file` part reads back as those two parts.
fn reads_back(file: &[u8]) {
    let delimiter = format!("--{BOUNDARY}");
    if memchr::memmem::find(file, delimiter.as_bytes()).is_some() {
        return;
    }
    let mut body = format!(
        "{delimiter}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         {delimiter}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n{delimiter}--\r\n").as_bytes());
    let parts = multipart(&body, BOUNDARY);
    let same = parts.as_ref().is_some_and(|p| {
        p.len() == 2
            && (p[0].name.as_str(), p[0].data) == ("purpose", &b"batch"[..])
            && (p[1].name.as_str(), p[1].data) == ("file", file)
            && p[1].filename.as_deref() == Some("in.jsonl")
    });
    assert!(same, "a built multipart body does not read back as sent");
}

/// Each line of a batch file as the batch door reads it: a line it accepts is a chat request
/// to the batch endpoint whose body the worker reads back the same.
fn lines(text: &str) {
    for (n, line) in text.lines().enumerate() {
        let Ok((line, req)) = parse_line(n, line, batch::ENDPOINT) else {
            continue;
        };
        assert_eq!(line.url, batch::ENDPOINT);
        let again = serde_json::from_value(line.body.clone()).ok();
        assert_eq!(
            again.as_ref(),
            Some(&req),
            "a line's body reads back otherwise"
        );
        let _ = estimate_prompt_tokens(&req);
    }
}

/// `POST /v1/jobs`: the body, its notification addresses (a webhook URL refused for an
/// internal host stays refused once normalised, and what the strict check accepts the
/// lenient one does too), and the job as the store keeps it, which reads back the same.
pub fn job_request(data: &[u8]) {
    let Ok((new, req)) = parse_job(data) else {
        return;
    };
    let _ = estimate_prompt_tokens(&req);
    if let Some(to) = &new.notify.email {
        let _ = email::valid_address(to);
    }
    if let Some(url) = &new.notify.webhook {
        webhook_url(url);
    }
    let mut job = Job::new(Some("tenant".to_owned()), "tier".to_owned(), new.request, 3);
    job.notify = new.notify;
    job.metadata = new.metadata;
    super::requests::assert_round_trips(&job, "a job");
}

fn webhook_url(url: &str) {
    let strict = address::check(url, false);
    assert!(
        strict.is_err() || address::check(url, true).is_ok(),
        "a webhook URL passes the strict check only"
    );
    // The client sends to the URL as parsed and written back: it must be judged the same.
    if let Ok(parsed) = reqwest::Url::parse(url) {
        assert_eq!(
            address::check(parsed.as_str(), false).is_ok(),
            strict.is_ok(),
            "a webhook URL is judged otherwise once normalised: {}",
            parsed.as_str()
        );
    }
}
