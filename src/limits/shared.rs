//! Callers' limits, budgets and key cooldowns shared by several instances
//! through Redis (or Valkey): the second backend of [`super`].
//!
//! Every admission is one Lua script (`EVALSHA`) that frees expired
//! reservations, checks every limit and reserves, atomically on the
//! server; every settle is one more. Both run on one multiplexed
//! connection, each bounded by `shared_state.timeout`.
//!
//! - Rolling windows are hashes of per-second buckets (`second → amount`),
//!   pruned by the script that reads them and expiring after a minute.
//! - Reservations and concurrency slots are sorted sets scored by a
//!   deadline ([`LEASE`] ahead). This instance's heartbeat pushes the
//!   deadlines of its open tickets forward every [`BEAT`]; a crashed
//!   instance's tickets stop being pushed and free themselves.
//! - Budgets: each instance writes its own settled spend of the period
//!   (restored from its own usage files at start) under its `instance` id,
//!   as an absolute figure that only grows; the total is the sum of the
//!   entries. A flushed or new Redis is re-filled by the next admission,
//!   settle or heartbeat of each instance, never counted twice.
//! - Cooldowns: a hash of `client\tkey → until (ms since the epoch)`,
//!   only ever raised, plus a pub/sub message for instances already
//!   running; one joining later reads the hash.
//!
//! When a call fails or takes longer than `timeout`, the instance is in
//! **outage** at once and `on_outage` applies to every request until the
//! supervisor ([`SharedState::run`]) has Redis answering again; it then
//! replays the settles it could not deliver, adds what was admitted in
//! process meanwhile to the shared windows, and returns to shared mode.
//! No request ever waits on the supervisor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};

use super::{CallerState, Cost, Headroom, Periods, Refusal, Ticket};
use crate::config::{CallerLimits, OnOutage, Per, SharedStateConfig};

/// How long a reservation or slot lives in Redis unless refreshed.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often this instance refreshes its tickets and republishes its spend.
pub const BEAT: Duration = Duration::from_secs(1);
/// How often the supervisor retries while Redis does not answer.
const RETRY: Duration = Duration::from_millis(500);
/// Settles kept for replay while Redis does not answer; older ones are
/// dropped (their reservations free themselves at their deadline).
const MAX_UNSETTLED: usize = 100_000;
/// The pub/sub channel of cooldowns.
const COOLDOWN_CHANNEL: &str = "gptbalance:cooldowns";
/// The hash of running cooldowns, for instances that join later.
const COOLDOWN_HASH: &str = "gptbalance:cooldowns";

/// Frees expired tickets, checks every limit, reserves; one atomic step.
/// KEYS: slots, tickets, amounts, rpm, tpm, spend:day, spend:month.
/// ARGV: ticket, lease_ms, concurrency, rpm, tpm, budget_tokens,
/// budget_tokens_per (d|m), budget_nanos, budget_nanos_per, cost_tokens,
/// cost_nanos, instance, own day tokens, own day nanos, own month tokens,
/// own month nanos (-1: no such limit).
const ADMIT: &str = r#"
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = {}
for i = 2, 16 do a[i] = tonumber(ARGV[i]) end
if a[2] == nil then a[2] = 0 end
local function hmax(key, field, v, ttl)
  local cur = tonumber(redis.call('HGET', key, field) or '0')
  if v > cur then redis.call('HSET', key, field, v) end
  redis.call('EXPIRE', key, ttl)
end
hmax(KEYS[6], ARGV[12] .. ':t', a[13], 259200)
hmax(KEYS[6], ARGV[12] .. ':n', a[14], 259200)
hmax(KEYS[7], ARGV[12] .. ':t', a[15], 3456000)
hmax(KEYS[7], ARGV[12] .. ':n', a[16], 3456000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[3], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if a[3] >= 0 and redis.call('ZCARD', KEYS[1]) >= a[3] then return {1, 0, 0, 0, 0, sec} end
-- A rolling minute of per-second buckets: its sum, and the seconds in order.
local function window(key)
  local all = redis.call('HGETALL', key)
  local live, sum = {}, 0
  for i = 1, #all, 2 do
    local s, v = tonumber(all[i]), tonumber(all[i + 1])
    if s <= sec - 60 then redis.call('HDEL', key, all[i])
    else sum = sum + v; live[#live + 1] = {s, v} end
  end
  table.sort(live, function(x, y) return x[1] < y[1] end)
  return sum, live
end
-- Seconds until the window holds at most target.
local function wait(sum, live, target)
  for _, e in ipairs(live) do
    sum = sum - e[2]
    if sum <= target then return math.max(1, e[1] + 60 - sec) end
  end
  return 60
end
local function reset(live)
  if #live == 0 then return 0 end
  return live[#live][1] + 60 - sec
end
local rpm_used, rpm_live, tpm_used, tpm_live = 0, {}, 0, {}
if a[4] >= 0 then
  rpm_used, rpm_live = window(KEYS[4])
  if rpm_used >= a[4] then return {2, wait(rpm_used, rpm_live, a[4] - 1), 0, 0, 0, sec} end
end
if a[5] >= 0 then
  tpm_used, tpm_live = window(KEYS[5])
  local fits = tpm_used + a[10] <= a[5] or (tpm_used == 0 and a[10] > a[5])
  if not fits then
    return {3, wait(tpm_used, tpm_live, math.max(0, a[5] - math.min(a[10], a[5]))), 0, 0, 0, sec}
  end
end
if a[6] >= 0 or a[8] >= 0 then
  local res_t, res_n = 0, 0
  local amounts = redis.call('HVALS', KEYS[3])
  for _, v in ipairs(amounts) do
    local sp = string.find(v, ' ')
    res_t = res_t + tonumber(string.sub(v, 1, sp - 1))
    res_n = res_n + tonumber(string.sub(v, sp + 1))
  end
  local function spent(key, suffix)
    local all = redis.call('HGETALL', key)
    local sum = 0
    for i = 1, #all, 2 do
      if string.sub(all[i], -2) == suffix then sum = sum + tonumber(all[i + 1]) end
    end
    return sum
  end
  local function key_of(per) if per == 'd' then return KEYS[6] end return KEYS[7] end
  if a[6] >= 0 and spent(key_of(ARGV[7]), ':t') + res_t + a[10] > a[6] then
    return {4, 0, 0, 0, 0, sec}
  end
  if a[8] >= 0 and spent(key_of(ARGV[9]), ':n') + res_n + math.max(a[11], 0) > a[8] then
    return {5, 0, 0, 0, 0, sec}
  end
end
local deadline = now + a[2]
if a[3] >= 0 then
  redis.call('ZADD', KEYS[1], deadline, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], a[2] * 2)
end
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[10] .. ' ' .. ARGV[11])
redis.call('PEXPIRE', KEYS[2], a[2] * 2)
redis.call('PEXPIRE', KEYS[3], a[2] * 2)
if a[4] >= 0 then
  redis.call('HINCRBY', KEYS[4], sec, 1)
  redis.call('EXPIRE', KEYS[4], 61)
  rpm_used = rpm_used + 1
end
if a[5] >= 0 then
  redis.call('HINCRBY', KEYS[5], sec, a[10])
  redis.call('EXPIRE', KEYS[5], 61)
  tpm_used = tpm_used + a[10]
end
local rpm_reset, tpm_reset = 0, 0
if a[4] >= 0 then rpm_reset = 60 end
if a[5] >= 0 then tpm_reset = 60 end
if #rpm_live > 0 then rpm_reset = math.max(rpm_reset, reset(rpm_live)) end
return {0, rpm_used, rpm_reset, tpm_used, tpm_reset, sec}
"#;

/// Ends a ticket: frees its slot and reservation, turns its tokens in the
/// minute window into what was used, and raises this instance's spend.
/// KEYS: slots, tickets, amounts, tpm, spend:day, spend:month.
/// ARGV: ticket, second admitted, reserved tokens, actual tokens, instance,
/// own day tokens, own day nanos, own month tokens, own month nanos.
const SETTLE: &str = r#"
local known = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if known == 1 then
  local cur = redis.call('HGET', KEYS[4], ARGV[2])
  if cur then
    local v = tonumber(cur) - tonumber(ARGV[3]) + tonumber(ARGV[4])
    if v < 0 then v = 0 end
    redis.call('HSET', KEYS[4], ARGV[2], v)
  end
end
local function hmax(key, field, v, ttl)
  local cur = tonumber(redis.call('HGET', key, field) or '0')
  if v > cur then redis.call('HSET', key, field, v) end
  redis.call('EXPIRE', key, ttl)
end
hmax(KEYS[5], ARGV[5] .. ':t', tonumber(ARGV[6]), 259200)
hmax(KEYS[5], ARGV[5] .. ':n', tonumber(ARGV[7]), 259200)
hmax(KEYS[6], ARGV[5] .. ':t', tonumber(ARGV[8]), 3456000)
hmax(KEYS[6], ARGV[5] .. ':n', tonumber(ARGV[9]), 3456000)
return known
"#;

/// The heartbeat: pushes this instance's open tickets' deadlines forward,
/// republishes its spend and adds what it admitted in process during an
/// outage to the windows. Per caller, 7 KEYS (slots, tickets, spend:day,
/// spend:month, rpm, tpm, amounts) and in ARGV: day tokens, day nanos, month
/// tokens, month nanos, n tickets, the tickets, m seconds, then m
/// (second, requests, tokens). ARGV[1] is the lease in ms, ARGV[2] the
/// instance.
const BEAT_SCRIPT: &str = r#"
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local inst = ARGV[2]
local j = 3
local function hmax(key, field, v, ttl)
  local cur = tonumber(redis.call('HGET', key, field) or '0')
  if v > cur then redis.call('HSET', key, field, v) end
  redis.call('EXPIRE', key, ttl)
end
for k = 1, #KEYS, 7 do
  hmax(KEYS[k + 2], inst .. ':t', tonumber(ARGV[j]), 259200)
  hmax(KEYS[k + 2], inst .. ':n', tonumber(ARGV[j + 1]), 259200)
  hmax(KEYS[k + 3], inst .. ':t', tonumber(ARGV[j + 2]), 3456000)
  hmax(KEYS[k + 3], inst .. ':n', tonumber(ARGV[j + 3]), 3456000)
  local n = tonumber(ARGV[j + 4])
  j = j + 5
  for i = 0, n - 1 do
    redis.call('ZADD', KEYS[k], 'XX', deadline, ARGV[j + i])
    redis.call('ZADD', KEYS[k + 1], 'XX', deadline, ARGV[j + i])
  end
  if n > 0 then
    -- The reservations' amounts live as long as their tickets.
    redis.call('PEXPIRE', KEYS[k], tonumber(ARGV[1]) * 2)
    redis.call('PEXPIRE', KEYS[k + 1], tonumber(ARGV[1]) * 2)
    redis.call('PEXPIRE', KEYS[k + 6], tonumber(ARGV[1]) * 2)
  end
  j = j + n
  local m = tonumber(ARGV[j])
  j = j + 1
  for i = 0, m - 1 do
    local s, r, tok = ARGV[j + 3 * i], tonumber(ARGV[j + 3 * i + 1]), tonumber(ARGV[j + 3 * i + 2])
    if r > 0 then redis.call('HINCRBY', KEYS[k + 4], s, r); redis.call('EXPIRE', KEYS[k + 4], 61) end
    if tok > 0 then redis.call('HINCRBY', KEYS[k + 5], s, tok); redis.call('EXPIRE', KEYS[k + 5], 61) end
  end
  j = j + 3 * m
end
return 1
"#;

/// Raises a key's shared cooldown (never shortens it) and tells the
/// other instances. KEYS: the cooldown hash. ARGV: field, until (ms since
/// the epoch), message, channel.
const COOLDOWN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = tonumber(ARGV[2])
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if until_ms <= cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < until_ms - now then
  redis.call('PEXPIRE', KEYS[1], math.max(1, until_ms - now))
end
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"#;

/// `ok` or `outage`, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub ok: bool,
    pub since: SystemTime,
}

/// A reservation held in Redis; settle it with [`SharedState::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedTicket {
    seq: u64,
    /// Redis's second at admission: the tokens bucket to adjust.
    second: u64,
    pub reserved: Cost,
    /// This instance's periods at admission: where its spend counts.
    pub at: Periods,
}

/// How an admission went under shared state.
#[derive(Debug)]
pub enum Grant {
    /// Reserved in Redis.
    Shared(SharedTicket),
    /// Redis is out: reserved in process, against each limit / `replicas`
    /// (`local_share`) or against none (`allow`).
    Local(Ticket),
}

/// Why an admission under shared state was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Refused(Refusal),
    /// Redis is out and `on_outage: deny`.
    Unavailable,
}

/// A settle Redis did not take, replayed once it answers.
#[derive(Debug, Clone)]
struct Unsettled {
    caller: Arc<str>,
    ticket: SharedTicket,
    actual_tokens: u64,
}

/// One caller, as the heartbeat sees it.
pub struct CallerEntry {
    pub name: Arc<str>,
    pub state: Arc<CallerState>,
}

pub struct SharedState {
    cfg: SharedStateConfig,
    instance: Arc<str>,
    client: Option<redis::Client>,
    conn: ArcSwapOption<MultiplexedConnection>,
    outage: AtomicBool,
    since: Mutex<SystemTime>,
    wake: tokio::sync::Notify,
    seq: AtomicU64,
    /// This instance's tickets still open in Redis, by sequence: the
    /// heartbeat refreshes their deadlines.
    open: Mutex<HashMap<u64, Arc<str>>>,
    unsettled: Mutex<Vec<Unsettled>>,
    admit: Script,
    settle: Script,
    beat: Script,
    cooldown: Script,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The keys of one caller: `gptbalance:caller:<name>:<what>`.
fn key(caller: &str, what: &str) -> String {
    format!("gptbalance:caller:{caller}:{what}")
}

fn spend_keys(caller: &str, p: &Periods) -> (String, String) {
    (
        key(caller, &format!("spend:day:{}", p.day)),
        key(caller, &format!("spend:month:{}", p.month)),
    )
}

fn opt(v: Option<u64>) -> i64 {
    v.map_or(-1, |n| n.min(i64::MAX as u64) as i64)
}

fn per_code(p: Per) -> &'static str {
    match p {
        Per::Day => "d",
        Per::Month => "m",
    }
}

/// This instance's id when the config names none: host name and pid.
pub fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gptbalance".to_owned());
    format!("{host}-{}", std::process::id())
}

impl SharedState {
    /// A shared state in outage until [`SharedState::run`] connects.
    pub fn new(cfg: SharedStateConfig) -> SharedState {
        let instance: Arc<str> = cfg.instance.clone().unwrap_or_else(default_instance).into();
        let client = match redis::Client::open(cfg.url.expose()) {
            Ok(c) => Some(c),
            Err(e) => {
                // Validation checked the form; the message holds no password.
                tracing::error!(address = %cfg.address, error = %e, "shared_state.url cannot be used");
                None
            }
        };
        SharedState {
            cfg,
            instance,
            client,
            conn: ArcSwapOption::empty(),
            outage: AtomicBool::new(true),
            since: Mutex::new(SystemTime::now()),
            wake: tokio::sync::Notify::new(),
            seq: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            unsettled: Mutex::new(Vec::new()),
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            beat: Script::new(BEAT_SCRIPT),
            cooldown: Script::new(COOLDOWN),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn address(&self) -> &str {
        &self.cfg.address
    }

    pub fn mode(&self) -> Mode {
        Mode {
            ok: !self.outage.load(Ordering::Relaxed),
            since: *lock(&self.since),
        }
    }

    /// Enters outage mode (logged once per change) and wakes the supervisor.
    fn fail(&self, why: &str) {
        if !self.outage.swap(true, Ordering::Relaxed) {
            *lock(&self.since) = SystemTime::now();
            tracing::error!(
                address = %self.cfg.address, on_outage = self.cfg.on_outage.as_str(), error = why,
                "shared state unavailable; on_outage applies until it answers"
            );
        }
        self.wake.notify_one();
    }

    /// The connection, when shared mode is on.
    fn connection(&self) -> Option<MultiplexedConnection> {
        if self.outage.load(Ordering::Relaxed) {
            return None;
        }
        self.conn.load_full().map(|c| (*c).clone())
    }

    /// Admits a request of `caller` under shared state: one script in
    /// Redis, or `on_outage` at once when Redis is out or slower than
    /// `timeout`.
    pub async fn admit(
        &self,
        caller: &Arc<str>,
        state: &CallerState,
        limits: &CallerLimits,
        cost: Cost,
        now: SystemTime,
    ) -> Result<(Grant, Headroom), Denial> {
        let Some(mut conn) = self.connection() else {
            return self.admit_in_outage(state, limits, cost, now);
        };
        let p = Periods::of(now);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}:{seq}", self.instance);
        let (day_key, month_key) = spend_keys(caller, &p);
        let (day, month) = state.own_spend(now);
        let budget = |b: Option<crate::config::Budget>| {
            b.map_or((-1, "m"), |b| (b.amount.max(0), per_code(b.per)))
        };
        let (bt, bt_per) = budget(limits.budget_tokens);
        let (bn, bn_per) = budget(limits.budget_usd);
        let mut call = self.admit.prepare_invoke();
        call.key(key(caller, "slots"))
            .key(key(caller, "tickets"))
            .key(key(caller, "amounts"))
            .key(key(caller, "rpm"))
            .key(key(caller, "tpm"))
            .key(day_key)
            .key(month_key)
            .arg(&id)
            .arg(LEASE.as_millis() as u64)
            .arg(limits.concurrency.map_or(-1, i64::from))
            .arg(opt(limits.rpm))
            .arg(opt(limits.tpm))
            .arg(bt)
            .arg(bt_per)
            .arg(bn)
            .arg(bn_per)
            .arg(cost.tokens)
            .arg(cost.nanos)
            .arg(&*self.instance)
            .arg(day.tokens)
            .arg(day.nanos)
            .arg(month.tokens)
            .arg(month.nanos);
        let answer: Vec<i64> =
            match tokio::time::timeout(self.cfg.timeout, call.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    self.fail(&e.to_string());
                    return self.admit_in_outage(state, limits, cost, now);
                }
                Err(_) => {
                    self.fail("no answer within shared_state.timeout");
                    return self.admit_in_outage(state, limits, cost, now);
                }
            };
        let at = |i: usize| answer.get(i).copied().unwrap_or(0).max(0) as u64;
        let wait = |n: u64| Duration::from_secs(n.max(1));
        match at(0) {
            0 => {
                lock(&self.open).insert(seq, caller.clone());
                let headroom = Headroom {
                    requests: limits
                        .rpm
                        .map(|l| (l, l.saturating_sub(at(1)), Duration::from_secs(at(2)))),
                    tokens: limits
                        .tpm
                        .map(|l| (l, l.saturating_sub(at(3)), Duration::from_secs(at(4)))),
                };
                let ticket = SharedTicket {
                    seq,
                    second: at(5),
                    reserved: cost,
                    at: p,
                };
                Ok((Grant::Shared(ticket), headroom))
            }
            1 => Err(Denial::Refused(Refusal::Concurrency)),
            2 => Err(Denial::Refused(Refusal::Rpm {
                retry_after: wait(at(1)),
            })),
            3 => Err(Denial::Refused(Refusal::Tpm {
                retry_after: wait(at(1)),
            })),
            4 => Err(Denial::Refused(Refusal::BudgetTokens {
                per: limits.budget_tokens.map_or(Per::Month, |b| b.per),
            })),
            _ => Err(Denial::Refused(Refusal::BudgetUsd {
                per: limits.budget_usd.map_or(Per::Month, |b| b.per),
            })),
        }
    }

    fn admit_in_outage(
        &self,
        state: &CallerState,
        limits: &CallerLimits,
        cost: Cost,
        now: SystemTime,
    ) -> Result<(Grant, Headroom), Denial> {
        match self.cfg.on_outage {
            OnOutage::Deny => Err(Denial::Unavailable),
            // No limit applies, but the request is still counted in
            // process: its spend and window counts reach Redis on return.
            OnOutage::Allow => state
                .admit(&CallerLimits::default(), cost, now)
                .map(|(t, _)| (Grant::Local(t), Headroom::default()))
                .map_err(Denial::Refused),
            OnOutage::LocalShare => {
                let share = limits.share(self.cfg.replicas);
                state
                    .admit(&share, cost, now)
                    .map(|(t, h)| (Grant::Local(t), h))
                    .map_err(Denial::Refused)
            }
        }
    }

    /// Ends a ticket: this instance's spend is counted at once in process,
    /// and the settle goes to Redis in the background (kept for replay
    /// when Redis does not take it).
    pub fn settle(
        self: &Arc<Self>,
        caller: Arc<str>,
        state: &CallerState,
        ticket: SharedTicket,
        actual: Cost,
    ) {
        state.record_spend(ticket.at, actual);
        lock(&self.open).remove(&ticket.seq);
        let u = Unsettled {
            caller,
            ticket,
            actual_tokens: actual.tokens,
        };
        let (day, month) = state.own_spend(SystemTime::now());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let me = self.clone();
                rt.spawn(async move {
                    if let Err(why) = me.deliver(&u, day, month).await {
                        me.keep_unsettled(u);
                        me.fail(&why);
                    }
                });
            }
            Err(_) => self.keep_unsettled(u),
        }
    }

    fn keep_unsettled(&self, u: Unsettled) {
        let mut q = lock(&self.unsettled);
        if q.len() < MAX_UNSETTLED {
            q.push(u);
        }
    }

    async fn deliver(
        &self,
        u: &Unsettled,
        day: super::Spend,
        month: super::Spend,
    ) -> Result<(), String> {
        let Some(mut conn) = self.connection() else {
            return Err("shared state in outage".to_owned());
        };
        let (day_key, month_key) = spend_keys(&u.caller, &u.ticket.at);
        let mut call = self.settle.prepare_invoke();
        call.key(key(&u.caller, "slots"))
            .key(key(&u.caller, "tickets"))
            .key(key(&u.caller, "amounts"))
            .key(key(&u.caller, "tpm"))
            .key(day_key)
            .key(month_key)
            .arg(format!("{}:{}", self.instance, u.ticket.seq))
            .arg(u.ticket.second)
            .arg(u.ticket.reserved.tokens)
            .arg(u.actual_tokens)
            .arg(&*self.instance);
        // A ticket of an earlier period publishes that period's figures
        // only when they are still the current ones.
        let same = |a: u64, b: u64| a == b;
        let (dt, dn) = if same(day.period, u.ticket.at.day) {
            (day.tokens, day.nanos)
        } else {
            (0, 0)
        };
        let (mt, mn) = if same(month.period, u.ticket.at.month) {
            (month.tokens, month.nanos)
        } else {
            (0, 0)
        };
        call.arg(dt).arg(dn).arg(mt).arg(mn);
        match tokio::time::timeout(self.cfg.timeout, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within shared_state.timeout".to_owned()),
        }
    }

    /// Shares a cooldown this instance started on `key` of `client`, in the
    /// background; dropped when Redis is out (the key still cools here).
    pub fn publish_cooldown(self: &Arc<Self>, client: &str, key: &str, until: SystemTime) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let until_ms = until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let field = format!("{client}\t{key}");
        let message = format!("{}\t{client}\t{key}\t{until_ms}", self.instance);
        let me = self.clone();
        rt.spawn(async move {
            let mut call = me.cooldown.prepare_invoke();
            call.key(COOLDOWN_HASH)
                .arg(field)
                .arg(until_ms)
                .arg(message)
                .arg(COOLDOWN_CHANNEL);
            match tokio::time::timeout(me.cfg.timeout, call.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => me.fail(&e.to_string()),
                Err(_) => me.fail("no answer within shared_state.timeout"),
            }
        });
    }

    /// Connects, keeps the heartbeat, and brings the instance back to
    /// shared mode after an outage; runs for the life of the process.
    /// `callers` lists the current callers each beat.
    pub async fn run(self: Arc<Self>, callers: impl Fn() -> Vec<CallerEntry>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.cfg.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(None);
        loop {
            if self.outage.load(Ordering::Relaxed) {
                match self.recover(&client, &config, &callers).await {
                    Ok(()) => {
                        let down_for = lock(&self.since).elapsed().unwrap_or_default();
                        *lock(&self.since) = SystemTime::now();
                        self.outage.store(false, Ordering::Relaxed);
                        tracing::info!(address = %self.cfg.address, instance = %self.instance,
                            down_ms = down_for.as_millis() as u64, "shared state answering; shared mode on");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "shared state still unavailable");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
            // Woken early by a request that saw Redis fail.
            let _ = tokio::time::timeout(BEAT, self.wake.notified()).await;
            if self.outage.load(Ordering::Relaxed) {
                continue;
            }
            if let Some(mut conn) = self.conn.load_full().map(|c| (*c).clone()) {
                if let Err(e) = self.heartbeat(&mut conn, &callers, false).await {
                    self.fail(&e);
                }
            }
        }
    }

    /// Reconnects when needed, loads the scripts, replays the settles and
    /// counts of the outage; `Ok` when Redis took all of it.
    async fn recover(
        &self,
        client: &redis::Client,
        config: &AsyncConnectionConfig,
        callers: &impl Fn() -> Vec<CallerEntry>,
    ) -> Result<(), String> {
        let bound = self.cfg.timeout.max(Duration::from_millis(500));
        let mut conn = match self.conn.load_full() {
            Some(c) if ping(&mut (*c).clone(), bound).await.is_ok() => (*c).clone(),
            _ => {
                let c = tokio::time::timeout(
                    bound,
                    client.get_multiplexed_async_connection_with_config(config),
                )
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
                self.conn.store(Some(Arc::new(c.clone())));
                c
            }
        };
        ping(&mut conn, bound).await?;
        for s in [&self.admit, &self.settle, &self.beat, &self.cooldown] {
            tokio::time::timeout(bound, s.load_async(&mut conn))
                .await
                .map_err(|_| "SCRIPT LOAD timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        }
        let pending = std::mem::take(&mut *lock(&self.unsettled));
        let mut failed = None;
        for (i, u) in pending.iter().enumerate() {
            if let Err(e) = self.deliver_on(&mut conn, u, bound).await {
                lock(&self.unsettled).extend(pending[i..].iter().cloned());
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        self.heartbeat(&mut conn, callers, true).await
    }

    async fn deliver_on(
        &self,
        conn: &mut MultiplexedConnection,
        u: &Unsettled,
        bound: Duration,
    ) -> Result<(), String> {
        let (day_key, month_key) = spend_keys(&u.caller, &u.ticket.at);
        let mut call = self.settle.prepare_invoke();
        call.key(key(&u.caller, "slots"))
            .key(key(&u.caller, "tickets"))
            .key(key(&u.caller, "amounts"))
            .key(key(&u.caller, "tpm"))
            .key(day_key)
            .key(month_key)
            .arg(format!("{}:{}", self.instance, u.ticket.seq))
            .arg(u.ticket.second)
            .arg(u.ticket.reserved.tokens)
            .arg(u.actual_tokens)
            .arg(&*self.instance)
            // The spend itself is republished by the heartbeat.
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(0);
        match tokio::time::timeout(bound, call.invoke_async::<i64>(conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("settle replay timed out".to_owned()),
        }
    }

    /// One round trip: every open ticket's deadline pushed forward, every
    /// caller's spend republished; with `reconcile`, the in-process windows
    /// of the outage are added to the shared ones (and emptied here).
    async fn heartbeat(
        &self,
        conn: &mut MultiplexedConnection,
        callers: &impl Fn() -> Vec<CallerEntry>,
        reconcile: bool,
    ) -> Result<(), String> {
        let now = SystemTime::now();
        let p = Periods::of(now);
        let mut by_caller: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
        for (seq, c) in lock(&self.open).iter() {
            by_caller.entry(c.clone()).or_default().push(*seq);
        }
        let list = callers();
        if list.is_empty() {
            return ping(conn, self.cfg.timeout.max(Duration::from_millis(500))).await;
        }
        let mut call = self.beat.prepare_invoke();
        call.arg(LEASE.as_millis() as u64).arg(&*self.instance);
        for c in &list {
            let (day_key, month_key) = spend_keys(&c.name, &p);
            call.key(key(&c.name, "slots"))
                .key(key(&c.name, "tickets"))
                .key(day_key)
                .key(month_key)
                .key(key(&c.name, "rpm"))
                .key(key(&c.name, "tpm"))
                .key(key(&c.name, "amounts"));
            let (day, month) = c.state.own_spend(now);
            call.arg(day.tokens)
                .arg(day.nanos)
                .arg(month.tokens)
                .arg(month.nanos);
            let seqs = by_caller.remove(&c.name).unwrap_or_default();
            call.arg(seqs.len());
            for s in seqs {
                call.arg(format!("{}:{s}", self.instance));
            }
            let seconds = if reconcile {
                c.state.take_window(now)
            } else {
                Vec::new()
            };
            call.arg(seconds.len());
            for (s, r, t) in seconds {
                call.arg(s).arg(r).arg(t);
            }
        }
        let bound = if reconcile {
            self.cfg.timeout.max(Duration::from_millis(500))
        } else {
            self.cfg.timeout.max(Duration::from_millis(200))
        };
        match tokio::time::timeout(bound, call.invoke_async::<i64>(conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("heartbeat: no answer in time".to_owned()),
        }
    }

    /// Applies other instances' cooldowns: those running when this one
    /// (re)subscribes, then each as it is published. Runs for the life of
    /// the process; `apply(client, key, until)`.
    pub async fn follow_cooldowns(self: Arc<Self>, apply: impl Fn(&str, &str, SystemTime)) {
        use futures_util::StreamExt;
        let Some(client) = self.client.clone() else {
            return;
        };
        let bound = self.cfg.timeout.max(Duration::from_millis(500));
        loop {
            let pubsub = async {
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(COOLDOWN_CHANNEL).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let mut ps = match tokio::time::timeout(bound, pubsub).await {
                Ok(Ok(ps)) => ps,
                _ => {
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            // Subscribed first, then read: nothing published in between is missed.
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let all: Result<Result<HashMap<String, u64>, _>, _> = tokio::time::timeout(
                    bound,
                    redis::cmd("HGETALL").arg(COOLDOWN_HASH).query_async(&mut c),
                )
                .await;
                if let Ok(Ok(all)) = all {
                    for (field, until) in all {
                        if let Some((cl, k)) = field.split_once('\t') {
                            apply(cl, k, UNIX_EPOCH + Duration::from_millis(until));
                        }
                    }
                }
            }
            let mut stream = ps.on_message();
            while let Some(msg) = stream.next().await {
                let Ok(text) = msg.get_payload::<String>() else {
                    continue;
                };
                let mut parts = text.splitn(4, '\t');
                let (Some(inst), Some(cl), Some(k), Some(until)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if inst == &*self.instance {
                    continue;
                }
                if let Ok(ms) = until.parse::<u64>() {
                    apply(cl, k, UNIX_EPOCH + Duration::from_millis(ms));
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// `PING` within `bound`.
pub async fn ping(conn: &mut MultiplexedConnection, bound: Duration) -> Result<(), String> {
    match tokio::time::timeout(bound, redis::cmd("PING").query_async::<String>(conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".to_owned()),
    }
}

/// Connects to `cfg` and pings it once, for `check-keys`: the round trip.
pub async fn probe(cfg: &SharedStateConfig) -> Result<Duration, String> {
    let client = redis::Client::open(cfg.url.expose()).map_err(|e| e.to_string())?;
    let bound = cfg.timeout.max(Duration::from_secs(2));
    let started = Instant::now();
    let mut conn = tokio::time::timeout(bound, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    ping(&mut conn, bound).await?;
    Ok(started.elapsed())
}
