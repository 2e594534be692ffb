use super::*;

/// Requests each replica serves at once in these tests.
const P: u32 = 4;

fn policy() -> Autoscaling {
    serde_json::from_value(serde_json::json!({
        "minReplicas": 1, "maxReplicas": 8, "queueDepth": 10, "latencyMs": 2000,
        "cooldownSeconds": 300
    }))
    .unwrap()
}

fn demand(queued: u64, latency_p95_ms: u64) -> Demand {
    Demand {
        queued,
        in_flight: 0,
        latency_p95_ms,
        spilled: 0,
        reporters: 2,
    }
}

fn scaled_to(d: &Decision) -> Option<i32> {
    match d {
        Decision::Scale { to, .. } => Some(*to),
        Decision::Hold(_) => None,
    }
}

#[test]
fn doubles_over_the_queue_threshold_per_replica_up_to_max() {
    let p = policy();
    // 2 replicas x 10: 20 waiting is at the threshold, 21 is over it.
    assert_eq!(scaled_to(&decide(2, 2, P, &p, &demand(20, 0), None)), None);
    let up = decide(2, 2, P, &p, &demand(21, 0), None);
    assert_eq!(
        up,
        Decision::Scale {
            to: 4,
            reason: "scaled up 2 -> 4: 21 requests waiting, over 10 per replica x 2".into()
        }
    );
    assert_eq!(
        scaled_to(&decide(5, 5, P, &p, &demand(1000, 0), None)),
        Some(8)
    );
    let at_max = decide(8, 8, P, &p, &demand(1000, 0), None);
    assert!(
        matches!(&at_max, Decision::Hold(why) if why.contains("at maxReplicas 8")),
        "{at_max:?}"
    );
    // Up is not held by the cooldown: demand now is served now.
    assert_eq!(
        scaled_to(&decide(2, 2, P, &p, &demand(21, 0), Some(Duration::ZERO))),
        Some(4)
    );
}

#[test]
fn doubles_over_the_latency_threshold_even_with_no_queue() {
    let p = policy();
    assert_eq!(
        scaled_to(&decide(1, 1, P, &p, &demand(0, 2000), None)),
        None
    );
    let up = decide(1, 1, P, &p, &demand(0, 2001), None);
    assert_eq!(scaled_to(&up), Some(2));
    assert!(
        matches!(&up, Decision::Scale { reason, .. } if reason.contains("p95 latency 2001 ms over latencyMs 2000")),
        "{up:?}"
    );
    // Without a latency bound, latency alone never scales.
    let mut no_bound = policy();
    no_bound.latency_ms = None;
    assert_eq!(
        scaled_to(&decide(1, 1, P, &no_bound, &demand(0, 60_000), None)),
        None
    );
}

#[test]
fn does_not_double_again_before_the_last_scale_up_is_ready() {
    let held = decide(2, 1, P, &policy(), &demand(500, 0), None);
    assert!(
        matches!(&held, Decision::Hold(why) if why.contains("only 1/2 replicas are ready")),
        "{held:?}"
    );
}

#[test]
fn halves_when_the_queue_fits_at_half_the_replicas_with_room_to_spare() {
    let p = policy();
    // 8 -> 4: at most 10 x 4 / 2 = 20 waiting.
    assert_eq!(
        scaled_to(&decide(8, 8, P, &p, &demand(20, 100), None)),
        Some(4)
    );
    assert_eq!(
        scaled_to(&decide(8, 8, P, &p, &demand(21, 100), None)),
        None
    );
    // Rounded up, never under min.
    assert_eq!(
        scaled_to(&decide(3, 3, P, &p, &demand(0, 0), None)),
        Some(2)
    );
    let mut min3 = policy();
    min3.min_replicas = 3;
    assert_eq!(
        scaled_to(&decide(4, 4, P, &min3, &demand(0, 0), None)),
        Some(3)
    );
    assert_eq!(
        scaled_to(&decide(3, 3, P, &min3, &demand(0, 0), None)),
        None
    );
    assert_eq!(scaled_to(&decide(1, 1, P, &p, &demand(0, 0), None)), None);
    // Slow answers add replicas even with an empty queue.
    assert_eq!(
        scaled_to(&decide(4, 4, P, &p, &demand(0, 2500), None)),
        Some(8)
    );
}

#[test]
fn moves_back_within_bounds_at_once() {
    let p = policy();
    let zero = Some(Duration::ZERO);
    assert_eq!(
        scaled_to(&decide(0, 0, P, &p, &demand(0, 0), zero)),
        Some(1)
    );
    assert_eq!(
        scaled_to(&decide(20, 20, P, &p, &demand(0, 0), zero)),
        Some(8)
    );
}

#[tokio::test(start_paused = true)]
async fn scales_down_exactly_when_the_cooldown_has_passed() {
    let scaler = Autoscaler::default();
    let p = policy();
    let key = "LocalModelDeployment/models/llama";
    // Scaled up to 4 now.
    scaler.changed(key);
    let low = demand(0, 100);
    tokio::time::advance(Duration::from_secs(300) - Duration::from_millis(1)).await;
    let held = decide(4, 4, P, &p, &low, scaler.since_change(key, None));
    assert!(
        matches!(&held, Decision::Hold(why) if why.contains("cooldown has 1 ms left")),
        "{held:?}"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    let down = decide(4, 4, P, &p, &low, scaler.since_change(key, None));
    assert_eq!(scaled_to(&down), Some(2));
    // The change restarts the cooldown.
    scaler.changed(key);
    tokio::time::advance(Duration::from_secs(299)).await;
    let since = scaler.since_change(key, None);
    assert_eq!(scaled_to(&decide(2, 2, P, &p, &low, since)), None);
    tokio::time::advance(Duration::from_secs(1)).await;
    let since = scaler.since_change(key, None);
    assert_eq!(scaled_to(&decide(2, 2, P, &p, &low, since)), Some(1));
    // A forgotten object falls back on its status time, here none: no cooldown.
    scaler.retain(|k| k != key);
    assert_eq!(scaler.since_change(key, None), None);
}

#[test]
fn after_a_restart_the_cooldown_counts_from_the_status_time() {
    let scaler = Autoscaler::default();
    let recent = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(60))
        .unwrap()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let since = scaler.since_change("k", Some(&recent)).unwrap();
    assert!(
        since >= Duration::from_secs(59) && since <= Duration::from_secs(62),
        "{since:?}"
    );
    assert_eq!(
        scaled_to(&decide(4, 4, P, &policy(), &demand(0, 0), Some(since))),
        None
    );
    assert_eq!(scaler.since_change("k", None), None);
    assert_eq!(scaler.since_change("k", Some("not a time")), None);
}

#[test]
fn without_any_published_demand_it_holds() {
    let silent = Demand {
        reporters: 0,
        ..demand(0, 0)
    };
    // Well above minReplicas, no queue, no cooldown: it would halve on a figure of zero.
    let d = decide(4, 4, P, &policy(), &silent, None);
    assert!(matches!(d, Decision::Hold(_)), "{d:?}");
    assert_eq!(
        scaled_to(&decide(4, 4, P, &policy(), &demand(0, 0), None)),
        Some(2)
    );
}

fn with_in_flight(queued: u64, in_flight: u64, latency_p95_ms: u64) -> Demand {
    Demand {
        in_flight,
        ..demand(queued, latency_p95_ms)
    }
}

#[test]
fn does_not_scale_down_under_requests_in_flight_the_smaller_size_cannot_hold() {
    let p = policy();
    // 4 -> 2 replicas of 4 parallel slots: 8 answers in flight fit, 9 do not.
    assert_eq!(
        scaled_to(&decide(4, 4, P, &p, &with_in_flight(0, 8, 0), None)),
        Some(2)
    );
    let held = decide(4, 4, P, &p, &with_in_flight(0, 9, 0), None);
    assert!(
        matches!(&held, Decision::Hold(why) if why.contains("9 requests in flight")),
        "{held:?}"
    );
    // The slots per replica come from numParallel: at 1, 2 in flight already hold 4 -> 2.
    assert_eq!(
        scaled_to(&decide(4, 4, 1, &p, &with_in_flight(0, 2, 0), None)),
        Some(2)
    );
    assert_eq!(
        scaled_to(&decide(4, 4, 1, &p, &with_in_flight(0, 3, 0), None)),
        None
    );
}

#[test]
fn latency_has_a_band_between_scaling_up_and_scaling_down() {
    let p = policy();
    // latencyMs 2000: over it doubles; at or under 1000 may halve; in between holds.
    assert_eq!(
        scaled_to(&decide(4, 4, P, &p, &demand(0, 2001), None)),
        Some(8)
    );
    for in_band in [1001, 1500, 2000] {
        let held = decide(4, 4, P, &p, &demand(0, in_band), None);
        assert!(
            matches!(&held, Decision::Hold(why) if why.contains("over half of latencyMs 2000")),
            "{in_band}: {held:?}"
        );
    }
    assert_eq!(
        scaled_to(&decide(4, 4, P, &p, &demand(0, 1000), None)),
        Some(2)
    );
}

#[test]
fn spilled_requests_count_as_waiting_and_hold_the_replicas() {
    let p = policy();
    let spilling = |queued, spilled| Demand {
        spilled,
        ..demand(queued, 0)
    };
    // 2 x 10: 5 waiting and 16 spilled over are 21 wanting the model.
    let up = decide(2, 2, P, &p, &spilling(5, 16), None);
    assert_eq!(
        up,
        Decision::Scale {
            to: 4,
            reason: "scaled up 2 -> 4: 5 requests waiting and 16 spilled over in 30 s, over 10 per replica x 2".into()
        }
    );
    assert_eq!(
        scaled_to(&decide(2, 2, P, &p, &spilling(5, 15), None)),
        None
    );
    // No queue, but a spill: not the time to halve.
    let held = decide(4, 4, P, &p, &spilling(0, 1), None);
    assert!(
        matches!(&held, Decision::Hold(why) if why.contains("1 requests spilled over")),
        "{held:?}"
    );
    assert_eq!(
        scaled_to(&decide(4, 4, P, &p, &spilling(0, 0), None)),
        Some(2)
    );
}
