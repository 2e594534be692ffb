//! The email a job's caller is told by when the job is over (`notify.email`).
//!
//! Sent over SMTP with STARTTLS required (`lettre`, rustls with ring): a server that does not
//! offer STARTTLS, or whose certificate does not verify against the system roots (plus the
//! tier's `caSecretRef`, for a private server), gets nothing, credentials included. The
//! server, sender and credentials are the tier's `async.email` (TierQueue); the recipient is
//! the job's `notify.email`.
//!
//! The message: subject `[floodgate] job <id> completed` (or `failed`, `cancelled`), a plain
//! text body with the job's id, outcome, attempts, the error of a failed job, and the JSON of
//! the job as `GET /v1/jobs/{id}` shows it. Its `Message-ID` is fixed by the notification
//! ([`message_id`]): every try, and a re-send by the replica that took the job over, carry
//! the same one, so a mail system or reader can drop the duplicate.
//!
//! Every try is recorded on the job (`deliveries`, channel `email`): `delivered`,
//! `smtp_<code>` (the server refused, e.g. `smtp_535` for bad credentials), or `error` (no
//! connection, TLS failed, timed out). Every failure is retried with the TierQueue's backoff:
//! a refused login may be mended by rotating the Secret, a server may come back. The
//! password is never logged: lettre logs nothing here (no `tracing` feature), and the errors
//! recorded are reduced to their SMTP code.

use super::retry::Backoff;
use super::{Delivery, Job, Status, now_ms};
use crate::secret::SecretString;
use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

/// How long one try may take (connect, STARTTLS, AUTH, DATA).
pub const TRY_TIMEOUT: Duration = Duration::from_secs(10);

/// A tier's SMTP settings, resolved (TierQueue `tiers[].async.email`).
#[derive(Clone, PartialEq)]
pub struct Smtp {
    /// Server host name (also the name its certificate must carry).
    pub host: String,
    /// Server port (587 for submission with STARTTLS).
    pub port: u16,
    /// Sender address.
    pub from: String,
    /// User name and password, when the server wants a login.
    pub credentials: Option<(String, SecretString)>,
    /// Extra trusted CA certificates (PEM), for a server with a private CA.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("from", &self.from)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("ca", &self.ca_pem.is_some())
            .finish()
    }
}

/// Splits `host:port` (an IPv6 host in brackets).
pub fn host_port(server: &str) -> Option<(String, u16)> {
    let (host, port) = server.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
}

/// Splits a credentials Secret's value, `user:password`, at its first `:`.
pub fn credentials(value: &SecretString) -> Option<(String, SecretString)> {
    let (user, password) = value.expose().split_once(':')?;
    (!user.is_empty()).then(|| (user.to_owned(), SecretString::new(password)))
}

/// Whether `address` is one email address (`user@domain`).
pub fn valid_address(address: &str) -> bool {
    address.parse::<lettre::Address>().is_ok()
}

impl Smtp {
    /// A transport for these settings: STARTTLS required, the login given, the CA trusted.
    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let mut tls = TlsParameters::builder(self.host.clone());
        if let Some(pem) = &self.ca_pem {
            let ca = Certificate::from_pem(pem.as_bytes())
                .map_err(|_| "the email CA (caSecretRef) is not a PEM certificate".to_owned())?;
            tls = tls.add_root_certificate(ca);
        }
        let tls = tls
            .build_rustls()
            .map_err(|_| "cannot set up TLS for email".to_owned())?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.host)
            .port(self.port)
            .tls(Tls::Required(tls))
            .timeout(Some(TRY_TIMEOUT));
        if let Some((user, password)) = &self.credentials {
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        Ok(builder.build())
    }
}

/// The subject and text of the email for `job`.
pub fn message_text(job: &Job) -> (String, String) {
    let outcome = match job.status {
        Status::Completed => "completed",
        Status::Cancelled => "cancelled",
        _ => "failed",
    };
    let subject = format!("[floodgate] job {} {outcome}", job.id);
    let mut text = format!(
        "Job: {}\nOutcome: {outcome}\nAttempts: {}\n",
        job.id, job.attempts
    );
    if let Some(e) = &job.error
        && job.status != Status::Completed
    {
        text.push_str(&format!("Error: {} ({})\n", e.message, e.code));
    }
    text.push_str(&format!(
        "\nThe job, as GET /v1/jobs/{} shows it:\n\n{}\n",
        job.id,
        serde_json::to_string_pretty(job).unwrap_or_default()
    ));
    (subject, text)
}

/// The `Message-ID` of `job`'s notification sent from `from`: `<` [`Job::notice_id`] `@`
/// the sender's domain `>`.
pub fn message_id(job: &Job, from: &Mailbox) -> String {
    format!("<{}@{}>", job.notice_id(), from.email.domain())
}

/// Emails `job`'s outcome to `to` through `smtp`, retrying every failure on `backoff`; every
/// try, in order.
pub async fn deliver(smtp: &Smtp, to: &str, backoff: Backoff, job: &Job) -> Vec<Delivery> {
    let mut tries = Vec::new();
    let (subject, text) = message_text(job);
    let message = match (smtp.from.parse::<Mailbox>(), to.parse::<Mailbox>()) {
        (Ok(from), Ok(to)) => Message::builder()
            .message_id(Some(message_id(job, &from)))
            .from(from)
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(text),
        _ => {
            tracing::warn!(job = %job.id, "email not sent: the sender or recipient address is not valid");
            tries.push(record("invalid_address"));
            return tries;
        }
    };
    let (message, transport) = match (message, smtp.transport()) {
        (Ok(m), Ok(t)) => (m, t),
        (Err(e), _) => {
            tracing::warn!(job = %job.id, error = %e, "email not sent: the message cannot be built");
            tries.push(record("invalid_message"));
            return tries;
        }
        (_, Err(e)) => {
            tracing::warn!(job = %job.id, error = %e, "email not sent");
            tries.push(record("invalid_settings"));
            return tries;
        }
    };
    for attempt in 1..=backoff.max_attempts {
        let outcome = match transport.send(message.clone()).await {
            Ok(_) => "delivered".to_owned(),
            // Only the code: a server's text may echo what it was sent.
            Err(e) => match e.status() {
                Some(code) => format!("smtp_{code}"),
                None => "error".to_owned(),
            },
        };
        let delivered = outcome == "delivered";
        super::metrics::get().email(if delivered { "delivered" } else { "failed" });
        tries.push(record(&outcome));
        if delivered {
            return tries;
        }
        tracing::info!(job = %job.id, attempt, outcome = %outcome, "email not delivered");
        match backoff.after(attempt) {
            Some(delay) => tokio::time::sleep(delay).await,
            None => break,
        }
    }
    tracing::warn!(job = %job.id, "email not delivered; tries spent");
    tries
}

fn record(outcome: &str) -> Delivery {
    Delivery {
        at_ms: now_ms(),
        channel: super::Channel::Email,
        outcome: outcome.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_and_credentials_are_split_where_they_should_be() {
        assert_eq!(
            host_port("smtp.example.com:587"),
            Some(("smtp.example.com".to_owned(), 587))
        );
        assert_eq!(host_port("[::1]:2525"), Some(("::1".to_owned(), 2525)));
        assert_eq!(host_port("smtp.example.com"), None);
        assert_eq!(host_port("smtp.example.com:0"), None);
        assert_eq!(host_port(":25"), None);
        let (user, password) = credentials(&SecretString::new("mailer:pa:ss")).unwrap();
        assert_eq!((user.as_str(), password.expose()), ("mailer", "pa:ss"));
        assert!(credentials(&SecretString::new("no-colon")).is_none());
        assert!(credentials(&SecretString::new(":pw")).is_none());
    }

    #[test]
    fn the_settings_debug_output_hides_the_password() {
        let smtp = Smtp {
            host: "h".to_owned(),
            port: 587,
            from: "a@b.c".to_owned(),
            credentials: Some(("u".to_owned(), SecretString::new("hunter2-pw"))),
            ca_pem: None,
        };
        assert!(!format!("{smtp:?}").contains("hunter2-pw"));
    }

    #[test]
    fn the_message_names_the_job_and_its_outcome() {
        let mut job = Job::new(None, "free".to_owned(), serde_json::json!({}), 3);
        job.status = Status::Failed;
        job.attempts = 3;
        job.error = Some(super::super::JobError {
            code: "upstream_server_error".to_owned(),
            message: "boom".to_owned(),
        });
        let (subject, text) = message_text(&job);
        assert_eq!(subject, format!("[floodgate] job {} failed", job.id));
        // One Message-ID per notification: a re-driven job's next outcome has another.
        let from: Mailbox = "Floodgate <floodgate@example.com>".parse().unwrap();
        assert_eq!(
            message_id(&job, &from),
            format!("<{}.0@example.com>", job.id)
        );
        job.reset();
        assert_eq!(
            message_id(&job, &from),
            format!("<{}.1@example.com>", job.id)
        );
        assert!(text.contains("Outcome: failed\nAttempts: 3\nError: boom (upstream_server_error)"));
    }
}
