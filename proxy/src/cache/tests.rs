use super::answer::{Answer, Assembler};
use super::flight::{Flights, Meta, Role};
use super::key::{self, Key};
use super::memory::MemoryStore;
use super::*;
use crate::providers::types::{ChatMessage, MessageContent, Role as MsgRole};
use futures::StreamExt as _;
use serde_json::json;

fn request(body: serde_json::Value) -> ChatRequest {
    serde_json::from_value(body).unwrap()
}

fn base() -> serde_json::Value {
    json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"}
        ],
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 100,
        "seed": 7,
        "response_format": {"type": "text"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}]
    })
}

fn key_of(body: serde_json::Value) -> Key {
    key::exact("global", "openai/gpt-4o", &request(body))
}

#[test]
fn the_key_changes_with_every_field_that_changes_the_answer() {
    let k = key_of(base());
    let changes: Vec<(&str, serde_json::Value)> = vec![
        ("/messages/1/content", json!("hello there!")),
        ("/messages/0/content", json!("be long")),
        ("/messages/1/role", json!("assistant")),
        ("/temperature", json!(0.5)),
        ("/top_p", json!(0.9)),
        ("/max_tokens", json!(101)),
        ("/seed", json!(8)),
        ("/response_format", json!({"type": "json_object"})),
        ("/tools/0/function/name", json!("g")),
        (
            "/tools/0/function/parameters/properties/a/type",
            json!("number"),
        ),
    ];
    for (path, value) in changes {
        let mut body = base();
        *body.pointer_mut(path).unwrap() = value;
        assert_ne!(key_of(body), k, "{path} is not in the key");
    }
    let mut body = base();
    body["stop"] = json!(["\n"]);
    assert_ne!(key_of(body), k, "stop is not in the key");
    // Scope and model.
    let req = request(base());
    assert_ne!(key::exact("tenant:a", "openai/gpt-4o", &req), k);
    assert_ne!(key::exact("global", "openai/gpt-4o-mini", &req), k);
}

#[test]
fn the_key_is_the_meaning_not_the_bytes() {
    let k = key_of(base());
    // Streaming, the user id, and the content as parts (the Anthropic door's shape).
    let mut body = base();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["user"] = json!("someone");
    body["messages"][1]["content"] =
        json!([{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]);
    body["messages"][0]["role"] = json!("developer");
    assert_eq!(key_of(body), k);
    // max_completion_tokens is max_tokens.
    let mut body = base();
    body.as_object_mut().unwrap().remove("max_tokens");
    body["max_completion_tokens"] = json!(100);
    assert_eq!(key_of(body), k);
    // Key order inside tool parameters does not matter.
    let mut body = base();
    body["tools"][0]["function"]["parameters"] =
        json!({"properties": {"a": {"type": "string"}}, "type": "object"});
    assert_eq!(key_of(body), k);
}

fn answer(text: &str) -> Answer {
    Answer::text("gpt-4o", text.to_owned())
}

#[tokio::test(start_paused = true)]
async fn entries_expire_at_their_ttl() {
    let store = MemoryStore::new(1 << 20, 100);
    let k = key_of(base());
    let ttl = Duration::from_secs(60);
    let now = tokio::time::Instant::now();
    store.put(k, Arc::new(answer("a")), 10, (now, now + ttl));
    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    assert!(store.get(&k, tokio::time::Instant::now()).is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(store.get(&k, tokio::time::Instant::now()).is_none());
    assert_eq!(store.usage(), (0, 0));
}

#[test]
fn the_least_recently_used_goes_first_within_the_byte_budget() {
    // Room for two entries of 400 bytes (each costs 400 + 128).
    let store = MemoryStore::new(1100, 100);
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let keys: Vec<Key> = (0..3).map(|i| Key([i; 32])).collect();
    let now = tokio::time::Instant::now();
    assert_eq!(
        store
            .put(keys[0], Arc::new(answer("0")), 400, (now, far))
            .evicted,
        0
    );
    assert_eq!(
        store
            .put(keys[1], Arc::new(answer("1")), 400, (now, far))
            .evicted,
        0
    );
    // Using 0 makes 1 the least recently used.
    assert!(store.get(&keys[0], now).is_some());
    assert_eq!(
        store
            .put(keys[2], Arc::new(answer("2")), 400, (now, far))
            .evicted,
        1
    );
    assert!(store.get(&keys[1], now).is_none());
    assert!(store.get(&keys[0], now).is_some());
    assert!(store.get(&keys[2], now).is_some());
    // Larger than the whole budget: not kept, nothing evicted.
    let big = store.put(Key([9; 32]), Arc::new(answer("9")), 2000, (now, far));
    assert!(!big.kept);
    assert_eq!(store.usage().0, 2);
}

#[test]
fn a_stored_answer_round_trips_and_replays_as_the_same_stream() {
    let mut a = answer("hello world");
    a.response.usage = Some(crate::providers::Usage {
        prompt_tokens: 3,
        completion_tokens: 2,
        total_tokens: 5,
    });
    a.response.choices[0].stop_sequence = Some("END".into());
    let back = Answer::from_bytes(&a.to_bytes()).unwrap();
    assert_eq!(back, a);
    let chunks = a.chunks("alias", true);
    assert!(chunks.iter().all(|c| c.model == "alias"));
    let mut asm = Assembler::default();
    chunks.iter().for_each(|c| asm.push(c));
    let replayed = asm.finish().unwrap();
    assert_eq!(replayed.response.choices, a.response.choices);
    assert_eq!(replayed.response.usage, a.response.usage);
    assert!(replayed.is_complete());
    // Without include_usage the replay carries none.
    assert!(a.chunks("alias", false).iter().all(|c| c.usage.is_none()));
}

#[test]
fn a_stored_answer_carries_the_grace_its_backend_keeps_it() {
    let a = answer("kept");
    let grace = Duration::from_secs(3600);
    let (back, kept) = Answer::from_bytes_kept(&a.to_bytes_kept(grace)).unwrap();
    assert_eq!((back, kept), (a.clone(), grace));
    // Bytes written without one (before stale answers in Redis) read as no grace, and
    // bytes without a grace are the same as they always were.
    assert_eq!(a.to_bytes_kept(Duration::ZERO), a.to_bytes());
    assert_eq!(
        Answer::from_bytes_kept(&a.to_bytes()).unwrap().1,
        Duration::ZERO
    );
}

#[test]
fn cache_control_directives_are_read() {
    let mut headers = HeaderMap::new();
    headers.append("cache-control", "max-age=0, No-Cache".parse().unwrap());
    headers.append("cache-control", "no-store".parse().unwrap());
    let ctx = CacheCtx::new(None, &headers);
    assert!(ctx.no_cache && ctx.no_store);
    let ctx = CacheCtx::new(None, &HeaderMap::new());
    assert!(!ctx.no_cache && !ctx.no_store);
}

#[test]
fn sampling_is_cached_only_when_the_policy_says_so() {
    let spec: CachePolicySpec =
        serde_json::from_value(json!({"exact": {"ttlSeconds": 60}, "sampled": "bypass"})).unwrap();
    let (policy, _) = Policy::new(&spec);
    let mut req = request(base());
    assert!(policy.caches(&req));
    req.temperature = Some(0.7);
    assert!(!policy.caches(&req));
    req.temperature = None;
    assert!(!policy.caches(&req));
    let spec: CachePolicySpec =
        serde_json::from_value(json!({"exact": {"ttlSeconds": 60}})).unwrap();
    let (policy, _) = Policy::new(&spec);
    assert!(policy.caches(&req));
    req.n = Some(2);
    assert!(!policy.caches(&req));
}

#[test]
fn max_entries_with_redis_is_noted_as_bounding_only_the_index() {
    let notes = |spec: serde_json::Value| {
        let spec: CachePolicySpec = serde_json::from_value(spec).unwrap();
        Policy::new(&spec).1
    };
    let noted = notes(json!({"backend": "redis", "maxEntries": 50}));
    assert!(
        noted.iter().any(|n| n.contains("spec.maxEntries (50)")
            && n.contains("semantic index")
            && n.contains("maxBytes alone")),
        "{noted:?}"
    );
    // Acted on in memory, and the default says nothing.
    for spec in [
        json!({"backend": "memory", "maxEntries": 50}),
        json!({"backend": "redis"}),
    ] {
        let noted = notes(spec.clone());
        assert!(
            !noted.iter().any(|n| n.contains("maxEntries")),
            "{spec}: {noted:?}"
        );
    }
}

/// Two pools may each have a provider `up` serving `x` (provider names are unique only
/// within a pool): the aliases routed to them are answered by different endpoints, so they
/// must not share exact or semantic entries.
#[test]
fn the_resolved_model_tells_pools_apart() {
    let pool = |name: &str, port: u16, alias: &str| {
        format!(
            "---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: {name}}}\nspec:\n\
             \x20 providers:\n\
             \x20 - {{name: up, type: openai, baseUrl: \"http://127.0.0.1:{port}\", models: [{{name: x, alias: {alias}}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n"
        )
    };
    let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\nstringData: {a: sk-a}\n"
        .to_owned()
        + &pool("alpha", 9001, "fast")
        + &pool("beta", 9002, "cheap");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    let (config, _) = crate::config::load::load_config(
        &[dir.path().to_owned()],
        crate::config::secrets::SecretSources::default(),
    )
    .unwrap();
    let dispatcher = Dispatcher::new(Duration::from_secs(60), Duration::from_secs(1)).unwrap();
    dispatcher.apply(Arc::new(config));
    let view = dispatcher.view();
    let (fast, cheap) = (
        resolved_model(&view, "fast"),
        resolved_model(&view, "cheap"),
    );
    assert_ne!(fast, cheap);
    let req = request(base());
    assert_ne!(
        key::exact("global", &fast, &req),
        key::exact("global", &cheap, &req)
    );
    // Stable for the same target (replicas and reloads share entries).
    assert_eq!(resolved_model(&dispatcher.view(), "fast"), fast);
}

/// A semantic lookup waits for the prompt's embedding `SEMANTIC_WAIT` at most (a model
/// that never answers), then goes on as a miss: not a millisecond before.
#[tokio::test(start_paused = true)]
async fn a_semantic_lookup_gives_up_on_the_model_after_its_wait() {
    let spec: CachePolicySpec =
        serde_json::from_value(json!({"semantic": {"ttlSeconds": 60, "threshold": 0.95}})).unwrap();
    let (policy, _) = Policy::new(&spec);
    let cache = Arc::new(Cache::new(None));
    cache
        .semantic()
        .ready_with(semantic::embed::Embedder::stalled());
    let req = request(base());
    let mut target = Target {
        exact: key_of(base()),
        semantic: Some((semantic::query("global", "m", &req).unwrap(), None)),
    };
    let looking = tokio::spawn({
        let cache = cache.clone();
        async move { cache.semantic_lookup(&policy, &mut target).await.is_none() }
    });
    tokio::time::advance(SEMANTIC_WAIT - Duration::from_millis(1)).await;
    tokio::task::yield_now().await;
    assert!(!looking.is_finished(), "gave up before its wait");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(looking.await.unwrap(), "a miss after the wait");
}

/// `ignoreFields`: requests that differ only in those fields share a key (exact and
/// semantic); in any other field they still differ; `model`, `messages`, `n` and `stream`
/// cannot be ignored (noted).
#[test]
fn ignored_fields_leave_the_key() {
    let spec = |v| serde_json::from_value::<CachePolicySpec>(v).unwrap();
    let (policy, notes) = Policy::new(&spec(json!({
        "exact": {"ttlSeconds": 60},
        "semantic": {"ttlSeconds": 60, "threshold": 0.95},
        "ignoreFields": ["seed", "temperature", "max_tokens", "messages"]
    })));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("ignoreFields") && n.contains("\"messages\"")),
        "{notes:?}"
    );
    let key = |body: serde_json::Value| policy.key("global", "p/m", &request(body));
    let semantic = |body: serde_json::Value| {
        policy
            .semantic_query("global", "p/m", &request(body))
            .unwrap()
            .partition
    };
    let mut other = base();
    other["seed"] = json!(8);
    other["temperature"] = json!(0.7);
    other["max_completion_tokens"] = json!(10);
    other.as_object_mut().unwrap().remove("max_tokens");
    assert_eq!(key(base()), key(other.clone()));
    assert_eq!(semantic(base()), semantic(other));
    let mut top_p = base();
    top_p["top_p"] = json!(0.5);
    assert_ne!(key(base()), key(top_p.clone()));
    assert_ne!(semantic(base()), semantic(top_p));
    // Without the field, the same policy keys them apart.
    let (plain, _) = Policy::new(&spec(json!({"exact": {"ttlSeconds": 60}})));
    let mut seed = base();
    seed["seed"] = json!(8);
    assert_ne!(
        plain.key("global", "p/m", &request(base())),
        plain.key("global", "p/m", &request(seed))
    );
}

/// `modelScopes` overrides `scope` for the models it names; `modelRevision` puts the
/// semantic entries of other model files in another partition.
#[test]
fn a_models_scope_and_the_model_revision_are_the_policys() {
    let spec = |v| serde_json::from_value::<CachePolicySpec>(v).unwrap();
    let (policy, _) = Policy::new(&spec(json!({
        "exact": {"ttlSeconds": 60},
        "modelScopes": [{"model": "faq", "scope": "global"}]
    })));
    assert_eq!(policy.scope_of("faq"), CacheScope::Global);
    assert_eq!(policy.scope_of("gpt-4o"), CacheScope::Tenant);
    let semantic = |revision: Option<&str>| {
        let mut s = json!({"semantic": {"ttlSeconds": 60, "threshold": 0.95}});
        if let Some(r) = revision {
            s["semantic"]["modelRevision"] = json!(r);
        }
        let (policy, _) = Policy::new(&spec(s));
        policy
            .semantic_query("global", "p/m", &request(base()))
            .unwrap()
            .partition
    };
    assert_ne!(semantic(Some("0.1.0")), semantic(Some("0.2.0")));
    assert_ne!(semantic(Some("0.1.0")), semantic(None));
    assert_eq!(semantic(Some("0.1.0")), semantic(Some("0.1.0")));
}

fn meta() -> Meta {
    Meta {
        provider: Arc::from("p"),
        key: Arc::from("k"),
    }
}

fn chunks_of(text: &str) -> Vec<ChatChunk> {
    answer(text).chunks("gpt-4o", true)
}

/// A follower counts as a reader from the moment it joins: the leader's caller leaving
/// before the follower subscribes does not stop the upstream (the follower gets the whole
/// answer, not an error).
#[tokio::test]
async fn a_follower_holds_its_flight_from_the_moment_it_joins() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let (k, window) = (Key([6; 32]), Duration::from_secs(5));
    let Role::Lead(leader) = flights.join(k, window) else {
        panic!("the first request leads");
    };
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<ChatChunk, ProviderError>>();
    let own = leader.stream(meta(), Box::pin(rx), ("gpt-4o", true), window, &tasks, drop);
    let Role::Follow(flight) = flights.join(k, window) else {
        panic!("the second follows");
    };
    // The leader's caller leaves; the flight's driver runs before the follower subscribes.
    drop(own);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let mut sub = flight.subscribe("gpt-4o", true);
    drop(flight);
    for c in chunks_of("hello world") {
        tx.unbounded_send(Ok(c)).unwrap();
    }
    drop(tx);
    let mut asm = Assembler::default();
    while let Some(item) = sub.next().await {
        asm.push(&item.expect("the follower gets the answer, not an error"));
    }
    let whole = asm.finish().unwrap();
    assert_eq!(
        whole.response.choices[0].message.content.as_deref(),
        Some("hello world")
    );
}

/// A follower that joins after some chunks gets those first, then the live ones, while
/// the upstream is still streaming; every reader ends with the whole answer.
#[tokio::test]
async fn followers_get_the_chunks_so_far_then_the_live_ones() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let k = Key([1; 32]);
    let Role::Lead(leader) = flights.join(k, Duration::from_secs(5)) else {
        panic!("the first request leads");
    };
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<ChatChunk, ProviderError>>();
    let stored = Arc::new(Mutex::new(None));
    let into = stored.clone();
    let mut own = leader.stream(
        meta(),
        Box::pin(rx),
        ("gpt-4o", true),
        Duration::from_secs(5),
        &tasks,
        move |a| *into.lock().unwrap() = Some(a),
    );
    let all = chunks_of("one two three");
    tx.unbounded_send(Ok(all[0].clone())).unwrap();
    tx.unbounded_send(Ok(all[1].clone())).unwrap();
    assert_eq!(own.next().await.unwrap().unwrap(), all[0]);
    let Role::Follow(flight) = flights.join(k, Duration::from_secs(5)) else {
        panic!("an identical request follows");
    };
    let mut late = flight.subscribe("gpt-4o", true);
    // The chunks so far, before the upstream sends more.
    assert_eq!(late.next().await.unwrap().unwrap(), all[0]);
    assert_eq!(late.next().await.unwrap().unwrap(), all[1]);
    for c in &all[2..] {
        tx.unbounded_send(Ok(c.clone())).unwrap();
    }
    drop(tx);
    let rest: Vec<_> = late.map(Result::unwrap).collect().await;
    assert_eq!(rest, all[2..]);
    let own_rest: Vec<_> = own.map(Result::unwrap).collect().await;
    assert_eq!(own_rest, all[1..]);
    tasks.close();
    tasks.wait().await;
    assert!(
        stored
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(Answer::is_complete)
    );
}

/// A break mid-stream reaches every reader as the same error, and nothing is stored.
#[tokio::test]
async fn a_broken_stream_fails_every_reader_and_is_not_stored() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let k = Key([2; 32]);
    let Role::Lead(leader) = flights.join(k, Duration::from_secs(5)) else {
        panic!("leads");
    };
    let all = chunks_of("one two");
    let upstream = futures::stream::iter(vec![Ok(all[0].clone()), Err(ProviderError::Truncated)]);
    let stored = Arc::new(Mutex::new(false));
    let into = stored.clone();
    let follower = match flights.join(k, Duration::from_secs(5)) {
        Role::Follow(f) => f.subscribe("gpt-4o", true),
        Role::Lead(_) => panic!("follows"),
    };
    let own = leader.stream(
        meta(),
        Box::pin(upstream),
        ("gpt-4o", true),
        Duration::from_secs(5),
        &tasks,
        move |_| *into.lock().unwrap() = true,
    );
    for reader in [own, follower] {
        let items: Vec<_> = reader.collect().await;
        assert_eq!(items.len(), 2);
        assert!(matches!(items[1], Err(ProviderError::Truncated)));
    }
    tasks.close();
    tasks.wait().await;
    assert!(!*stored.lock().unwrap());
    // The failed flight is not joined: the next request leads.
    assert!(matches!(
        flights.join(k, Duration::from_secs(5)),
        Role::Lead(_)
    ));
}

/// A leader that gets no answer lets its followers ask again; one of them leads.
#[tokio::test]
async fn followers_of_a_leader_without_an_answer_ask_again() {
    let flights = Arc::new(Flights::default());
    let k = Key([3; 32]);
    let Role::Lead(leader) = flights.join(k, Duration::from_secs(5)) else {
        panic!("leads");
    };
    let Role::Follow(flight) = flights.join(k, Duration::from_secs(5)) else {
        panic!("follows");
    };
    let waiting = tokio::spawn(async move { flight.started().await.is_none() });
    drop(leader);
    assert!(waiting.await.unwrap());
    assert!(matches!(
        flights.join(k, Duration::from_secs(5)),
        Role::Lead(_)
    ));
}

/// A whole answer stays joinable for the window after it ended, then the flight is gone.
#[tokio::test(start_paused = true)]
async fn a_finished_answer_is_joinable_for_the_window() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let k = Key([4; 32]);
    let window = Duration::from_secs(5);
    let Role::Lead(leader) = flights.join(k, window) else {
        panic!("leads");
    };
    leader.complete(meta(), Arc::new(answer("x")), window, &tasks);
    tokio::time::advance(window - Duration::from_millis(1)).await;
    let Role::Follow(flight) = flights.join(k, window) else {
        panic!("joins within the window");
    };
    let whole = flight.whole().await.unwrap();
    assert_eq!(
        whole.response.choices[0].message.content.as_deref(),
        Some("x")
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(matches!(flights.join(k, window), Role::Lead(_)));
}

#[test]
fn a_template_answers_the_last_user_message() {
    let t = vec![template::Template::new("hi", r"hi,? (?P<name>\w+)", "Hello {{name}}!").unwrap()];
    let mut req = request(base());
    req.tools = None;
    req.messages.push(ChatMessage::new(
        MsgRole::User,
        Some(MessageContent::Text(" hi, Ada ".into())),
    ));
    let (_, text) = template::answer(&t, &req).unwrap();
    assert_eq!(text, "Hello Ada!");
}

/// A flight's lease and log share a Redis Cluster slot (the publish script touches both),
/// and each flight has a log of its own.
#[test]
fn a_flights_keys_share_one_hash_tag_and_its_log_is_its_own() {
    let key = Key([5; 32]);
    let (lease, log, _) = super::redis::flight_keys(&key, "t1");
    let tag = |k: &str| {
        let (start, end) = (k.find('{').unwrap(), k.find('}').unwrap());
        k[start..=end].to_owned()
    };
    assert_eq!(tag(&lease), tag(&log));
    assert_eq!(tag(&lease), format!("{{{}}}", key.hex()));
    let (_, other, _) = super::redis::flight_keys(&key, "t2");
    assert_ne!(log, other);
    assert_ne!(super::redis::flight_token(), super::redis::flight_token());
}

/// A stream that ends cleanly without a finish reason: the leader's caller gets it as it
/// came, a follower gets an error after the chunks, and nothing is stored.
#[tokio::test]
async fn followers_of_a_stream_cut_short_get_an_error() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let k = Key([6; 32]);
    let Role::Lead(leader) = flights.join(k, Duration::from_secs(5)) else {
        panic!("leads");
    };
    let all = chunks_of("one two");
    // The opening and the text, no finish reason.
    let upstream = futures::stream::iter(vec![Ok(all[0].clone()), Ok(all[1].clone())]);
    let follower = match flights.join(k, Duration::from_secs(5)) {
        Role::Follow(f) => f.subscribe("gpt-4o", true),
        Role::Lead(_) => panic!("follows"),
    };
    let stored = Arc::new(Mutex::new(false));
    let into = stored.clone();
    let own = leader.stream(
        meta(),
        Box::pin(upstream),
        ("gpt-4o", true),
        Duration::from_secs(5),
        &tasks,
        move |_| *into.lock().unwrap() = true,
    );
    let own: Vec<_> = own.collect().await;
    assert_eq!(own.len(), 2);
    assert!(own.iter().all(Result::is_ok));
    let followed: Vec<_> = follower.collect().await;
    assert_eq!(followed.len(), 3);
    assert!(matches!(followed[2], Err(ProviderError::Truncated)));
    tasks.close();
    tasks.wait().await;
    assert!(!*stored.lock().unwrap());
}

/// A whole answer without a finish reason is not given to followers: they ask again.
#[tokio::test]
async fn followers_of_a_whole_answer_cut_short_ask_again() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let k = Key([7; 32]);
    let Role::Lead(leader) = flights.join(k, Duration::from_secs(5)) else {
        panic!("leads");
    };
    let Role::Follow(flight) = flights.join(k, Duration::from_secs(5)) else {
        panic!("follows");
    };
    let waiting = tokio::spawn(async move { flight.started().await.is_none() });
    let mut cut = answer("half an answ");
    cut.response.choices[0].finish_reason = None;
    leader.complete(meta(), Arc::new(cut), Duration::from_secs(5), &tasks);
    assert!(waiting.await.unwrap());
    assert!(matches!(
        flights.join(k, Duration::from_secs(5)),
        Role::Lead(_)
    ));
}

/// A follower waits for its leader's answer to begin until its own deadline, not longer.
#[tokio::test(start_paused = true)]
async fn a_follower_waits_for_its_leader_until_its_own_deadline() {
    let flights = Arc::new(Flights::default());
    let k = Key([8; 32]);
    let Role::Lead(leader) = flights.join(k, Duration::from_secs(5)) else {
        panic!("leads");
    };
    let Role::Follow(flight) = flights.join(k, Duration::from_secs(5)) else {
        panic!("follows");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let waiting = tokio::spawn(async move { flight.started_by(deadline).await });
    tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(matches!(waiting.await.unwrap(), flight::Waited::TimedOut));
    drop(leader);
}

/// A follower that wants the whole answer of a stream that never ends waits until its
/// bound, not longer (`whole_by`).
#[tokio::test(start_paused = true)]
async fn a_follower_waits_for_a_whole_answer_until_its_bound() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let k = Key([12; 32]);
    let Role::Lead(leader) = flights.join(k, Duration::from_secs(5)) else {
        panic!("leads");
    };
    let Role::Follow(flight) = flights.join(k, Duration::from_secs(5)) else {
        panic!("follows");
    };
    let first = chunks_of("one two")[0].clone();
    let upstream = futures::stream::iter(vec![Ok(first)]).chain(futures::stream::pending());
    let own = leader.stream(
        meta(),
        Box::pin(upstream),
        ("gpt-4o", true),
        Duration::from_secs(5),
        &tasks,
        drop,
    );
    let bound = tokio::time::Instant::now() + Duration::from_secs(150);
    let waiting = tokio::spawn(async move { flight.whole_by(bound).await });
    tokio::time::advance(Duration::from_secs(150) - Duration::from_millis(1)).await;
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    tokio::time::advance(Duration::from_millis(1)).await;
    // Ended at the bound itself: awaiting it must not move the (paused) clock on.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(waiting.is_finished(), "still waiting past its bound");
    assert!(matches!(
        waiting.await.unwrap(),
        Err(ProviderError::Timeout)
    ));
    drop(own);
}

#[tokio::test(start_paused = true)]
async fn an_expired_entry_answers_as_stale_within_its_grace_only() {
    let store = MemoryStore::new(1 << 20, 100);
    store.set_grace(Duration::from_secs(30));
    let k = key_of(base());
    let ttl = Duration::from_secs(60);
    let now = tokio::time::Instant::now();
    store.put(k, Arc::new(answer("a")), 10, (now, now + ttl));
    tokio::time::advance(ttl).await;
    // Expired: no fresh answer, but kept for a stale one.
    assert!(store.get(&k, tokio::time::Instant::now()).is_none());
    assert!(store.get_stale(&k, tokio::time::Instant::now()).is_some());
    tokio::time::advance(Duration::from_secs(30) - Duration::from_millis(1)).await;
    assert!(store.get_stale(&k, tokio::time::Instant::now()).is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(store.get_stale(&k, tokio::time::Instant::now()).is_none());
    // A lookup past the grace frees it.
    assert!(store.get(&k, tokio::time::Instant::now()).is_none());
    assert_eq!(store.usage(), (0, 0));
}

/// To make room, an expired entry goes before the least recently used one: from its expiry
/// exactly (not a millisecond before), kept for stale answers or not.
#[tokio::test(start_paused = true)]
async fn expired_entries_are_evicted_before_the_least_recently_used() {
    let start = tokio::time::Instant::now();
    let (soon, far) = (
        start + Duration::from_secs(10),
        start + Duration::from_secs(3600),
    );
    let (old, expiring, new) = (Key([1; 32]), Key([2; 32]), Key([3; 32]));
    // Room for two entries of 400 bytes (each costs 400 + 128): `old` used least recently,
    // `expiring` (10 s left) used last.
    let store = || {
        let store = MemoryStore::new(1100, 100);
        store.set_grace(Duration::from_secs(30));
        store.put(old, Arc::new(answer("1")), 400, (start, far));
        store.put(expiring, Arc::new(answer("2")), 400, (start, soon));
        assert!(store.get(&expiring, start).is_some());
        store
    };
    let (before, at) = (store(), store());
    tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
    let now = tokio::time::Instant::now();
    let stored = before.put(new, Arc::new(answer("3")), 400, (now, far));
    assert_eq!(stored.gone, vec![old]);
    tokio::time::advance(Duration::from_millis(1)).await;
    let now = tokio::time::Instant::now();
    let stored = at.put(new, Arc::new(answer("3")), 400, (now, far));
    assert_eq!(stored.gone, vec![expiring]);
    assert!(at.get(&old, now).is_some() && at.get(&new, now).is_some());
}

/// What flights hold is charged to the memory budget: a store evicts answers to make room
/// for it, and is refused when the flights alone leave none.
#[test]
fn the_flights_bytes_count_against_the_memory_budget() {
    let flights = std::sync::atomic::AtomicUsize::new(0);
    let held = Arc::new(flights);
    let store = MemoryStore::new(2000, 100).charging(held.clone());
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let now = tokio::time::Instant::now();
    // Two answers of 400 (+128 each) fit with nothing in flight.
    store.put(Key([0; 32]), Arc::new(answer("0")), 400, (now, far));
    store.put(Key([1; 32]), Arc::new(answer("1")), 400, (now, far));
    assert_eq!(store.usage(), (2, 1056));
    // Flights now hold 900: a third answer evicts the oldest to fit (1056 + 528 + 900 > 2000).
    held.store(900, std::sync::atomic::Ordering::Relaxed);
    let third = store.put(Key([2; 32]), Arc::new(answer("2")), 400, (now, far));
    assert!(third.kept);
    assert_eq!(third.gone, vec![Key([0; 32])]);
    assert!(store.get(&Key([0; 32]), now).is_none());
    // Flights hold 1600: an answer of 528 cannot fit even alone, and nothing is evicted for it.
    held.store(1600, std::sync::atomic::Ordering::Relaxed);
    let refused = store.put(Key([3; 32]), Arc::new(answer("3")), 400, (now, far));
    assert!(!refused.kept && refused.gone.is_empty());
    assert_eq!(store.usage().0, 2);
}

/// A flight's chunks and answer are counted while held, and no longer once it is forgotten
/// and unread; past the bound a finished flight is not kept for its window.
#[tokio::test(start_paused = true)]
async fn flights_count_what_they_hold_until_forgotten_and_are_not_kept_past_their_bound() {
    let flights = Arc::new(Flights::default());
    let tasks = TaskTracker::new();
    let window = Duration::from_secs(5);
    let k = Key([3; 32]);
    let Role::Lead(leader) = flights.join(k, window) else {
        panic!("leads");
    };
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<ChatChunk, ProviderError>>();
    let own = leader.stream(meta(), Box::pin(rx), ("gpt-4o", true), window, &tasks, drop);
    let all = chunks_of("one two three");
    let expected: usize = all.iter().map(flight::chunk_bytes).sum();
    for c in &all {
        tx.unbounded_send(Ok(c.clone())).unwrap();
    }
    drop(tx);
    let read: Vec<_> = own.collect().await;
    assert_eq!(read.len(), all.len());
    tokio::task::yield_now().await;
    // Ended, kept for the window: still held and counted.
    assert_eq!(flights.len(), 1);
    assert_eq!(flights.bytes(), expected);
    tokio::time::advance(window).await;
    tokio::task::yield_now().await;
    assert!(flights.is_empty());
    assert_eq!(flights.bytes(), 0);

    // With a bound below what one answer holds, a finished flight is forgotten at once.
    let whole = answer("one two three");
    let charge = std::mem::size_of::<Answer>() + whole.to_bytes().len();
    flights.set_limit(charge - 1);
    let Role::Lead(leader) = flights.join(k, window) else {
        panic!("leads again");
    };
    leader.complete(meta(), Arc::new(whole.clone()), window, &tasks);
    assert!(flights.is_empty(), "kept past its bound");
    assert_eq!(flights.bytes(), 0);
    // At the bound it is kept (and joinable) for the window.
    flights.set_limit(charge);
    let Role::Lead(leader) = flights.join(k, window) else {
        panic!("leads again");
    };
    leader.complete(meta(), Arc::new(whole), window, &tasks);
    assert_eq!(flights.bytes(), charge);
    assert!(matches!(flights.join(k, window), Role::Follow(_)));
    tasks.close();
    tokio::time::advance(window).await;
    tasks.wait().await;
    assert_eq!(flights.bytes(), 0);
}
