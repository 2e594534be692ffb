//! The Redis Streams job store (cluster mode, `--redis`). Every key carries the hash tag
//! `{jobs}`, so the scripts below touch one slot.
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `floodgate:{jobs}:queue` | stream, group `workers` | one entry per queued attempt: `id`, `seq` |
//! | `floodgate:{jobs}:delayed` | sorted set | retries, scored by when they are due (Unix ms) |
//! | `floodgate:{jobs}:dead` | stream | dead letters: `id`; trimmed by retention (`MINID`) |
//! | `floodgate:{jobs}:job:<id>` | hash | `job` (JSON, without its deliveries), `status`, `seq`, `cancelled` (Unix ms); its notification: `round` (re-drives), `notifier` (the lease holder's token), `notify_until` (Unix ms, Redis's clock), `told_webhook`, `told_email` (a channel's delivery recorded), `told` (every channel), `deliveries` (JSON array, every try recorded) |
//! | `floodgate:{jobs}:reported:<id>` | string | written by earlier versions (`done`: told); still honoured |
//! | `floodgate:{jobs}:seq`, `:delivered` | counters | the queue's order, for positions |
//! | `floodgate:{jobs}:pending` | hash | jobs not over yet per `<tier>\t<tenant>` (field `pending` of a job names its own) |
//! | `floodgate:{jobs}:batches` | hash | each running batch's state: field `<id>` its lines not over yet, `<id>:status` (`in_progress`, `cancelling`, `finalizing`), `<id>:outcome`, `:total`, `:completed`, `:failed`, `:expires` (Unix ms), `:cancelling_at`, `:finalizing_at`; dropped when it is closed (field `batch` of a job names its batch) |
//! | `floodgate:{jobs}:batch-due` | sorted set | running batches by when someone must look at them (Unix ms): the window's end, or a holder's lease |
//! | `floodgate:{jobs}:kv:<file or batch id>` | string | Batch API files, batches (JSON) and their lines (`batch-lines:<id>`), with a TTL |
//!
//! A worker first takes an entry whose claim has been idle for the visibility timeout
//! (`XAUTOCLAIM`: the job of a replica that died), else reads a new one (`XREADGROUP`).
//! While it runs a job it keeps its claim alive (`XCLAIM … JUSTID` with no minimum idle
//! time resets the idle time). A job's outcome is written (script `SAVE`) before its entry is
//! acknowledged (`XACK`, `XDEL`); a retry is written, scheduled and acknowledged in one
//! script. A worker that claims an entry whose job is already over (its previous holder
//! died after writing it) only notifies, if nobody has, and acknowledges. Keeping, saving and
//! acknowledging check first (`XPENDING`) that the entry is still the caller's: a holder
//! whose claim was taken over changes nothing.
//!
//! A notification's lease lives in the job's hash (`notifier`, `notify_until`), taken,
//! renewed and recorded by scripts that check the holder's token and the job's `round`, with
//! Redis's own clock (`TIME`), so replicas' clocks do not matter.
//!
//! `status` is a field of its own so that a cancel (from any replica) changes it atomically
//! and `SAVE` refuses to write over it.

use super::batch::{KEEP, batch_key, lines_key};
use super::store::{
    BatchState, Claim, Created, JobStore, Notice, Notifier, Phase, Result, Step, Submitted,
};
use super::{Channel, Delivery, Job, Policy, Status};
use crate::secret::SecretString;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use std::sync::Mutex;
use std::time::Duration;

const QUEUE: &str = "floodgate:{jobs}:queue";
const DELAYED: &str = "floodgate:{jobs}:delayed";
const DEAD: &str = "floodgate:{jobs}:dead";
const SEQ: &str = "floodgate:{jobs}:seq";
const DELIVERED: &str = "floodgate:{jobs}:delivered";
const JOB: &str = "floodgate:{jobs}:job:";
const REPORTED: &str = "floodgate:{jobs}:reported:";
const GROUP: &str = "workers";
const KV: &str = "floodgate:{jobs}:kv:";
const PENDING: &str = "floodgate:{jobs}:pending";
const BATCHES: &str = "floodgate:{jobs}:batches";
const BATCH_DUE: &str = "floodgate:{jobs}:batch-due";

/// Counts a line over in its running batch (KEYS `batches`, `due`): one line fewer left, one
/// more `outcome` (`completed` or `failed`); the last one makes the batch due at `due_at`
/// (the ending worker's lease), should that worker die before it ends the batch. A line of
/// no batch, or of one closed, counts nowhere.
const LINE_OVER: &str = r"
local function line_over(batches, due, id, outcome, due_at)
  if not id or redis.call('HEXISTS', batches, id .. ':status') == 0 then return end
  local left = redis.call('HINCRBY', batches, id, -1)
  redis.call('HINCRBY', batches, id .. ':' .. outcome, 1)
  if left <= 0 then
    local status = redis.call('HGET', batches, id .. ':status')
    if status == 'in_progress' or status == 'cancelling' then
      redis.call('ZADD', due, due_at, id)
    end
  end
end
";

/// A batch's state as the batch scripts return it: its fields (see [`BATCHES`]) and whether
/// the caller holds its lease.
const BATCH_STATE: &str = r"
local function state(b, id, owned)
  local s = redis.call('HMGET', b, id, id .. ':status', id .. ':outcome', id .. ':total',
    id .. ':completed', id .. ':failed', id .. ':cancelling_at', id .. ':finalizing_at')
  s[9] = owned
  return s
end
";

/// Creates a batch whole, in one step: its record and lines list (KEYS[6], KEYS[7], for
/// ARGV[4] seconds), its state (every line left, due at its window's end ARGV[5]), and each
/// line's job (KEYS[9..], ARGV[7..] in pairs of id and JSON) queued as `ENQUEUE` queues it,
/// all counted in ARGV[6] of the pending counts, unless the last ARGV, a bound (> 0), would
/// be passed. Returns `{first seq, delivered}` (the lines' seqs follow each other), or
/// `{0, pending}` when refused.
const CREATE_BATCH: &str = r"
local id, n = ARGV[1], #KEYS - 8
local bound = tonumber(ARGV[#ARGV])
if bound > 0 then
  local pending = tonumber(redis.call('HGET', KEYS[3], ARGV[6]) or '0')
  if pending + n > bound then return {0, pending} end
end
redis.call('SET', KEYS[6], ARGV[2], 'EX', ARGV[4])
redis.call('SET', KEYS[7], ARGV[3], 'EX', ARGV[4])
redis.call('HSET', KEYS[4], id, n, id .. ':status', 'in_progress', id .. ':total', n,
  id .. ':completed', 0, id .. ':failed', 0, id .. ':expires', ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[5], id)
local first = 0
for i = 1, n do
  local seq = redis.call('INCR', KEYS[2])
  if i == 1 then first = seq end
  redis.call('HSET', KEYS[8 + i], 'job', ARGV[6 + 2 * i], 'status', 'queued', 'seq', seq,
    'pending', ARGV[6], 'batch', id)
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[5 + 2 * i], 'seq', seq)
end
redis.call('HINCRBY', KEYS[3], ARGV[6], n)
return {first, tonumber(redis.call('GET', KEYS[8]) or '0')}
";

/// Moves a batch from in progress to cancelling, and only then (ARGV as for `END_BATCH`): the
/// canceller holds it for the lease. Returns its state; `{}` once closed.
const CANCEL_BATCH: &str = r"
local b, id = KEYS[1], ARGV[1]
local status = redis.call('HGET', b, id .. ':status')
if not status then return {} end
if status == 'in_progress' then
  redis.call('HSET', b, id .. ':status', 'cancelling', id .. ':cancelling_at', ARGV[3])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[4]), id)
end
return state(b, id, '0')
";

/// Decides whether a batch ends now (ARGV[2], Unix ms; ARGV[3] the same in seconds): a
/// cancelling batch with no line left ends `cancelled`; one in progress `completed` with no
/// line left, else `expired` past its window; it then finalizes, held by the caller for
/// ARGV[4] ms. A batch finalizing or cancelling already is held by whoever took it last,
/// until that lease is over; then the caller takes it. Returns its state and whether the
/// caller holds it; `{}` once closed.
const END_BATCH: &str = r"
local b, z, id = KEYS[1], KEYS[2], ARGV[1]
local now, lease = tonumber(ARGV[2]), tonumber(ARGV[4])
local status = redis.call('HGET', b, id .. ':status')
if not status then return {} end
local left = tonumber(redis.call('HGET', b, id) or '0')
local outcome = false
if status == 'cancelling' and left <= 0 then
  outcome = 'cancelled'
elseif status == 'in_progress' then
  local expires = tonumber(redis.call('HGET', b, id .. ':expires'))
  if left <= 0 then
    outcome = 'completed'
  elseif now >= expires then
    outcome = 'expired'
  else
    redis.call('ZADD', z, expires, id)
    return state(b, id, '0')
  end
end
if outcome then
  redis.call('HSET', b, id .. ':status', 'finalizing', id .. ':outcome', outcome,
    id .. ':finalizing_at', ARGV[3])
elseif tonumber(redis.call('ZSCORE', z, id) or '0') > now then
  return state(b, id, '0')
end
redis.call('ZADD', z, now + lease, id)
return state(b, id, '1')
";

/// Stores a batch's final record (KEYS[3], ARGV[2], for ARGV[3] s) and drops its state, if
/// it is still finalizing: 1, else 0 (another holder closed it).
const CLOSE_BATCH: &str = r"
local id = ARGV[1]
if redis.call('HGET', KEYS[1], id .. ':status') ~= 'finalizing' then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
redis.call('HDEL', KEYS[1], id, id .. ':status', id .. ':outcome', id .. ':total',
  id .. ':completed', id .. ':failed', id .. ':expires', id .. ':cancelling_at',
  id .. ':finalizing_at')
redis.call('ZREM', KEYS[2], id)
return 1
";

/// The fields of a batch's state in [`BATCHES`], in the order [`parse_state`] reads them.
fn state_fields(id: &str) -> [String; 8] {
    [
        id.to_owned(),
        format!("{id}:status"),
        format!("{id}:outcome"),
        format!("{id}:total"),
        format!("{id}:completed"),
        format!("{id}:failed"),
        format!("{id}:cancelling_at"),
        format!("{id}:finalizing_at"),
    ]
}

/// A batch's state from its fields ([`state_fields`], then the lease flag); `None` when it
/// has none (closed).
fn parse_state(v: &[Option<String>]) -> Option<BatchState> {
    let text = |i: usize| v.get(i).and_then(|x| x.as_deref());
    let num = |i: usize| text(i).and_then(|x| x.parse::<i64>().ok());
    let count = |i: usize| num(i).unwrap_or(0).max(0) as u64;
    let at = |i: usize| num(i).map(|n| n.max(0) as u64);
    Some(BatchState {
        phase: Phase::parse(text(1)?, text(2))?,
        total: count(3),
        left: count(0),
        completed: count(4),
        failed: count(5),
        cancelling_at: at(6),
        finalizing_at: at(7),
        owned: text(8) == Some("1"),
    })
}

/// The field of [`PENDING`] that counts `job`.
fn pending_field(job: &Job) -> String {
    let (tier, tenant) = job.pending_key();
    format!("{tier}\t{tenant}")
}

/// Queues a job unless its (tier, tenant) pair has ARGV[5] (> 0) jobs pending already: the
/// count and the queueing in one step, so concurrent submissions never pass the bound. Then
/// the next seq, the job's fields (its batch, ARGV[6], if any), a stream entry. Returns `{seq, delivered}` (its place and
/// the delivered mark, for its position), or `{0, pending}` when refused: one round trip
/// per acceptance.
const ENQUEUE: &str = r"
local bound = tonumber(ARGV[5])
if bound > 0 then
  local pending = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
  if pending >= bound then return {0, pending} end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], 'job', ARGV[2], 'status', ARGV[3], 'seq', seq, 'pending', ARGV[4])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], 'batch', ARGV[6]) end
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
redis.call('HDEL', KEYS[3], 'cancelled')
redis.call('PERSIST', KEYS[3])
redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'seq', seq)
return {seq, tonumber(redis.call('GET', KEYS[5]) or '0')}
";

/// Moves one due retry to the stream: KEYS[4] is its job (ARGV[1] its id), read by the
/// caller from the delayed set first, so that every key the script touches is declared.
/// Removed from the set only if still there (another replica may have moved it).
const PROMOTE: &str = r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[4], 'status') ~= 'retrying' then return 0 end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[4], 'seq', seq)
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'seq', seq)
return 1
";

/// Writes a claimed job unless it is over already (cancelled, or finished by another holder
/// whose claim this one outlived) or its entry (ARGV[4]) is no longer the caller's (ARGV[10]:
/// taken over), and does the step: `retry` schedules it and acknowledges its entry; `finish`
/// sets its TTL, dead-letters it if asked (the dead letters trimmed to those younger than
/// ARGV[11] ms, by Redis's clock, as entry ids are), and counts it over in its batch (KEYS[6], KEYS[7]; ARGV[9] the lease of the
/// worker that ends the batch). A finished job is never reopened.
const SAVE: &str = r"
local current = redis.call('HGET', KEYS[1], 'status')
if current == 'cancelled' or current == 'completed' or current == 'failed' then return 0 end
if not owns(KEYS[2], ARGV[4], ARGV[10]) then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'status', ARGV[2])
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
  redis.call('XACK', KEYS[2], 'workers', ARGV[4])
  redis.call('XDEL', KEYS[2], ARGV[4])
elseif ARGV[3] == 'finish' then
  local field = redis.call('HGET', KEYS[1], 'pending')
  if field and tonumber(redis.call('HGET', KEYS[5], field) or '0') > 0 then
    redis.call('HINCRBY', KEYS[5], field, -1)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  if ARGV[8] == '1' then
    local t = redis.call('TIME')
    local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[11])
    redis.call('XADD', KEYS[4], 'MINID', math.max(oldest, 0), '*', 'id', ARGV[6])
  end
  local outcome = 'failed'
  if ARGV[2] == 'completed' then outcome = 'completed' end
  line_over(KEYS[6], KEYS[7], redis.call('HGET', KEYS[1], 'batch'), outcome, ARGV[9])
end
return 1
";

/// Cancels a job that has not finished (counted over in its batch, KEYS[5] and KEYS[6], like
/// a failed one; ARGV[4] as in `SAVE`); it is kept for ARGV[3] seconds, like a result. A job
/// waiting for its retry goes back to the queue (KEYS[3]), cancelled, for a worker to tell
/// its caller; a queued or running one has its entry already.
const CANCEL: &str = r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 0 end
if s == 'queued' or s == 'retrying' or s == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled', ARGV[2])
  local field = redis.call('HGET', KEYS[1], 'pending')
  if field and tonumber(redis.call('HGET', KEYS[4], field) or '0') > 0 then
    redis.call('HINCRBY', KEYS[4], field, -1)
  end
  line_over(KEYS[5], KEYS[6], redis.call('HGET', KEYS[1], 'batch'), 'failed', ARGV[4])
  if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
    redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'seq', redis.call('HGET', KEYS[1], 'seq') or 0)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
";

/// Re-drives a dead letter in one step: drops its dead entry (ARGV[1]) and, only if that
/// entry was still there, writes the reset job, starts its next notification round (ARGV[5]:
/// a holder of the last one can no longer record, and the next outcome is told afresh),
/// counts it again as left (not failed) in its batch (KEYS[7]) if that still runs, and
/// queues it, so a replica that dies half-way cannot lose it and two admins cannot queue it
/// twice.
const REDRIVE: &str = r"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[4], 'job', ARGV[3], 'status', 'queued', 'seq', seq, 'pending', ARGV[4],
  'round', ARGV[5])
redis.call('HDEL', KEYS[4], 'told', 'told_webhook', 'told_email', 'notifier', 'notify_until')
redis.call('HINCRBY', KEYS[6], ARGV[4], 1)
local batch = redis.call('HGET', KEYS[4], 'batch')
if batch and redis.call('HEXISTS', KEYS[7], batch .. ':status') == 1 then
  redis.call('HINCRBY', KEYS[7], batch, 1)
  redis.call('HINCRBY', KEYS[7], batch .. ':failed', -1)
end
redis.call('HDEL', KEYS[4], 'cancelled')
redis.call('PERSIST', KEYS[4])
redis.call('DEL', KEYS[5])
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'seq', seq)
return 1
";

/// Whether the stream entry `entry` of `queue` is pending for `consumer` (claimed by it, not
/// acknowledged, not taken over).
const OWNS: &str = r"
local function owns(queue, entry, consumer)
  local p = redis.call('XPENDING', queue, 'workers', entry, entry, 1)
  return p[1] ~= nil and p[1][2] == consumer
end
";

/// Keeps a claim alive (KEYS[1] the queue; ARGV entry, consumer) if it is still the caller's.
const KEEP_CLAIM: &str = r"
if not owns(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('XCLAIM', KEYS[1], 'workers', ARGV[2], 0, ARGV[1], 'JUSTID')
return 1
";

/// Acknowledges a claim (KEYS[1] the queue; ARGV entry, consumer) if it is still the caller's.
const ACK: &str = r"
if not owns(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
";

/// Redis's clock in Unix ms, and whether the notification of job hash `k` in round `round`
/// is held by `token` (its round, its token, not told yet).
const NOTICE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function in_round(k, round)
  return tonumber(redis.call('HGET', k, 'round') or '0') == tonumber(round)
end
local function held(k, round, token)
  return in_round(k, round) and redis.call('HGET', k, 'told') ~= '1'
    and redis.call('HGET', k, 'notifier') == token
end
";

/// Takes the lease on a job's notification (KEYS[1] its hash, KEYS[2] the mark of earlier
/// versions; ARGV round, token, lease ms). Returns `{'granted', told_webhook, told_email}`,
/// or `{'busy'}`, `{'done'}` (told, or the job is gone), `{'stale'}` (re-driven since).
const BEGIN_NOTICE: &str = r"
local k = KEYS[1]
if redis.call('EXISTS', k) == 0 then return {'done'} end
if not in_round(k, ARGV[1]) then return {'stale'} end
if redis.call('HGET', k, 'told') == '1' or redis.call('GET', KEYS[2]) == 'done' then
  return {'done'}
end
local now = now_ms()
local holder = redis.call('HGET', k, 'notifier')
if holder and holder ~= ARGV[2] and tonumber(redis.call('HGET', k, 'notify_until') or '0') > now then
  return {'busy'}
end
redis.call('HSET', k, 'notifier', ARGV[2], 'notify_until', now + tonumber(ARGV[3]))
return {'granted', redis.call('HGET', k, 'told_webhook') or '', redis.call('HGET', k, 'told_email') or ''}
";

/// Extends a notification's lease (ARGV as for `BEGIN_NOTICE`) if the caller still holds it.
const RENEW_NOTICE: &str = r"
local k = KEYS[1]
if not held(k, ARGV[1], ARGV[2]) then return 0 end
redis.call('HSET', k, 'notify_until', now_ms() + tonumber(ARGV[3]))
return 1
";

/// Records a channel's delivery (ARGV round, token, channel, the tries as a JSON array, then
/// the channels wanted) if the caller still holds the lease: the tries appended to
/// `deliveries`, the channel marked; with every wanted channel marked, `told` and the lease
/// released.
const RECORD_NOTICE: &str = r"
local k = KEYS[1]
if not held(k, ARGV[1], ARGV[2]) then return 0 end
local tries = ARGV[4]
if tries ~= '[]' then
  local old = redis.call('HGET', k, 'deliveries')
  if old and old ~= '[]' then tries = string.sub(old, 1, -2) .. ',' .. string.sub(tries, 2) end
  redis.call('HSET', k, 'deliveries', tries)
end
redis.call('HSET', k, 'told_' .. ARGV[3], '1')
for i = 5, #ARGV do
  if redis.call('HGET', k, 'told_' .. ARGV[i]) ~= '1' then return 1 end
end
redis.call('HSET', k, 'told', '1')
redis.call('HDEL', k, 'notifier', 'notify_until')
return 1
";

/// Raises the delivered mark to ARGV[1].
const DELIVERED_UP_TO: &str = r"
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > d then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
";

/// How long a blocking read waits at most; the worker loops.
const BLOCK: Duration = Duration::from_millis(500);

/// Jobs in Redis Streams.
pub struct RedisStore {
    client: redis::Client,
    /// Made on first use (and the consumer group with it), so a replica starts while Redis
    /// is unreachable: until it is reached, the jobs API answers 503 and workers wait.
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// Connections for blocking reads, which would hold up a shared one.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    visibility: Duration,
    enqueue: redis::Script,
    promote: redis::Script,
    save: redis::Script,
    cancel: redis::Script,
    delivered: redis::Script,
    redrive: redis::Script,
    /// Boxed: they would make the store (and so the [`super::Store`] enum) large.
    batches: Box<BatchScripts>,
    /// Claims and notifications.
    holds: Box<HoldScripts>,
}

/// The scripts that keep and release claims and notification leases.
struct HoldScripts {
    keep: redis::Script,
    ack: redis::Script,
    begin: redis::Script,
    renew: redis::Script,
    record: redis::Script,
}

/// The Batch API's scripts.
struct BatchScripts {
    create: redis::Script,
    cancel: redis::Script,
    end: redis::Script,
    close: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("visibility", &self.visibility)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The store on the Redis at `url` (connected on first use). A claim idle for
    /// `visibility` is taken over by another worker.
    pub fn new(url: &SecretString, visibility: Duration) -> Result<Self> {
        Ok(RedisStore {
            client: redis::Client::open(url.expose())?,
            conn: tokio::sync::OnceCell::new(),
            blocking: Mutex::new(Vec::new()),
            visibility,
            enqueue: redis::Script::new(ENQUEUE),
            promote: redis::Script::new(PROMOTE),
            save: redis::Script::new(&format!("{LINE_OVER}{OWNS}{SAVE}")),
            cancel: redis::Script::new(&format!("{LINE_OVER}{CANCEL}")),
            delivered: redis::Script::new(DELIVERED_UP_TO),
            redrive: redis::Script::new(REDRIVE),
            batches: Box::new(BatchScripts {
                create: redis::Script::new(CREATE_BATCH),
                cancel: redis::Script::new(&format!("{BATCH_STATE}{CANCEL_BATCH}")),
                end: redis::Script::new(&format!("{BATCH_STATE}{END_BATCH}")),
                close: redis::Script::new(CLOSE_BATCH),
            }),
            holds: Box::new(HoldScripts {
                keep: redis::Script::new(&format!("{OWNS}{KEEP_CLAIM}")),
                ack: redis::Script::new(&format!("{OWNS}{ACK}")),
                begin: redis::Script::new(&format!("{NOTICE}{BEGIN_NOTICE}")),
                renew: redis::Script::new(&format!("{NOTICE}{RENEW_NOTICE}")),
                record: redis::Script::new(&format!("{NOTICE}{RECORD_NOTICE}")),
            }),
        })
    }

    /// When a lease on a batch taken now ends (Unix ms): a holder silent for the visibility
    /// timeout is presumed dead, as a claim is.
    fn lease_end(&self) -> u64 {
        super::now_ms() + self.visibility.as_millis() as u64
    }

    /// Runs `script` ([`CANCEL_BATCH`] or [`END_BATCH`]) on batch `id` at `at` (Unix s): the
    /// batch's state after it.
    async fn batch_step(
        &self,
        script: &redis::Script,
        id: &str,
        at: u64,
    ) -> Result<Option<BatchState>> {
        let mut conn = self.conn().await?;
        let fields: Vec<Option<String>> = script
            .key(BATCHES)
            .key(BATCH_DUE)
            .arg(id)
            .arg(super::now_ms())
            .arg(at)
            .arg(self.visibility.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(parse_state(&fields))
    }

    /// Up to 100 members of the sorted set `key` due now (scored by Unix ms), soonest first.
    async fn due(&self, key: &str) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("ZRANGEBYSCORE")
            .arg(key)
            .arg("-inf")
            .arg(super::now_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut conn)
            .await?)
    }

    /// The shared connection, made (with the consumer group) on first use.
    async fn conn(&self) -> Result<ConnectionManager> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(2)))
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    // Fail at once while Redis is unreachable (the caller answers 503);
                    // once made, the manager reconnects by itself.
                    .set_number_of_retries(0);
                let mut conn =
                    ConnectionManager::new_with_config(self.client.clone(), config).await?;
                let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(QUEUE)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn)
                    .await;
                match created {
                    Ok(_) => Ok(conn),
                    Err(e) if e.code() == Some("BUSYGROUP") => Ok(conn),
                    Err(e) => Err(super::StoreError::from(e)),
                }
            })
            .await?;
        Ok(conn.clone())
    }

    async fn blocking_conn(&self) -> Result<MultiplexedConnection> {
        let pooled = self
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(BLOCK + Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(2)));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    fn give_back(&self, conn: MultiplexedConnection) {
        self.blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    async fn load(&self, id: &str) -> Result<Option<Job>> {
        let mut conn = self.conn().await?;
        let (json, status, seq, cancelled, deliveries): StoredFields = redis::cmd("HMGET")
            .arg(format!("{JOB}{id}"))
            .arg("job")
            .arg("status")
            .arg("seq")
            .arg("cancelled")
            .arg("deliveries")
            .query_async(&mut conn)
            .await?;
        let Some(json) = json else { return Ok(None) };
        let mut job: Job = serde_json::from_str(&json)?;
        if let Some(d) = deliveries {
            // Recorded by the notifications (`RECORD_NOTICE`), beside the JSON.
            job.deliveries
                .extend(serde_json::from_str::<Vec<Delivery>>(&d)?);
        }
        if let Some(status) = status.and_then(|s| parse_status(&s)) {
            job.status = status;
        }
        if let Some(seq) = seq {
            job.seq = seq;
        }
        if job.status == Status::Cancelled && job.finished_ms.is_none() {
            job.finished_ms = cancelled;
        }
        Ok(Some(job))
    }

    /// Runs [`ENQUEUE`]: `(seq, delivered)`, or `(0, pending)` when refused.
    async fn enqueue(&self, job: &Job, bound: u64) -> Result<(u64, u64)> {
        let mut conn = self.conn().await?;
        let json = stored_json(job)?;
        Ok(self
            .enqueue
            .key(QUEUE)
            .key(SEQ)
            .key(format!("{JOB}{}", job.id))
            .key(PENDING)
            .key(DELIVERED)
            .arg(&job.id)
            .arg(json)
            .arg(job.status.as_str())
            .arg(pending_field(job))
            .arg(bound)
            .arg(job.batch.as_deref().unwrap_or(""))
            .invoke_async(&mut conn)
            .await?)
    }

    /// The entry `XAUTOCLAIM` or `XREADGROUP` handed over.
    async fn next_entry(&self, consumer: &str, wait: Duration) -> Result<Option<Entry>> {
        let mut conn = self.conn().await?;
        let due = self.due(DELAYED).await?;
        for id in due {
            let _: u64 = self
                .promote
                .key(DELAYED)
                .key(QUEUE)
                .key(SEQ)
                .key(format!("{JOB}{id}"))
                .arg(&id)
                .invoke_async(&mut conn)
                .await?;
        }
        let reclaimed: Value = redis::cmd("XAUTOCLAIM")
            .arg(QUEUE)
            .arg(GROUP)
            .arg(consumer)
            .arg(self.visibility.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        if let Value::Array(parts) = &reclaimed
            && let Some(entry) = parts.get(1).and_then(first_entry)
        {
            tracing::info!(job = %entry.job, "reclaimed a job whose claim expired");
            return Ok(Some(entry));
        }
        let mut blocking = self.blocking_conn().await?;
        let read: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(wait.min(BLOCK).as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(QUEUE)
            .arg(">")
            .query_async(&mut blocking)
            .await;
        self.give_back(blocking);
        // [[stream, [entry, ...]]] (RESP2) or {stream: [entry, ...]} (RESP3)
        let entry = match &read? {
            Value::Array(streams) => streams.first().and_then(|s| match s {
                Value::Array(pair) => pair.get(1).and_then(first_entry),
                _ => None,
            }),
            Value::Map(streams) => streams.first().and_then(|(_, e)| first_entry(e)),
            _ => None,
        };
        Ok(entry)
    }

    /// Runs `script` ([`KEEP_CLAIM`] or [`ACK`]) on `entry` for `consumer`: whether it was the
    /// consumer's.
    async fn hold(&self, script: &redis::Script, entry: &str, consumer: &str) -> Result<bool> {
        let mut conn = self.conn().await?;
        let held: u64 = script
            .key(QUEUE)
            .arg(entry)
            .arg(consumer)
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    /// Runs `script` ([`RENEW_NOTICE`] or [`RECORD_NOTICE`]) for `notifier` with `args`
    /// after its round and token: whether it still held the lease.
    async fn notice_step(
        &self,
        script: &redis::Script,
        notifier: &Notifier,
        args: &[String],
    ) -> Result<bool> {
        let mut conn = self.conn().await?;
        let mut call = script.prepare_invoke();
        call.key(format!("{JOB}{}", notifier.job))
            .arg(notifier.round)
            .arg(&notifier.token);
        for a in args {
            call.arg(a);
        }
        let held: u64 = call.invoke_async(&mut conn).await?;
        Ok(held == 1)
    }

    /// Every dead-letter entry: (entry id, job id), oldest first.
    async fn dead_entries(&self) -> Result<Vec<(String, String)>> {
        let mut conn = self.conn().await?;
        let all: Value = redis::cmd("XRANGE")
            .arg(DEAD)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        let Value::Array(entries) = all else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .filter_map(entry)
            .map(|e| (e.id, e.job))
            .collect())
    }
}

/// A stream entry: a queue's (a job's attempt) or a dead letter.
struct Entry {
    /// The entry's id.
    id: String,
    /// Its job's id (field `id`).
    job: String,
    /// Its place in the queue's order (field `seq`; not in dead letters).
    seq: Option<u64>,
}

/// The first entry of a list of entries.
fn first_entry(entries: &Value) -> Option<Entry> {
    let Value::Array(entries) = entries else {
        return None;
    };
    entry(entries.first()?)
}

/// One `[id, [field, value, ...]]` entry.
fn entry(value: &Value) -> Option<Entry> {
    let Value::Array(entry) = value else {
        return None;
    };
    let id = text(entry.first()?)?;
    let fields: Vec<Value> = match entry.get(1)? {
        Value::Array(f) => f.clone(),
        Value::Map(m) => m.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect(),
        _ => return None,
    };
    let field = |name: &str| {
        fields.chunks(2).find_map(|pair| match pair {
            [k, v] if text(k).as_deref() == Some(name) => text(v),
            _ => None,
        })
    };
    Some(Entry {
        id,
        job: field("id")?,
        seq: field("seq").and_then(|s| s.parse().ok()),
    })
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn parse_status(s: &str) -> Option<Status> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// A job hash's fields as [`RedisStore::load`] reads them: `job`, `status`, `seq`,
/// `cancelled`, `deliveries`.
type StoredFields = (
    Option<String>,
    Option<String>,
    Option<u64>,
    Option<u64>,
    Option<String>,
);

/// `job` as its hash's `job` field holds it: without its deliveries, which the notifications
/// record in a field of their own.
fn stored_json(job: &Job) -> Result<String> {
    if job.deliveries.is_empty() {
        return Ok(serde_json::to_string(job)?);
    }
    let mut bare = job.clone();
    bare.deliveries.clear();
    Ok(serde_json::to_string(&bare)?)
}

impl JobStore for RedisStore {
    async fn submit(&self, mut job: Job, bound: u64) -> Result<Submitted> {
        let (seq, n) = self.enqueue(&job, bound).await?;
        if seq == 0 {
            return Ok(Submitted::Full { pending: n });
        }
        job.seq = seq;
        Ok(Submitted::Queued {
            job: Box::new(job),
            ahead: seq.saturating_sub(n + 1),
        })
    }

    async fn get(&self, id: &str) -> Result<Option<Job>> {
        self.load(id).await
    }

    async fn position(&self, job: &Job) -> Result<u64> {
        let mut conn = self.conn().await?;
        let delivered: Option<u64> = redis::cmd("GET")
            .arg(DELIVERED)
            .query_async(&mut conn)
            .await?;
        Ok(job.seq.saturating_sub(delivered.unwrap_or(0) + 1))
    }

    async fn claim(&self, consumer: &str, wait: Duration) -> Result<Option<Claim>> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let Some(Entry {
                id: entry,
                job,
                seq,
            }) = self.next_entry(consumer, left).await?
            else {
                if left.is_zero() {
                    return Ok(None);
                }
                continue;
            };
            let Some(job) = self.load(&job).await? else {
                // Expired or never written: nothing to run.
                self.hold(&self.holds.ack, &entry, consumer).await?;
                continue;
            };
            if !job.status.is_terminal() && seq.is_some_and(|s| s != job.seq) {
                // An older entry of a job queued again since (re-driven while the holder of
                // this one, notifying its failure, died): the newer entry runs it.
                self.hold(&self.holds.ack, &entry, consumer).await?;
                continue;
            }
            let mut conn = self.conn().await?;
            let _: u64 = self
                .delivered
                .key(DELIVERED)
                .arg(job.seq)
                .invoke_async(&mut conn)
                .await?;
            return Ok(Some(Claim {
                job,
                entry,
                consumer: consumer.to_owned(),
            }));
        }
    }

    async fn keep(&self, claim: &Claim) -> Result<bool> {
        self.hold(&self.holds.keep, &claim.entry, &claim.consumer)
            .await
    }

    async fn save(&self, claim: &Claim, job: &Job, step: Step, policy: &Policy) -> Result<bool> {
        let mut conn = self.conn().await?;
        let (name, due) = match step {
            Step::Start => ("start", 0),
            Step::Retry { delay } => ("retry", super::now_ms() + delay.as_millis() as u64),
            Step::Finish => ("finish", 0),
        };
        let kept = policy.kept(job);
        let written: u64 = self
            .save
            .key(format!("{JOB}{}", job.id))
            .key(QUEUE)
            .key(DELAYED)
            .key(DEAD)
            .key(PENDING)
            .key(BATCHES)
            .key(BATCH_DUE)
            .arg(stored_json(job)?)
            .arg(job.status.as_str())
            .arg(name)
            .arg(&claim.entry)
            .arg(due)
            .arg(&job.id)
            .arg(kept.as_secs().max(1))
            .arg(if job.dead_letter { "1" } else { "0" })
            .arg(self.lease_end())
            .arg(&claim.consumer)
            .arg(policy.retention.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(written == 1)
    }

    async fn ack(&self, claim: &Claim) -> Result<()> {
        self.hold(&self.holds.ack, &claim.entry, &claim.consumer)
            .await?;
        Ok(())
    }

    async fn cancel(&self, id: &str) -> Result<Option<Job>> {
        let mut conn = self.conn().await?;
        let _: u64 = self
            .cancel
            .key(format!("{JOB}{id}"))
            .key(DELAYED)
            .key(QUEUE)
            .key(PENDING)
            .key(BATCHES)
            .key(BATCH_DUE)
            .arg(id)
            .arg(super::now_ms())
            .arg(super::CANCELLED_KEPT.as_secs())
            .arg(self.lease_end())
            .invoke_async(&mut conn)
            .await?;
        self.load(id).await
    }

    async fn begin_notice(&self, notifier: &Notifier, lease: Duration) -> Result<Notice> {
        let mut conn = self.conn().await?;
        let found: Vec<String> = self
            .holds
            .begin
            .key(format!("{JOB}{}", notifier.job))
            .key(format!("{REPORTED}{}", notifier.job))
            .arg(notifier.round)
            .arg(&notifier.token)
            .arg(lease.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(match found.first().map(String::as_str) {
            Some("granted") => Notice::Granted {
                webhook: found.get(1).is_some_and(|v| v == "1"),
                email: found.get(2).is_some_and(|v| v == "1"),
            },
            Some("busy") => Notice::Busy,
            Some("stale") => Notice::Stale,
            _ => Notice::Done,
        })
    }

    async fn renew_notice(&self, notifier: &Notifier, lease: Duration) -> Result<bool> {
        let ms = lease.as_millis().max(1).to_string();
        self.notice_step(&self.holds.renew, notifier, &[ms]).await
    }

    async fn record_notice(
        &self,
        notifier: &Notifier,
        channel: Channel,
        tries: &[Delivery],
        wanted: &[Channel],
    ) -> Result<bool> {
        let mut args = vec![channel.as_str().to_owned(), serde_json::to_string(tries)?];
        args.extend(wanted.iter().map(|c| c.as_str().to_owned()));
        self.notice_step(&self.holds.record, notifier, &args).await
    }

    async fn dead_letters(&self, retention: Duration) -> Result<Vec<Job>> {
        let mut conn = self.conn().await?;
        let oldest = super::now_ms().saturating_sub(retention.as_millis() as u64);
        let _: Value = redis::cmd("XTRIM")
            .arg(DEAD)
            .arg("MINID")
            .arg(oldest)
            .query_async(&mut conn)
            .await?;
        let mut jobs = Vec::new();
        for (_, id) in self.dead_entries().await? {
            if let Some(job) = self.load(&id).await? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    async fn redrive(&self, id: Option<&str>) -> Result<u64> {
        let mut n = 0;
        for (entry, dead_id) in self.dead_entries().await? {
            if id.is_some_and(|id| id != dead_id) {
                continue;
            }
            // The job is read before its dead entry is touched: a job that cannot be read
            // stays a dead letter.
            let Some(mut job) = self.load(&dead_id).await? else {
                continue;
            };
            job.reset();
            let mut conn = self.conn().await?;
            let queued: u64 = self
                .redrive
                .key(DEAD)
                .key(QUEUE)
                .key(SEQ)
                .key(format!("{JOB}{dead_id}"))
                .key(format!("{REPORTED}{dead_id}"))
                .key(PENDING)
                .key(BATCHES)
                .arg(&entry)
                .arg(&dead_id)
                .arg(stored_json(&job)?)
                .arg(pending_field(&job))
                .arg(job.redrives)
                .invoke_async(&mut conn)
                .await?;
            n += queued; // 0: another admin re-drove it meanwhile
        }
        Ok(n)
    }

    async fn purge(&self) -> Result<u64> {
        let mut conn = self.conn().await?;
        let (n, _): (u64, Value) = redis::pipe()
            .cmd("XLEN")
            .arg(DEAD)
            .cmd("DEL")
            .arg(DEAD)
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    async fn pending(&self) -> Result<Vec<((String, String), u64)>> {
        let mut conn = self.conn().await?;
        let all: Vec<(String, i64)> = redis::cmd("HGETALL")
            .arg(PENDING)
            .query_async(&mut conn)
            .await?;
        Ok(all
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(field, n)| {
                let (tier, tenant) = field.split_once('\t').unwrap_or((field.as_str(), ""));
                ((tier.to_owned(), tenant.to_owned()), n as u64)
            })
            .collect())
    }

    async fn pending_for(&self, tier: &str, tenant: &str) -> Result<u64> {
        let mut conn = self.conn().await?;
        let n: Option<i64> = redis::cmd("HGET")
            .arg(PENDING)
            .arg(format!("{tier}\t{tenant}"))
            .query_async(&mut conn)
            .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn create_batch(
        &self,
        id: &str,
        record: String,
        lines: String,
        jobs: Vec<Job>,
        window: Duration,
        bound: u64,
    ) -> Result<Created> {
        let Some(first) = jobs.first() else {
            return Ok(Created::Queued(jobs));
        };
        let mut conn = self.conn().await?;
        let expires = super::now_ms() + window.as_millis() as u64;
        // The record outlives the window, so the batch can still be ended at its end.
        let ttl = (window + KEEP).as_secs();
        let mut call = self.batches.create.prepare_invoke();
        call.key(QUEUE)
            .key(SEQ)
            .key(PENDING)
            .key(BATCHES)
            .key(BATCH_DUE)
            .key(format!("{KV}{}", batch_key(id)))
            .key(format!("{KV}{}", lines_key(id)))
            .key(DELIVERED)
            .arg(id)
            .arg(record)
            .arg(lines)
            .arg(ttl)
            .arg(expires)
            .arg(pending_field(first));
        for job in &jobs {
            call.key(format!("{JOB}{}", job.id))
                .arg(&job.id)
                .arg(stored_json(job)?);
        }
        call.arg(bound);
        let (seq, n): (u64, u64) = call.invoke_async(&mut conn).await?;
        if seq == 0 {
            return Ok(Created::Full { pending: n });
        }
        Ok(Created::Queued(
            jobs.into_iter()
                .zip(seq..)
                .map(|(mut job, seq)| {
                    job.seq = seq;
                    job
                })
                .collect(),
        ))
    }

    async fn batch(&self, id: &str) -> Result<Option<(String, Option<BatchState>)>> {
        let mut conn = self.conn().await?;
        let (record, fields): (Option<String>, Vec<Option<String>>) = redis::pipe()
            .cmd("GET")
            .arg(format!("{KV}{}", batch_key(id)))
            .cmd("HMGET")
            .arg(BATCHES)
            .arg(&state_fields(id)[..])
            .query_async(&mut conn)
            .await?;
        Ok(record.map(|r| (r, parse_state(&fields))))
    }

    async fn cancel_batch(&self, id: &str, at: u64) -> Result<Option<BatchState>> {
        self.batch_step(&self.batches.cancel, id, at).await
    }

    async fn end_batch(&self, id: &str, at: u64) -> Result<Option<BatchState>> {
        self.batch_step(&self.batches.end, id, at).await
    }

    async fn close_batch(&self, id: &str, record: String) -> Result<bool> {
        let mut conn = self.conn().await?;
        let closed: u64 = self
            .batches
            .close
            .key(BATCHES)
            .key(BATCH_DUE)
            .key(format!("{KV}{}", batch_key(id)))
            .arg(id)
            .arg(record)
            .arg(KEEP.as_secs())
            .invoke_async(&mut conn)
            .await?;
        Ok(closed == 1)
    }

    async fn due_batches(&self) -> Result<Vec<String>> {
        self.due(BATCH_DUE).await
    }

    async fn put(&self, key: &str, value: String, ttl: Duration) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: Value = redis::cmd("SET")
            .arg(format!("{KV}{key}"))
            .arg(value)
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn fetch(&self, key: &str) -> Result<Option<String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("GET")
            .arg(format!("{KV}{key}"))
            .query_async(&mut conn)
            .await?)
    }
}
