use super::*;
use crate::autoscale::DemandSource;
use crate::fixtures;
use http::Method;
use serde_json::{Value, json};

const DAY: i64 = 86_400;
/// 2026-11-30T00:00:00Z.
const NOW: i64 = 1_796_000_000 - 1_796_000_000 % DAY;

fn pair(made: i64) -> Bundle {
    certs::generate(&["127.0.0.1".into()], made, certs::VALIDITY).unwrap()
}

#[test]
fn a_due_certificate_is_staged_then_promoted_once_its_ca_has_been_published_long_enough() {
    let old = pair(NOW - 340 * DAY);
    let stored = Stored {
        current: Some(old.clone()),
        ..Stored::default()
    };
    // Not due 31 days before expiry; due at 30.
    assert_eq!(
        plan(&stored, old.not_after - 31 * DAY, &old.ca_pem),
        Step::Keep
    );
    let due = old.not_after - 30 * DAY;
    assert_eq!(plan(&stored, due, &old.ca_pem), Step::Stage);

    let next = pair(due);
    let staged = apply(&stored, Step::Stage, Some(next.clone()), due);
    // Still served: the old pair. Published: both CAs.
    assert_eq!(staged.current, Some(old.clone()));
    assert_eq!(ca_bundle(&staged), format!("{}{}", old.ca_pem, next.ca_pem));

    // Not before the configuration carries the new CA, however long it has been staged.
    assert_eq!(plan(&staged, due + DAY, &old.ca_pem), Step::Keep);
    let both = ca_bundle(&staged);
    let wait = PROMOTE_AFTER.as_secs() as i64;
    assert_eq!(plan(&staged, due + wait - 1, &both), Step::Keep);
    assert_eq!(plan(&staged, due + wait, &both), Step::Promote);

    let promoted = apply(&staged, Step::Promote, None, due + wait);
    assert_eq!(promoted.current, Some(next.clone()));
    assert_eq!(promoted.next, None);
    // The replaced CA stays trusted for replicas that still serve the old pair.
    assert_eq!(
        ca_bundle(&promoted),
        format!("{}{}", next.ca_pem, old.ca_pem)
    );
    assert_eq!(plan(&promoted, due + wait, &both), Step::Keep);
}

#[test]
fn a_missing_or_expired_certificate_is_replaced_at_once() {
    assert_eq!(plan(&Stored::default(), NOW, ""), Step::Replace);
    let old = pair(NOW - 400 * DAY);
    let stored = Stored {
        current: Some(old.clone()),
        ..Stored::default()
    };
    assert_eq!(plan(&stored, old.not_after, &old.ca_pem), Step::Replace);
    let fresh = pair(old.not_after);
    let replaced = apply(&stored, Step::Replace, Some(fresh.clone()), old.not_after);
    assert_eq!(replaced.current, Some(fresh));
    assert_eq!(replaced.previous_ca, Some(old.ca_pem));
}

#[test]
fn the_secret_round_trips_every_part() {
    let stored = Stored {
        current: Some(pair(NOW)),
        next: Some((pair(NOW + DAY), NOW + DAY)),
        previous_ca: Some(pair(NOW - DAY).ca_pem),
    };
    assert_eq!(stored_of(&secret_of("tls", &stored)), stored);
}

/// The webhook configuration `fg` carrying `ca`, as the API server returns it.
fn configuration(ca: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "fg", "resourceVersion": "7"},
        "webhooks": [{"name": "sidecar.floodgate.dev", "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": "https://127.0.0.1:9443/mutate",
                             "caBundle": base64(ca)}}]
    })
}

fn base64(text: &str) -> String {
    serde_json::to_value(ByteString(text.as_bytes().to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn bundle_in(config: &Value) -> String {
    let b: ByteString =
        serde_json::from_value(config["webhooks"][0]["clientConfig"]["caBundle"].clone()).unwrap();
    String::from_utf8(b.0).unwrap()
}

const SECRET: &str = "/api/v1/namespaces/ops/secrets/fg-tls";
const CONFIG: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/fg";

#[tokio::test]
async fn the_served_certificate_changes_only_after_the_api_server_trusts_its_ca() {
    let old = pair(NOW - 340 * DAY);
    let due = old.not_after - 30 * DAY + 1;
    let mut secret = serde_json::to_value(secret_of(
        "fg-tls",
        &Stored {
            current: Some(old.clone()),
            ..Stored::default()
        },
    ))
    .unwrap();
    secret["metadata"]["resourceVersion"] = json!("3");

    // Pass 1: due. The next pair is staged and its CA published; the old pair is served.
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let script = {
        let (secret, old_ca) = (secret.clone(), old.ca_pem.clone());
        async move {
            api.expect(Method::GET, SECRET).await.ok(&secret);
            api.expect(Method::GET, CONFIG)
                .await
                .ok(&configuration(&old_ca));
            let written = api.expect(Method::PUT, SECRET).await;
            assert_eq!(written.body["metadata"]["resourceVersion"], "3");
            let staged = written.body.clone();
            written.echo();
            let config = api.expect(Method::PUT, CONFIG).await;
            let published = bundle_in(&config.body);
            config.echo();
            let _ = tx.send((staged, published));
            api
        }
    };
    let served = fixtures::run(
        ensure(
            &ctx.client,
            "ops",
            "fg-tls",
            &["127.0.0.1".into()],
            "fg",
            due,
        ),
        script,
    )
    .await
    .unwrap();
    assert_eq!(
        served.0, old.cert_pem,
        "the old certificate is still served"
    );
    let (staged, published) = rx.await.unwrap();
    let staged: Secret = serde_json::from_value(staged).unwrap();
    let stored = stored_of(&staged);
    let (next, staged_at) = stored.next.clone().unwrap();
    assert_eq!((stored.current.as_ref(), staged_at), (Some(&old), due));
    assert_eq!(published, format!("{}{}", old.ca_pem, next.ca_pem));

    // Pass 2, a minute later, the configuration carrying both: the staged pair is served.
    let later = due + PROMOTE_AFTER.as_secs() as i64;
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let script = {
        let staged = serde_json::to_value(&staged).unwrap();
        let (old_ca, next_ca) = (old.ca_pem.clone(), next.ca_pem.clone());
        async move {
            api.expect(Method::GET, SECRET).await.ok(&staged);
            api.expect(Method::GET, CONFIG)
                .await
                .ok(&configuration(&published));
            let written = api.expect(Method::PUT, SECRET).await;
            let promoted = stored_of(&serde_json::from_value(written.body.clone()).unwrap());
            assert_eq!(promoted.previous_ca.as_deref(), Some(old_ca.as_str()));
            written.echo();
            let config = api.expect(Method::PUT, CONFIG).await;
            assert_eq!(bundle_in(&config.body), format!("{next_ca}{old_ca}"));
            config.echo();
            api
        }
    };
    let served = fixtures::run(
        ensure(
            &ctx.client,
            "ops",
            "fg-tls",
            &["127.0.0.1".into()],
            "fg",
            later,
        ),
        script,
    )
    .await
    .unwrap();
    assert_eq!(served.0, next.cert_pem);
}
