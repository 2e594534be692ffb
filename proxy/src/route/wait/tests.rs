//! Who goes next: weighted fair queueing between tiers, token fairness between tenants,
//! earliest deadline first inside a tenant, batch release, bounds, and the head's hand-over.

use super::*;
use crate::route::tiers::{BatchRt, TierRt, TierState};
use floodgate_crds::QueueClass;
use std::time::Duration;

fn tier(name: &str, class: QueueClass, weight: u32) -> Arc<TierRt> {
    tier_with(name, class, weight, usize::MAX, None)
}

fn tier_with(
    name: &str,
    class: QueueClass,
    weight: u32,
    max_depth: usize,
    batch: Option<BatchRt>,
) -> Arc<TierRt> {
    Arc::new(tier_rt(name, class, weight, max_depth, batch))
}

fn tier_rt(
    name: &str,
    class: QueueClass,
    weight: u32,
    max_depth: usize,
    batch: Option<BatchRt>,
) -> TierRt {
    TierRt {
        index: 0,
        name: Arc::from(name),
        class,
        weight,
        max_wait: Duration::from_secs(60),
        target: Duration::from_secs(1),
        max_depth,
        headroom: 0.0,
        relaxed_headroom: 0.0,
        batch,
        state: Arc::new(TierState::new(name, class)),
    }
}

fn entry(tier: &Arc<TierRt>, tenant: &str, deadline: Instant, tokens: u64) -> Entry {
    Entry {
        tier: tier.clone(),
        tenant: Arc::from(tenant),
        deadline,
        tokens,
    }
}

/// Admits the head `n` times (each admission is a dispatch) and returns the tier and
/// tenant of each, in order. Tickets not admitted stay in `tickets`.
fn dispatch(tickets: &mut Vec<Ticket<'_>>, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let Some(at) = tickets.iter().position(Ticket::is_head) else {
            break;
        };
        let t = tickets.remove(at);
        out.push((t.tier.name.to_string(), t.tenant.to_string()));
        t.admitted();
    }
    out
}

fn count(order: &[(String, String)], tier: &str) -> usize {
    order.iter().filter(|(t, _)| t == tier).count()
}

#[tokio::test(start_paused = true)]
async fn tiers_share_dispatch_by_weight_and_none_starves() {
    let q = WaitQueue::new(10_000);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let (ent, basic, free) = (
        tier("enterprise", QueueClass::Priority, 10),
        tier("basic", QueueClass::Standard, 5),
        tier("free", QueueClass::Standard, 1),
    );
    let mut tickets = Vec::new();
    for _ in 0..300 {
        for t in [&free, &basic, &ent] {
            tickets.push(q.join(&entry(t, "x", far, 10), now).unwrap());
        }
    }
    let order = dispatch(&mut tickets, 160);
    // 10 : 5 : 1 of 160 slots, within one slot of each.
    assert!(count(&order, "enterprise").abs_diff(100) <= 1, "{order:?}");
    assert!(count(&order, "basic").abs_diff(50) <= 1, "{order:?}");
    assert!(count(&order, "free").abs_diff(10) <= 1, "{order:?}");
    // The lightest tier is not starved until the end: it gets a slot in every 16 or so.
    assert!(count(&order[..20], "free") >= 1, "{order:?}");
}

#[tokio::test(start_paused = true)]
async fn a_tier_that_was_idle_does_not_spend_saved_credit() {
    let q = WaitQueue::new(10_000);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let (a, b) = (
        tier("a", QueueClass::Standard, 1),
        tier("b", QueueClass::Standard, 1),
    );
    let mut tickets = Vec::new();
    for _ in 0..50 {
        tickets.push(q.join(&entry(&a, "x", far, 1), now).unwrap());
    }
    // a alone for 40 dispatches, then b arrives with the same weight.
    assert_eq!(count(&dispatch(&mut tickets, 40), "a"), 40);
    for _ in 0..10 {
        tickets.push(q.join(&entry(&b, "x", far, 1), now).unwrap());
    }
    let order = dispatch(&mut tickets, 10);
    assert!(
        count(&order, "a").abs_diff(5) <= 1,
        "equal weights alternate from b's arrival on, not b ten times in a row: {order:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn inside_a_tenant_the_earliest_deadline_goes_first() {
    let q = WaitQueue::new(100);
    let now = Instant::now();
    let t = tier("pro", QueueClass::Priority, 1);
    let s = Duration::from_secs(1);
    let mut tickets = Vec::new();
    for (i, d) in [30u64, 10, 20, 10].into_iter().enumerate() {
        tickets.push(q.join(&entry(&t, "x", now + s * d as u32, 1), now).unwrap());
        assert_eq!(tickets[i].id, i as u64);
    }
    let mut ids = Vec::new();
    while let Some(at) = tickets.iter().position(Ticket::is_head) {
        let ticket = tickets.remove(at);
        ids.push(ticket.id);
        ticket.admitted();
    }
    // Deadlines 10 (id 1), 10 (id 3, arrived later), 20, 30.
    assert_eq!(ids, vec![1, 3, 2, 0]);
}

/// A tier of `class` and `weight` whose requests wait at most `max_wait`.
fn tier_waiting(name: &str, class: QueueClass, weight: u32, max_wait: Duration) -> Arc<TierRt> {
    let t = Arc::into_inner(tier(name, class, weight)).unwrap();
    Arc::new(TierRt { max_wait, ..t })
}

#[tokio::test(start_paused = true)]
async fn inside_a_class_the_request_due_first_goes_first_and_each_class_keeps_its_slots() {
    let s = Duration::from_secs(1);
    let (ent, pro, basic) = (
        tier_waiting("enterprise", QueueClass::Priority, 10, s),
        tier_waiting("pro", QueueClass::Priority, 10, 2 * s),
        tier_waiting("basic", QueueClass::Standard, 5, 5 * s),
    );
    let q = WaitQueue::new(10_000);
    // The callers' own deadlines are far: the order inside a class is by the tiers' limits.
    let far = Instant::now() + Duration::from_secs(600);
    let mut tickets = Vec::new();
    for _ in 0..10 {
        tickets.push(q.join(&entry(&pro, "x", far, 1), Instant::now()).unwrap());
        tickets.push(q.join(&entry(&basic, "x", far, 1), Instant::now()).unwrap());
    }
    // Enterprise arrives half a second later: due at 1.5 s, before pro's (2 s).
    tokio::time::advance(s / 2).await;
    for _ in 0..20 {
        tickets.push(q.join(&entry(&ent, "x", far, 1), Instant::now()).unwrap());
    }
    let order = dispatch(&mut tickets, 25);
    // While both priority tiers wait, the class keeps their slots (10 + 10 to basic's 5),
    // and enterprise, due first, takes every one of them.
    assert_eq!(count(&order, "enterprise"), 20, "{order:?}");
    assert_eq!(count(&order, "basic"), 5, "{order:?}");
}

#[tokio::test(start_paused = true)]
async fn tenants_of_a_tier_share_by_tokens() {
    let q = WaitQueue::new(10_000);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let t = tier("basic", QueueClass::Standard, 5);
    let mut tickets = Vec::new();
    // A noisy tenant queues 100 requests of 1,000 tokens first; a quiet one 100 of 100.
    for _ in 0..100 {
        tickets.push(q.join(&entry(&t, "noisy", far, 1000), now).unwrap());
    }
    for _ in 0..100 {
        tickets.push(q.join(&entry(&t, "quiet", far, 100), now).unwrap());
    }
    let order = dispatch(&mut tickets, 55);
    let noisy = order.iter().filter(|(_, n)| n == "noisy").count();
    let quiet = order.iter().filter(|(_, n)| n == "quiet").count();
    // Equal tokens: 5 noisy (5,000 tokens) to 50 quiet (5,000 tokens), within one request.
    assert!(
        noisy.abs_diff(5) <= 1 && quiet.abs_diff(50) <= 1,
        "noisy {noisy}, quiet {quiet}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tenant_that_sends_one_request_at_a_time_still_pays_for_its_tokens() {
    let q = WaitQueue::new(10_000);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let t = tier("basic", QueueClass::Standard, 5);
    let mut tickets = Vec::new();
    // A quiet tenant queues 100 requests of 100 tokens; a big one has a single request of
    // 1,000 tokens waiting at any time, and sends the next as soon as one is dispatched, so
    // its queue empties after every dispatch.
    for _ in 0..100 {
        tickets.push(q.join(&entry(&t, "quiet", far, 100), now).unwrap());
    }
    tickets.push(q.join(&entry(&t, "big", far, 1000), now).unwrap());
    let mut big: usize = 0;
    for _ in 0..44 {
        let order = dispatch(&mut tickets, 1);
        if order[0].1 == "big" {
            big += 1;
            tickets.push(q.join(&entry(&t, "big", far, 1000), now).unwrap());
        }
    }
    // Equal tokens: 4 big (4,000 tokens) to 40 quiet (4,000 tokens), within one request.
    assert!(big.abs_diff(4) <= 1, "big was dispatched {big} times of 44");
}

/// The quiet requests dispatched before `big`'s second request, sent `after` its first one
/// (1,000 tokens) was dispatched, while a quiet tenant keeps requests of 100 waiting, on a
/// queue whose keys' window is a minute.
async fn quiet_ahead_of_big_coming_back_after(after: Duration) -> usize {
    let q = WaitQueue::with_window(10_000, Duration::from_secs(60));
    let t = tier("basic", QueueClass::Standard, 5);
    let far = Instant::now() + Duration::from_secs(3600);
    let mut tickets = vec![
        q.join(&entry(&t, "big", far, 1000), Instant::now())
            .unwrap(),
    ];
    for _ in 0..50 {
        tickets.push(
            q.join(&entry(&t, "quiet", far, 100), Instant::now())
                .unwrap(),
        );
    }
    let first = dispatch(&mut tickets, 1);
    assert_eq!(first[0].1, "big", "{first:?}");
    tokio::time::advance(after).await;
    tickets.push(
        q.join(&entry(&t, "big", far, 1000), Instant::now())
            .unwrap(),
    );
    let order = dispatch(&mut tickets, 20);
    order
        .iter()
        .position(|(_, tenant)| tenant == "big")
        .unwrap_or(order.len())
}

#[tokio::test(start_paused = true)]
async fn a_tenants_charge_counts_for_exactly_one_window_after_its_queue_emptied() {
    let window = Duration::from_secs(60);
    // Within the window big pays for its 1,000 tokens: ten quiet requests of 100 (and the
    // one whose tag ties with big's, which arrived first) go before it.
    let within = quiet_ahead_of_big_coming_back_after(window - Duration::from_millis(1)).await;
    assert_eq!(within, 11);
    // From the window's end the charge is forgotten: big starts level with the others (one
    // quiet request, tied and earlier, goes first).
    let after = quiet_ahead_of_big_coming_back_after(window).await;
    assert_eq!(after, 1);
}

#[tokio::test(start_paused = true)]
async fn the_charges_of_tenants_gone_for_a_window_are_forgotten() {
    let q = WaitQueue::with_window(10_000, Duration::from_secs(60));
    let t = tier("free", QueueClass::Standard, 1);
    let far = Instant::now() + Duration::from_secs(3600);
    let charged = |q: &WaitQueue| q.lock().tiers[0].charged.len();
    // A thousand tenants send one request each: each is charged, and none is ever passed by
    // the virtual time (each starts where the last one started).
    for i in 0..1000 {
        let ticket = q
            .join(&entry(&t, &format!("t{i}"), far, 10), Instant::now())
            .unwrap();
        ticket.admitted();
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert_eq!(charged(&q), 1000);
    // Exactly a window after the first was charged, the next arrival forgets it, and only it.
    tokio::time::advance(Duration::from_secs(50)).await;
    let next = q.join(&entry(&t, "new", far, 10), Instant::now()).unwrap();
    assert_eq!(charged(&q), 999);
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(next);
    assert_eq!(charged(&q), 0, "a window after the last, none is left");
}

#[tokio::test(start_paused = true)]
async fn an_arrival_that_goes_first_takes_the_head_and_the_old_head_is_told() {
    let q = WaitQueue::new(100);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let (ent, basic) = (
        tier("enterprise", QueueClass::Priority, 10),
        tier("basic", QueueClass::Standard, 5),
    );
    // basic has dispatched before: its tag is ahead of the current virtual time.
    let first = q.join(&entry(&basic, "x", far, 1), now).unwrap();
    let second = q.join(&entry(&basic, "x", far, 1), now).unwrap();
    assert!(first.is_head());
    first.admitted();
    assert!(second.is_head());
    // Consume the wake-up that made it head.
    tokio::time::timeout(Duration::from_secs(1), second.changed())
        .await
        .unwrap();
    let urgent = q.join(&entry(&ent, "y", far, 1), now).unwrap();
    assert!(urgent.is_head() && !second.is_head());
    tokio::time::timeout(Duration::from_secs(1), second.changed())
        .await
        .expect("the old head is told it stands back");
    drop(urgent);
    assert!(
        second.is_head(),
        "the head passes back when the arrival leaves"
    );
}

#[tokio::test(start_paused = true)]
async fn batch_requests_wait_for_a_full_batch_or_the_interval() {
    let q = WaitQueue::new(100);
    let t0 = Instant::now();
    let far = t0 + Duration::from_secs(600);
    let batch = BatchRt {
        size: 3,
        interval: Duration::from_secs(60),
        off_peak: 0.8,
    };
    let free = tier_with("free", QueueClass::Batch, 1, usize::MAX, Some(batch));
    let a = q.join(&entry(&free, "x", far, 1), t0).unwrap();
    let b = q.join(&entry(&free, "x", far, 1), t0).unwrap();
    assert!(!a.is_head() && !b.is_head(), "gathered, not released");
    assert_eq!(
        a.wake_at(),
        Some(t0 + Duration::from_secs(60)),
        "the oldest times the batch"
    );
    assert_eq!(b.wake_at(), None);
    let c = q.join(&entry(&free, "x", far, 1), t0).unwrap();
    assert!(a.is_head(), "a full batch is released at once");
    a.admitted();
    b.admitted();
    c.admitted();

    // One request alone: released when it has waited the interval, not a moment before.
    let t1 = Instant::now();
    let d = q.join(&entry(&free, "x", far, 1), t1).unwrap();
    d.tick(t1 + Duration::from_secs(60) - Duration::from_millis(1));
    assert!(!d.is_head());
    d.tick(t1 + Duration::from_secs(60));
    assert!(d.is_head());
}

#[tokio::test(start_paused = true)]
async fn the_tier_and_the_route_bound_what_waits() {
    let q = WaitQueue::new(3);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let small = tier_with("small", QueueClass::Standard, 1, 1, None);
    let other = tier("other", QueueClass::Standard, 1);
    let a = q.join(&entry(&small, "x", far, 1), now).unwrap();
    assert_eq!(
        q.join(&entry(&small, "x", far, 1), now).err(),
        Some(Full::Tier)
    );
    assert_eq!(small.state.depth(), 1);
    let _b = q.join(&entry(&other, "x", far, 1), now).unwrap();
    let _c = q.join(&entry(&other, "x", far, 1), now).unwrap();
    assert_eq!(
        q.join(&entry(&other, "x", far, 1), now).err(),
        Some(Full::Route)
    );
    drop(a);
    assert_eq!(
        small.state.depth(),
        0,
        "leaving gives the tier's place back"
    );
    assert!(q.join(&entry(&small, "x", far, 1), now).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_held_tier_lets_the_others_go_until_its_hold_ends() {
    let q = WaitQueue::new(100);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let (hi, lo) = (
        tier("hi", QueueClass::Priority, 1),
        tier("lo", QueueClass::Standard, 100),
    );
    let l = q.join(&entry(&lo, "x", far, 1), now).unwrap();
    let h = q.join(&entry(&hi, "x", far, 1), now).unwrap();
    assert!(l.is_head(), "lo weighs more and was first");
    l.hold_tier(now, now + Duration::from_millis(200));
    assert!(h.is_head() && !l.is_head());
    assert_eq!(l.wake_at(), Some(now + Duration::from_millis(200)));
    drop(h);
    assert!(!l.is_head(), "still held");
    l.tick(now + Duration::from_millis(200));
    assert!(l.is_head());
}

#[tokio::test(start_paused = true)]
async fn when_the_request_that_held_its_tier_leaves_another_lifts_the_hold_on_time() {
    let q = WaitQueue::new(100);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    let lo = tier("lo", QueueClass::Standard, 1);
    let holder = q.join(&entry(&lo, "x", far, 1), now).unwrap();
    let other = q.join(&entry(&lo, "y", far, 1), now).unwrap();
    assert!(holder.is_head());
    holder.hold_tier(now, now + Duration::from_millis(200));
    drop(holder);
    // The other is told, and its timer is the hold's end: exactly then it is head.
    tokio::time::timeout(Duration::from_secs(1), other.changed())
        .await
        .expect("the remaining request of the held tier is woken");
    assert_eq!(other.wake_at(), Some(now + Duration::from_millis(200)));
    other.tick(now + Duration::from_millis(199));
    assert!(!other.is_head());
    other.tick(now + Duration::from_millis(200));
    assert!(other.is_head());
}

#[tokio::test(start_paused = true)]
async fn the_position_counts_its_tier_and_the_tiers_that_go_first() {
    let q = WaitQueue::new(100);
    let now = Instant::now();
    let s = Duration::from_secs(1);
    let (ent, basic) = (
        tier("enterprise", QueueClass::Priority, 10),
        tier("basic", QueueClass::Standard, 1),
    );
    let mut tickets = Vec::new();
    // basic: x due at 30 s and 10 s, y at 20 s; then two enterprise requests.
    for (t, tenant, due) in [
        (&basic, "x", 30),
        (&basic, "x", 10),
        (&basic, "y", 20),
        (&ent, "e", 60),
        (&ent, "e", 60),
    ] {
        tickets.push(q.join(&entry(t, tenant, now + s * due, 1), now).unwrap());
    }
    let ahead = |i: usize| tickets[i].position();
    // x's request due at 30 s: x's earlier one and y's of its tier; both enterprise requests
    // (same tag as basic: nothing dispatched yet).
    assert_eq!(
        ahead(0),
        Ahead {
            in_class: 2,
            other_classes: 2
        }
    );
    assert_eq!(
        ahead(1),
        Ahead {
            in_class: 1,
            other_classes: 2
        }
    );
    // The first enterprise request: nobody of its tier; basic's three (equal tag).
    assert_eq!(
        ahead(3),
        Ahead {
            in_class: 0,
            other_classes: 3
        }
    );
    assert_eq!(ahead(4).total(), 4);
    // Once enterprise has dispatched (its tag moves past basic's), basic no longer counts
    // enterprise as ahead.
    let first = tickets.remove(3);
    assert!(first.is_head());
    first.admitted();
    assert_eq!(
        tickets[0].position(),
        Ahead {
            in_class: 2,
            other_classes: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_tier_knows_how_long_its_oldest_request_has_waited_over_every_route() {
    let pro = tier("pro", QueueClass::Standard, 1);
    let (a, b) = (WaitQueue::new(10), WaitQueue::new(10));
    let deadline = Instant::now() + Duration::from_secs(60);
    assert_eq!(pro.state.oldest_wait(Instant::now()), None);
    let first = a
        .join(&entry(&pro, "acme", deadline, 1), Instant::now())
        .unwrap();
    tokio::time::advance(Duration::from_millis(1500)).await;
    let second = b
        .join(&entry(&pro, "acme", deadline, 1), Instant::now())
        .unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(pro.state.depth(), 2);
    assert_eq!(
        pro.state.oldest_wait(Instant::now()),
        Some(Duration::from_millis(2000))
    );
    // The oldest leaves (admitted or given up alike): the next oldest counts.
    drop(first);
    assert_eq!(
        pro.state.oldest_wait(Instant::now()),
        Some(Duration::from_millis(500))
    );
    second.admitted();
    assert_eq!(
        (pro.state.depth(), pro.state.oldest_wait(Instant::now())),
        (0, None)
    );
}

#[tokio::test(start_paused = true)]
async fn a_ticket_whose_waiter_is_gone_still_gives_its_counts_back() {
    let q = WaitQueue::new(2);
    let now = Instant::now();
    let far = now + Duration::from_secs(60);
    let t = tier_with("pro", QueueClass::Priority, 1, 1, None);
    let ticket = q.join(&entry(&t, "x", far, 1), now).unwrap();
    // Its waiter is no longer in its tier's queue (state out of step): leaving must still
    // give back the route's and the tier's counts, or both bounds fill up for good.
    q.lock().tiers[0].tenants.clear();
    drop(ticket);
    assert_eq!((q.len(), t.state.depth()), (0, 0));
    let again = q.join(&entry(&t, "x", far, 1), now);
    assert!(again.is_ok(), "the tier's bound of 1 is free again");
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_counts_the_requests_of_its_class_due_before_it() {
    let q = WaitQueue::new(100);
    let now = Instant::now();
    let far = now + Duration::from_secs(600);
    // Enterprise (1 s limit) and pro (2 s), both priority; basic standard.
    let limit = |name: &str, class, weight, ms| {
        Arc::new(TierRt {
            max_wait: Duration::from_millis(ms),
            ..tier_rt(name, class, weight, usize::MAX, None)
        })
    };
    let ent = limit("enterprise", QueueClass::Priority, 10, 1000);
    let pro = limit("pro", QueueClass::Priority, 10, 2000);
    let basic = limit("basic", QueueClass::Standard, 5, 5000);
    let mut tickets = Vec::new();
    for _ in 0..5 {
        tickets.push(q.join(&entry(&ent, "e", far, 1), now).unwrap());
    }
    for _ in 0..3 {
        tickets.push(q.join(&entry(&pro, "p", far, 1), now).unwrap());
    }
    tickets.push(q.join(&entry(&basic, "b", far, 1), now).unwrap());
    // An enterprise newcomer: its 5, none of pro's (due a second later); its class has
    // 20 of the 25 weights waiting.
    assert_eq!(q.outlook(&ent, now), (5, 20.0 / 25.0));
    // A pro newcomer: its 3 and enterprise's 5 (all due before it).
    assert_eq!(q.outlook(&pro, now), (8, 20.0 / 25.0));
    // 1.5 s later pro's three are due before an enterprise newcomer (2 s vs 2.5 s).
    let later = now + Duration::from_millis(1500);
    assert_eq!(q.outlook(&ent, later).0, 8);
    // The last pro request's place: pro's two before it and enterprise's five.
    let last_pro = &tickets[7];
    assert_eq!(
        last_pro.position(),
        Ahead {
            in_class: 7,
            other_classes: 1
        }
    );
}
