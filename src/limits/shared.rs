//! Callers' limits, budgets and key cooldowns shared by several instances
//! through Redis (or Valkey): the second backend of [`super`].
//!
//! Every admission and every settle is one item of a Lua script call
//! (`EVALSHA`) that, atomically on the server, frees expired reservations,
//! checks every limit and reserves (or, for a settle, frees and adjusts).
//! One batcher task ([`SharedState::batches`]) sends the items queued while
//! the previous call was out as the next call, on one multiplexed
//! connection: a lone request goes at once, a loaded instance sends one
//! call for many requests. A request waits for its answer at most
//! `shared_state.timeout`; settles never hold up a response.
//!
//! - A caller's counters are one hash (`state`: open tickets and what they
//!   reserve, the rolling minute as a ring of per-second buckets with
//!   running sums), read and written once per item (see `lua_common!`).
//! - Reservations are a sorted set of tickets (`instance:seq:tokens:nanos`)
//!   scored by a deadline ([`LEASE`] ahead). This instance's heartbeat
//!   pushes the deadlines of its open tickets forward every [`BEAT`]; a
//!   crashed instance's tickets stop being pushed and free themselves.
//! - Budgets: each instance writes its own settled spend of the period
//!   (restored from its own usage files at start) under its `instance` id,
//!   as an absolute figure that only grows; the total is the sum of the
//!   entries. After a flush each instance's admissions count its own
//!   figure at once; its next settle or heartbeat writes it back, never
//!   counted twice.
//! - Cooldowns: a hash of `client\tkey → until (ms since the epoch)`,
//!   only ever raised, plus a pub/sub message for instances already
//!   running; one joining later reads the hash.
//!
//! A request whose answer does not come within `timeout` goes by
//! `on_outage` at once, alone. A call that fails (the connection broke, or
//! Redis refused it) puts the instance in **outage** at once; one that is
//! only late does not: the supervisor pings Redis at once, and the
//! instance is in outage when that ping does not answer within `timeout`
//! (200 ms at least), or when [`LATE_IN_A_ROW`] calls in a row came late.
//! So one slow answer on a loaded host fails only the requests waiting on
//! it, while a Redis that stopped answering is an outage within a ping.
//! In outage `on_outage` applies to every request until the
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

use super::lease::{self, LeaseMark, Leases, Relet};
use super::{CallerState, Cost, Headroom, Periods, Refusal, Ticket};
use crate::config::{CallerLimits, OnOutage, Per, SharedStateConfig};

/// How long a reservation or slot lives in Redis unless refreshed.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often this instance refreshes its tickets and republishes its spend.
pub const BEAT: Duration = Duration::from_secs(1);
/// Callers per heartbeat call.
const BEAT_CALLERS: usize = 100;
/// Every this many beats the heartbeat republishes every caller's spend,
/// changed or not (and after a recovery, or when Redis lost this
/// instance's marker: a flushed or new Redis); in between, only what
/// changed since it last published.
const FULL_BEAT: u64 = 30;
/// How often the supervisor retries while Redis does not answer.
const RETRY: Duration = Duration::from_millis(500);
/// Script calls in a row answered later than `timeout` (none answered in
/// between) that put the instance in outage without waiting for a ping.
const LATE_IN_A_ROW: u32 = 3;
/// How long the supervisor's ping may take, at least, when an answer came
/// late: longer than that, Redis is out.
const DOUBT_PING: Duration = Duration::from_millis(200);
/// Settles kept for replay while Redis does not answer; older ones are
/// dropped (their reservations free themselves at their deadline).
const MAX_UNSETTLED: usize = 100_000;
/// The pub/sub channel of cooldowns.
const COOLDOWN_CHANNEL: &str = "gptbalance:cooldowns";
/// The hash of running cooldowns, for instances that join later.
const COOLDOWN_HASH: &str = "gptbalance:cooldowns";

/// Lua shared by the scripts: the time, a caller's state and the
/// publication of this instance's spend.
///
/// A caller's counters are one hash, `state`, read and written with one
/// command each: `n` open tickets and `rt`, `rn` the tokens and nanos they
/// reserve; `exp`, the earliest deadline among them (no ticket can have
/// expired before it); the rolling minute as `r` and `t`, the requests and
/// tokens of the 60 seconds up to second `last`, kept in a ring of
/// per-second buckets `s<i>`, `r<i>`, `t<i>` (bucket `i = second % 60`
/// holds second `s<i>`). Moving `last` forward subtracts the seconds that
/// left; under load that is the one bucket the new second reuses, which
/// the same read brings.
macro_rules! lua_common {
    () => {
        r#"
local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local now = sec * 1000 + math.floor(tonumber(clock[2]) / 1000)
local inst = ARGV[1]
local lease = tonumber(ARGV[2])
local P = 'gptbalance:caller:'
-- A caller's keys live this long past their last refresh, which is
-- renewed every `renew` seconds at most (so they outlive the minute).
local ttl, renew = 91, 20
-- Concurrency slots a ticket holds: one, or a lease's count.
local function slots_of(m)
  return tonumber(string.match(m, ':lease:%d+:(%d+):%d+:%-?%d+:%-?%d+$')) or 1
end
local function count_slots(tickets)
  local n = 0
  for _, m in ipairs(redis.call('ZRANGE', tickets, 0, -1)) do n = n + slots_of(m) end
  return n
end
local function load(p, at)
  local key = p .. 'state'
  local i = at % 60
  local v = redis.call('HMGET', key, 'n', 'rt', 'rn', 'exp', 'last', 'r', 't', 's' .. i, 'r' .. i, 't' .. i, 'x')
  local c = {key = key, tickets = p .. 'tickets', at = at, i = i,
    n = tonumber(v[1]) or 0, rt = tonumber(v[2]) or 0, rn = tonumber(v[3]) or 0,
    exp = tonumber(v[4]) or 0, last = tonumber(v[5]), r = tonumber(v[6]) or 0, t = tonumber(v[7]) or 0,
    bs = tonumber(v[8]), br = tonumber(v[9]) or 0, bt = tonumber(v[10]) or 0, x = tonumber(v[11]),
    moved = false, opened = false}
  if c.last == nil then
    -- New, expired or flushed: recount the reservations from the tickets.
    c.last, c.r, c.t, c.n, c.rt, c.rn, c.exp, c.moved = at, 0, 0, 0, 0, 0, 0, true
    local all = redis.call('ZRANGE', c.tickets, 0, -1)
    for _, m in ipairs(all) do
      local et, en = string.match(m, ':(%-?%d+):(%-?%d+)$')
      c.n, c.rt, c.rn = c.n + slots_of(m), c.rt + (tonumber(et) or 0), c.rn + (tonumber(en) or 0)
      -- Their deadlines are checked at the next admission.
      c.exp = 1
    end
  elseif at > c.last then
    if at - c.last >= 60 then
      c.r, c.t = 0, 0
    elseif at - c.last == 1 then
      if c.bs == at - 60 then c.r, c.t = c.r - c.br, c.t - c.bt end
    else
      local f = {}
      for s = c.last - 59, at - 60 do
        local k = s % 60
        f[#f + 1] = 's' .. k
        f[#f + 1] = 'r' .. k
        f[#f + 1] = 't' .. k
      end
      if #f > 0 then
        local o = redis.call('HMGET', key, unpack(f))
        for x = 1, #f, 3 do
          if tonumber(o[x]) == c.last - 59 + (x - 1) / 3 then
            c.r = c.r - (tonumber(o[x + 1]) or 0)
            c.t = c.t - (tonumber(o[x + 2]) or 0)
          end
        end
      end
    end
    c.last, c.moved = at, true
  elseif at < c.last then
    -- Redis's clock stepped back: count at the window's newest second.
    return nil
  end
  if c.bs ~= at then c.br, c.bt = 0, 0 end
  return c
end
local function state_of(p)
  local c = load(p, sec)
  if c == nil then
    local v = redis.call('HGET', p .. 'state', 'last')
    c = load(p, tonumber(v))
  end
  return c
end
-- Writes the counters back (and the bucket of `at` when `bucket`).
local function keep(c, bucket)
  -- A caller's keys outlive its last minute and its tickets' deadlines:
  -- renewed when the window moves `renew` seconds past the last renewal
  -- (so one second in `renew` at most, not every second), and the
  -- tickets' whenever one is added (`opened`: the set may be new, its
  -- last ticket removed since).
  local renewing = c.moved and (c.x == nil or c.at - c.x >= renew or c.at < c.x)
  if renewing then c.x = c.at end
  if bucket then
    redis.call('HSET', c.key, 'n', c.n, 'rt', c.rt, 'rn', c.rn, 'exp', c.exp, 'last', c.last,
      'r', c.r, 't', c.t, 's' .. c.i, c.at, 'r' .. c.i, c.br, 't' .. c.i, c.bt, 'x', c.x or c.at)
  else
    redis.call('HSET', c.key, 'n', c.n, 'rt', c.rt, 'rn', c.rn, 'exp', c.exp, 'last', c.last,
      'r', c.r, 't', c.t, 'x', c.x or c.at)
  end
  if renewing or c.x == nil then
    redis.call('EXPIRE', c.key, ttl)
    redis.call('EXPIRE', c.tickets, ttl)
  elseif c.opened then
    redis.call('EXPIRE', c.tickets, ttl)
  end
end
-- Tickets past their deadline (their instance stopped refreshing them)
-- give their reservations back.
local function expire(c)
  -- `exp` 0: no ticket open (a lease may hold no slot, so `n` cannot say).
  if c.exp == 0 or now < c.exp then return end
  local expired = redis.call('ZRANGEBYSCORE', c.tickets, '-inf', now)
  if #expired > 0 then
    for _, m in ipairs(expired) do
      local et, en = string.match(m, ':(%-?%d+):(%-?%d+)$')
      c.rt, c.rn = c.rt - (tonumber(et) or 0), c.rn - (tonumber(en) or 0)
    end
    redis.call('ZREMRANGEBYSCORE', c.tickets, '-inf', now)
  end
  c.n = count_slots(c.tickets)
  if redis.call('ZCARD', c.tickets) == 0 then
    c.rt, c.rn, c.exp = 0, 0, 0
  else
    local first = redis.call('ZRANGE', c.tickets, 0, 0, 'WITHSCORES')
    c.exp = tonumber(first[2]) or 0
  end
  c.rt, c.rn, c.moved = math.max(0, c.rt), math.max(0, c.rn), true
end
-- Seconds until the minute's `what` (r or t) holds at most target.
local function wait(c, what, sum, target)
  local f = {}
  for k = 0, 59 do
    f[#f + 1] = 's' .. k
    f[#f + 1] = what .. k
  end
  local v = redis.call('HMGET', c.key, unpack(f))
  local by_second = {}
  for k = 0, 59 do
    local s = tonumber(v[2 * k + 1])
    if s and s > c.last - 60 and s <= c.last then by_second[s - c.last + 60] = tonumber(v[2 * k + 2]) or 0 end
  end
  for x = 1, 60 do
    sum = sum - (by_second[x] or 0)
    if sum <= target then return math.max(1, x + c.last - sec) end
  end
  return 60
end
-- Raises this instance's spend entries in `key` (never lowers them);
-- a negative figure publishes nothing. The key's expiry is set with this
-- instance's first entry (the period's length and more: it is not renewed).
local function publish(key, t, n, life)
  if t < 0 then return end
  local v = redis.call('HMGET', key, inst .. ':t', inst .. ':n')
  local ct, cn = tonumber(v[1]), tonumber(v[2])
  if ct == nil or cn == nil or t > ct or n > cn then
    redis.call('HSET', key, inst .. ':t', math.max(t, ct or 0), inst .. ':n', math.max(n, cn or 0))
    if ct == nil or cn == nil then redis.call('EXPIRE', key, life) end
  end
end
local function spend_key(p, per, day, month)
  if per == 'd' then return p .. 'spend:day:' .. day, 259200 end
  return p .. 'spend:month:' .. month, 3456000
end
"#
    };
}

/// Admissions and settles, any number of each, in one atomic step; each
/// admission frees expired tickets, checks every limit and reserves.
///
/// ARGV: instance, lease_ms, then items. A settle (`s`): caller, seq,
/// second admitted, reserved tokens, reserved nanos, actual tokens, day,
/// month, own day tokens, own day nanos, own month tokens, own month nanos
/// (-1: publish none). An admission (`a`): caller, seq, concurrency, rpm,
/// tpm, budget_tokens, its per (d|m), budget_nanos, its per, cost tokens,
/// cost nanos, day, month, own day tokens, own day nanos, own month
/// tokens, own month nanos (-1: no such limit). Returns six numbers per
/// admission, in order: code (0 admitted, 1-5 the refusal), then requests
/// used and reset, tokens used and reset (or the wait), second.
///
/// Per caller: `state` (above), `tickets` (a sorted set of
/// `instance:seq:tokens:nanos` by deadline) and the spend hashes.
const BATCH: &str = concat!(
    lua_common!(),
    r#"
local out = {}
local j = 3
-- Every instance's spend of a period (`per` d or m), summed; this
-- instance's own figures count even when Redis lost them.
local function spent_of(p, per, day, month, dt, dn, mt, mn)
  local key = spend_key(p, per, day, month)
  local own_t, own_n = dt, dn
  if per == 'm' then own_t, own_n = mt, mn end
  local all = redis.call('HGETALL', key)
  local st, sn, mine_t, mine_n = 0, 0, 0, 0
  for i = 1, #all, 2 do
    local f, v = all[i], tonumber(all[i + 1]) or 0
    if string.sub(f, -2) == ':t' then
      st = st + v
      if f == inst .. ':t' then mine_t = v end
    else
      sn = sn + v
      if f == inst .. ':n' then mine_n = v end
    end
  end
  st = st + math.max(0, own_t - mine_t)
  sn = sn + math.max(0, own_n - mine_n)
  return st, sn
end
local function settle()
  local p = P .. ARGV[j + 1] .. ':'
  local rt, rn, at = tonumber(ARGV[j + 4]), tonumber(ARGV[j + 5]), tonumber(ARGV[j + 6])
  local known = redis.call('ZREM', p .. 'tickets',
    inst .. ':' .. ARGV[j + 2] .. ':' .. ARGV[j + 4] .. ':' .. ARGV[j + 5])
  if known == 1 then
    local s = tonumber(ARGV[j + 3])
    local k = s % 60
    local key = p .. 'state'
    local v = redis.call('HMGET', key, 'n', 'rt', 'rn', 'last', 't', 's' .. k, 't' .. k)
    local n, crt, crn = tonumber(v[1]) or 1, tonumber(v[2]) or 0, tonumber(v[3]) or 0
    local last, bs = tonumber(v[4]), tonumber(v[6])
    if last and bs == s and s > last - 60 then
      local old = tonumber(v[7]) or 0
      local new = math.max(0, old - rt + at)
      redis.call('HSET', key, 'n', math.max(0, n - 1), 'rt', math.max(0, crt - rt),
        'rn', math.max(0, crn - rn), 't', math.max(0, (tonumber(v[5]) or 0) - old + new), 't' .. k, new)
    else
      redis.call('HSET', key, 'n', math.max(0, n - 1), 'rt', math.max(0, crt - rt),
        'rn', math.max(0, crn - rn))
    end
  end
  local dk, dttl = spend_key(p, 'd', ARGV[j + 7], ARGV[j + 8])
  local mk, mttl = spend_key(p, 'm', ARGV[j + 7], ARGV[j + 8])
  publish(dk, tonumber(ARGV[j + 9]), tonumber(ARGV[j + 10]), dttl)
  publish(mk, tonumber(ARGV[j + 11]), tonumber(ARGV[j + 12]), mttl)
  j = j + 13
end
local function admit()
  local p = P .. ARGV[j + 1] .. ':'
  local a = {}
  for i = 3, 17 do a[i] = tonumber(ARGV[j + i]) end
  local conc, rpm, tpm, bt, bn, ct, cn = a[3], a[4], a[5], a[6], a[8], a[10], a[11]
  local c = state_of(p)
  expire(c)
  if conc >= 0 and c.n >= conc then
    -- Checked against the tickets themselves before refusing.
    c.n = count_slots(c.tickets)
    if c.n >= conc then
      keep(c, false)
      return {1, 0, 0, 0, 0, c.at}
    end
  end
  if rpm >= 0 and c.r >= rpm then
    local w = wait(c, 'r', c.r, rpm - 1)
    keep(c, false)
    return {2, w, 0, 0, 0, c.at}
  end
  if tpm >= 0 and not (c.t + ct <= tpm or (c.t == 0 and ct > tpm)) then
    local w = wait(c, 't', c.t, math.max(0, tpm - math.min(ct, tpm)))
    keep(c, false)
    return {3, w, 0, 0, 0, c.at}
  end
  if bt >= 0 or bn >= 0 then
    local seen = {}
    local function spent(per)
      if seen[per] then return seen[per][1], seen[per][2] end
      local st, sn = spent_of(p, per, ARGV[j + 12], ARGV[j + 13], a[14], a[15], a[16], a[17])
      seen[per] = {st, sn}
      return st, sn
    end
    if bt >= 0 then
      local st = spent(ARGV[j + 7])
      if st + c.rt + ct > bt then
        keep(c, false)
        return {4, 0, 0, 0, 0, c.at}
      end
    end
    if bn >= 0 then
      local _, sn = spent(ARGV[j + 9])
      if sn + c.rn + math.max(cn, 0) > bn then
        keep(c, false)
        return {5, 0, 0, 0, 0, c.at}
      end
    end
  end
  local deadline = now + lease
  redis.call('ZADD', c.tickets, deadline, inst .. ':' .. ARGV[j + 2] .. ':' .. ARGV[j + 10] .. ':' .. ARGV[j + 11])
  if c.exp == 0 then c.exp = deadline end
  c.opened = true
  c.n, c.rt, c.rn = c.n + 1, c.rt + ct, c.rn + cn
  c.r, c.t, c.br, c.bt = c.r + 1, c.t + ct, c.br + 1, c.bt + ct
  keep(c, true)
  return {0, c.r, 60, c.t, 60, c.at}
end
-- A lease (`l`): the instance's previous lease of the caller given back
-- (what it did not use leaves the window; what was admitted from a lease
-- Redis lost counts now), its carry (requests and tokens the instance
-- admits from while this item is out) counted anew in the new one, then
-- a new one taken when every limit has room for `factor` times it;
-- otherwise only the carry and what is still in flight stay held.
local function relet()
  local p = P .. ARGV[j + 1] .. ':'
  local a = {}
  for i = 3, 32 do a[i] = tonumber(ARGV[j + i]) end
  local c = state_of(p)
  expire(c)
  if ARGV[j + 2] ~= '-' then
    local m = inst .. ':lease:' .. ARGV[j + 2]
    local used_r, used_t = a[5], a[7]
    if redis.call('ZREM', c.tickets, m) == 1 then
      local et, en = string.match(m, ':(%-?%d+):(%-?%d+)$')
      c.n = math.max(0, c.n - slots_of(m))
      c.rt, c.rn = math.max(0, c.rt - (tonumber(et) or 0)), math.max(0, c.rn - (tonumber(en) or 0))
      local s, dr, dt = a[3], a[4] - used_r, a[6] - used_t
      if s == c.at then
        c.br, c.bt = math.max(0, c.br - dr), math.max(0, c.bt - dt)
        c.r, c.t = math.max(0, c.r - dr), math.max(0, c.t - dt)
      elseif s > c.last - 60 and s < c.last then
        local k = s % 60
        local v = redis.call('HMGET', c.key, 's' .. k, 'r' .. k, 't' .. k)
        if tonumber(v[1]) == s then
          local br, bt = tonumber(v[2]) or 0, tonumber(v[3]) or 0
          local nr, nt = math.max(0, br - dr), math.max(0, bt - dt)
          redis.call('HSET', c.key, 'r' .. k, nr, 't' .. k, nt)
          c.r, c.t = math.max(0, c.r - br + nr), math.max(0, c.t - bt + nt)
        end
      end
      used_r, used_t = 0, 0
    end
    c.r, c.t, c.br, c.bt = c.r + used_r, c.t + used_t, c.br + used_r, c.bt + used_t
  end
  local kr, kt = a[31], a[32]
  c.r, c.t, c.br, c.bt = c.r + kr, c.t + kt, c.br + kr, c.bt + kt
  local dk, dttl = spend_key(p, 'd', ARGV[j + 24], ARGV[j + 25])
  local mk, mttl = spend_key(p, 'm', ARGV[j + 24], ARGV[j + 25])
  publish(dk, a[26], a[27], dttl)
  publish(mk, a[28], a[29], mttl)
  local ws, wr, wt, wn = a[10], a[11], a[12], a[13]
  local is, it, inn = a[14], a[15], a[16]
  local conc, rpm, tpm, bt, bn, f = a[17], a[18], a[19], a[20], a[22], a[30]
  -- The share of what was asked that every limit has room for, `f` times.
  local share = 1
  local function room(left, want)
    if want > 0 then share = math.min(share, math.max(0, left) / (f * want)) end
  end
  if conc >= 0 then room(conc - c.n - is, ws) end
  if rpm >= 0 then room(rpm - c.r, wr) end
  if tpm >= 0 then room(tpm - c.t, wt) end
  -- Each period's spend read once (both budgets are often per month).
  local seen = {}
  local function spent(per)
    if not seen[per] then
      seen[per] = {spent_of(p, per, ARGV[j + 24], ARGV[j + 25], a[26], a[27], a[28], a[29])}
    end
    return seen[per][1], seen[per][2]
  end
  if bt >= 0 then
    local st = spent(ARGV[j + 21])
    room(bt - st - c.rt - it, wt)
  end
  if bn >= 0 then
    local _, sn = spent(ARGV[j + 23])
    room(bn - sn - c.rn - inn, wn)
  end
  ws, wr, wt, wn = math.floor(ws * share), math.floor(wr * share), math.floor(wt * share), math.floor(wn * share)
  -- Less than an eighth of what was asked: too little room to lease.
  local ok = ws + wr + wt + wn > 0 and share >= 0.125
    and (a[10] == 0 or ws > 0) and (a[11] == 0 or wr > 0) and (a[12] == 0 or wt > 0) and (a[13] == 0 or wn > 0)
  if not ok then ws, wr, wt, wn = 0, 0, 0, 0 end
  local held = 0
  if ok or is > 0 or it > 0 or inn > 0 or kr > 0 or kt > 0 then
    local deadline = now + lease
    redis.call('ZADD', c.tickets, deadline, inst .. ':lease:' .. ARGV[j + 8] .. ':'
      .. string.format('%d:%d:%d:%d', is + ws, wr, it + wt, inn + wn))
    if c.exp == 0 then c.exp = deadline end
    c.opened = true
    c.n, c.rt, c.rn = c.n + is + ws, c.rt + it + wt, c.rn + inn + wn
    c.r, c.t, c.br, c.bt = c.r + wr, c.t + wt, c.br + wr, c.bt + wt
    c.moved, held = true, 1
  end
  keep(c, true)
  return {held, ws, wr, wt, wn, c.r, c.t, c.at}
end
while j <= #ARGV do
  if ARGV[j] == 's' then
    settle()
  elseif ARGV[j] == 'l' then
    local r = relet()
    for i = 1, 8 do out[#out + 1] = r[i] end
    j = j + 33
  else
    local r = admit()
    for i = 1, 6 do out[#out + 1] = r[i] end
    j = j + 18
  end
end
return out
"#
);

/// The heartbeat: pushes this instance's open tickets' deadlines forward,
/// republishes its spend and adds what it admitted in process during an
/// outage to the windows. ARGV: instance, lease_ms, then per caller: name,
/// day, month, day tokens, day nanos, month tokens, month nanos (-1: none
/// to publish), n, n tickets (`seq:tokens:nanos`), m, then m (second,
/// requests, tokens). Returns 0 when this instance's marker was missing
/// (a flushed or new Redis: every spend is to be republished), else 1.
const BEAT_SCRIPT: &str = concat!(
    lua_common!(),
    r#"
local j = 3
local deadline = now + lease
local known = 1
if redis.call('SET', 'gptbalance:instance:' .. inst, 1, 'NX', 'EX', 86400) then known = 0 end
while j <= #ARGV do
  local p = P .. ARGV[j] .. ':'
  local dk, dttl = spend_key(p, 'd', ARGV[j + 1], ARGV[j + 2])
  local mk, mttl = spend_key(p, 'm', ARGV[j + 1], ARGV[j + 2])
  publish(dk, tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4]), dttl)
  publish(mk, tonumber(ARGV[j + 5]), tonumber(ARGV[j + 6]), mttl)
  local n = tonumber(ARGV[j + 7])
  j = j + 8
  if n > 0 then
    -- In chunks: unpack's stack is bounded (a few thousand values).
    for from = 0, n - 1, 500 do
      local args = {}
      for i = from, math.min(n, from + 500) - 1 do
        args[#args + 1] = deadline
        args[#args + 1] = inst .. ':' .. ARGV[j + i]
      end
      redis.call('ZADD', p .. 'tickets', 'XX', unpack(args))
    end
    redis.call('EXPIRE', p .. 'tickets', ttl)
    redis.call('EXPIRE', p .. 'state', ttl)
  end
  j = j + n
  local m = tonumber(ARGV[j])
  j = j + 1
  if m > 0 then
    local c = state_of(p)
    keep(c, false)
    for i = 0, m - 1 do
      local s, r, tok = tonumber(ARGV[j + 3 * i]), tonumber(ARGV[j + 3 * i + 1]), tonumber(ARGV[j + 3 * i + 2])
      if s > c.last - 60 and s <= c.last then
        local k = s % 60
        local v = redis.call('HMGET', c.key, 's' .. k, 'r' .. k, 't' .. k, 'r', 't')
        local br, bt = 0, 0
        if tonumber(v[1]) == s then br, bt = tonumber(v[2]) or 0, tonumber(v[3]) or 0 end
        redis.call('HSET', c.key, 's' .. k, s, 'r' .. k, br + r, 't' .. k, bt + tok,
          'r', (tonumber(v[4]) or 0) + r, 't', (tonumber(v[5]) or 0) + tok)
      end
    end
    redis.call('EXPIRE', c.key, ttl)
  end
  j = j + 3 * m
end
return known
"#
);

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
    /// Whether the caller had a budget per day and per month: the settle
    /// publishes this instance's spend of those periods with it.
    budgets: (bool, bool),
    /// Admitted from this instance's lease: settled here, not in Redis.
    lease: Option<LeaseMark>,
}

/// How an admission under shared state went.
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

/// A settle Redis has not taken yet: queued for the next batch, or kept
/// for replay while Redis does not answer.
#[derive(Debug, Clone)]
struct Unsettled {
    caller: Arc<str>,
    ticket: SharedTicket,
    actual_tokens: u64,
    /// This instance's spend of the ticket's day and month to publish with
    /// it (`-1`: none; the heartbeat republishes it every [`BEAT`]).
    own: [i64; 4],
}

/// An admission waiting for its batch: what the script needs, and where
/// its six numbers go.
struct Asked {
    caller: Arc<str>,
    seq: u64,
    limits: [i64; 5],
    pers: [&'static str; 2],
    cost: Cost,
    at: Periods,
    own: [i64; 4],
    answer: tokio::sync::oneshot::Sender<[i64; 6]>,
}

/// What the batcher sends to Redis, in arrival order: settles and
/// admissions alike, and the leases admissions ask for
/// ([`Leases::ask`]: this instance's spend and periods with them).
enum Pending {
    Admit(Asked),
    Settle(Unsettled),
    /// Told once Redis's answer is applied (dropped when it is not).
    Lease(
        Relet,
        Periods,
        (super::Spend, super::Spend),
        tokio::sync::oneshot::Sender<()>,
    ),
}

/// Items per script call at most.
const MAX_BATCH: usize = 256;

/// What one heartbeat call does for one caller.
struct BeatItem {
    name: Arc<str>,
    /// Day tokens and nanos, month tokens and nanos (-1: not published).
    spend: [i64; 4],
    tickets: Vec<String>,
    /// The outage's in-process seconds (second, requests, tokens).
    seconds: Vec<(u64, u64, u64)>,
}

/// One caller, as the heartbeat sees it.
pub struct CallerEntry {
    pub name: Arc<str>,
    pub state: Arc<CallerState>,
    /// Whether it has a budget per day, per month ([`budget_periods`]):
    /// the heartbeat publishes its spend of those periods only.
    pub budgets: (bool, bool),
}

/// Whether `limits` has a budget (of tokens or USD) per day, per month.
pub fn budget_periods(limits: &CallerLimits) -> (bool, bool) {
    let has = |b: Option<crate::config::Budget>, per: Per| b.is_some_and(|b| b.per == per);
    let per = |per| has(limits.budget_tokens, per) || has(limits.budget_usd, per);
    (per(Per::Day), per(Per::Month))
}

pub struct SharedState {
    cfg: SharedStateConfig,
    instance: Arc<str>,
    client: Option<redis::Client>,
    conn: ArcSwapOption<MultiplexedConnection>,
    outage: AtomicBool,
    /// An answer came late: the supervisor pings Redis to tell.
    doubt: AtomicBool,
    /// Script calls in a row that came late.
    late: std::sync::atomic::AtomicU32,
    since: Mutex<SystemTime>,
    wake: tokio::sync::Notify,
    seq: AtomicU64,
    /// This instance's tickets still open in Redis, by sequence: the
    /// heartbeat refreshes their deadlines.
    open: Mutex<HashMap<u64, (Arc<str>, Cost)>>,
    unsettled: Mutex<Vec<Unsettled>>,
    /// Admissions and settles for the batcher ([`SharedState::batches`]).
    queue: tokio::sync::mpsc::UnboundedSender<Pending>,
    queued: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Pending>>>,
    batch: Script,
    beat: Script,
    cooldown: Script,
    leases: Leases,
    /// Each caller's spend as the heartbeat last published it.
    published: Mutex<HashMap<Arc<str>, [i64; 4]>>,
    /// Heartbeats so far, for [`FULL_BEAT`].
    beats: AtomicU64,
    /// Redis lost this instance's marker: the next beat republishes all.
    republish: AtomicBool,
    /// Set by [`SharedState::run`], for [`SharedState::release`].
    callers: std::sync::OnceLock<Callers>,
}

/// The current callers, as the heartbeat and the lease keeper see them.
pub type Callers = Arc<dyn Fn() -> Vec<CallerEntry> + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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

/// Appends one settle to a batch call: the one builder of settles, for the
/// batcher and the replay after an outage alike.
fn push_settle(call: &mut redis::Cmd, u: &Unsettled) {
    let t = &u.ticket;
    call.arg("s")
        .arg(&*u.caller)
        .arg(t.seq)
        .arg(t.second)
        .arg(t.reserved.tokens)
        .arg(t.reserved.nanos)
        .arg(u.actual_tokens)
        .arg(t.at.day)
        .arg(t.at.month);
    for n in u.own {
        call.arg(n);
    }
}

/// Appends one relet to a batch call: the old lease given back, a new one
/// asked for (see `relet` in [`BATCH`]).
fn push_relet(
    call: &mut redis::Cmd,
    r: &Relet,
    p: Periods,
    own: Option<(super::Spend, super::Spend)>,
    factor: u64,
) {
    call.arg("l").arg(&*r.caller);
    match &r.old {
        Some(h) => call
            .arg(&h.suffix)
            .arg(h.second)
            .arg(h.reqs)
            .arg(r.used_reqs)
            .arg(h.tokens)
            .arg(r.used_tokens),
        None => call.arg("-").arg(0).arg(0).arg(0).arg(0).arg(0),
    };
    call.arg(r.seq)
        .arg("-")
        .arg(r.want.slots)
        .arg(r.want.reqs)
        .arg(r.want.tokens)
        .arg(r.want.nanos)
        .arg(r.in_flight.slots)
        .arg(r.in_flight.tokens)
        .arg(r.in_flight.nanos);
    let l = &r.limits;
    let budget = |b: Option<crate::config::Budget>| {
        b.map_or((-1, "m"), |b| (b.amount.max(0), per_code(b.per)))
    };
    let (bt, bt_per) = budget(l.budget_tokens);
    let (bn, bn_per) = budget(l.budget_usd);
    call.arg(l.concurrency.map_or(-1, i64::from))
        .arg(opt(l.rpm))
        .arg(opt(l.tpm))
        .arg(bt)
        .arg(bt_per)
        .arg(bn)
        .arg(bn_per)
        .arg(p.day)
        .arg(p.month);
    // This instance's spend, published before the lease's reservation
    // goes: what was admitted from it is never counted zero times.
    let has = |b: Option<crate::config::Budget>, per: Per| b.is_some_and(|b| b.per == per);
    let per = |per| has(l.budget_tokens, per) || has(l.budget_usd, per);
    let figures = |s: super::Spend, period: u64, budget: bool| {
        if budget && s.period == period {
            [s.tokens as i64, s.nanos]
        } else {
            [-1, -1]
        }
    };
    let (day, month) = own.map_or(([-1, -1], [-1, -1]), |(d, m)| {
        (
            figures(d, p.day, per(Per::Day)),
            figures(m, p.month, per(Per::Month)),
        )
    });
    for n in day.into_iter().chain(month) {
        call.arg(n);
    }
    call.arg(factor).arg(r.carry.reqs).arg(r.carry.tokens);
}

fn push_admit(call: &mut redis::Cmd, a: &Asked) {
    call.arg("a")
        .arg(&*a.caller)
        .arg(a.seq)
        .arg(a.limits[0])
        .arg(a.limits[1])
        .arg(a.limits[2])
        .arg(a.limits[3])
        .arg(a.pers[0])
        .arg(a.limits[4])
        .arg(a.pers[1])
        .arg(a.cost.tokens)
        .arg(a.cost.nanos)
        .arg(a.at.day)
        .arg(a.at.month);
    for n in a.own {
        call.arg(n);
    }
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
        let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
        SharedState {
            cfg,
            instance,
            client,
            conn: ArcSwapOption::empty(),
            outage: AtomicBool::new(true),
            doubt: AtomicBool::new(false),
            late: std::sync::atomic::AtomicU32::new(0),
            since: Mutex::new(SystemTime::now()),
            wake: tokio::sync::Notify::new(),
            seq: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            unsettled: Mutex::new(Vec::new()),
            queue,
            queued: Mutex::new(Some(queued)),
            batch: Script::new(BATCH),
            beat: Script::new(BEAT_SCRIPT),
            cooldown: Script::new(COOLDOWN),
            leases: Leases::default(),
            published: Mutex::new(HashMap::new()),
            beats: AtomicU64::new(0),
            republish: AtomicBool::new(false),
            callers: std::sync::OnceLock::new(),
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
        self.leases.pause();
        self.wake.notify_one();
    }

    /// An answer came late (`call`: a script call, counted towards
    /// [`LATE_IN_A_ROW`]; otherwise a request that stopped waiting): the
    /// supervisor pings Redis now, and outage follows when that fails.
    fn doubt(&self, call: bool) {
        if call && self.late.fetch_add(1, Ordering::Relaxed) + 1 >= LATE_IN_A_ROW {
            self.fail("script calls answered later than shared_state.timeout, several in a row");
            return;
        }
        if !self.doubt.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// The connection, when shared mode is on.
    fn connection(&self) -> Option<MultiplexedConnection> {
        if self.outage.load(Ordering::Relaxed) {
            return None;
        }
        self.conn.load_full().map(|c| (*c).clone())
    }

    /// Admits a request of `caller` under shared state: its item rides in
    /// the batcher's next script call, or `on_outage` applies at once when
    /// Redis is out or has not answered within `timeout`.
    pub async fn admit(
        &self,
        caller: &Arc<str>,
        state: &CallerState,
        limits: &CallerLimits,
        cost: Cost,
        now: SystemTime,
    ) -> Result<(Grant, Headroom), Denial> {
        if self.outage.load(Ordering::Relaxed) {
            return self.admit_in_outage(state, limits, cost, now);
        }
        let p = Periods::of(now);
        let budgets = budget_periods(limits);
        // Admitted from this instance's lease: no Redis work.
        let from_lease = || {
            self.leases
                .take(caller, limits, cost)
                .map(|(mark, headroom)| {
                    let ticket = SharedTicket {
                        seq: 0,
                        second: p.second,
                        reserved: cost,
                        at: p,
                        budgets,
                        lease: Some(mark),
                    };
                    (Grant::Shared(ticket), headroom)
                })
        };
        if let Some(granted) = from_lease() {
            return Ok(granted);
        }
        let until = tokio::time::Instant::now() + self.cfg.timeout;
        let (day, month) = state.own_spend(now);
        // A caller that has become busy (or was, not long ago) asks for a
        // lease, and this request waits for it (one round trip, as on the
        // exact path) and is admitted from it: a caller starting or coming
        // back does not send a second's worth of requests the exact path.
        if let Some(r) = self.leases.ask(caller, Instant::now(), &self.seq) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            match self.queue.send(Pending::Lease(r, p, (day, month), tx)) {
                Err(e) => {
                    if let Pending::Lease(r, ..) = e.0 {
                        self.leases.lost(std::slice::from_ref(&r), Instant::now());
                    }
                }
                Ok(()) => match tokio::time::timeout_at(until, rx).await {
                    Ok(Ok(())) => {
                        if let Some(granted) = from_lease() {
                            return Ok(granted);
                        }
                        // Not granted (too little room): the exact path,
                        // in what is left of `timeout`.
                    }
                    Ok(Err(_)) if self.outage.load(Ordering::Relaxed) => {
                        return self.admit_in_outage(state, limits, cost, now);
                    }
                    Ok(Err(_)) => {}
                    Err(_) => {
                        self.doubt(false);
                        return self.admit_in_outage(state, limits, cost, now);
                    }
                },
            }
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let budget = |b: Option<crate::config::Budget>| {
            b.map_or((-1, "m"), |b| (b.amount.max(0), per_code(b.per)))
        };
        let (bt, bt_per) = budget(limits.budget_tokens);
        let (bn, bn_per) = budget(limits.budget_usd);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let asked = Asked {
            caller: caller.clone(),
            seq,
            limits: [
                limits.concurrency.map_or(-1, i64::from),
                opt(limits.rpm),
                opt(limits.tpm),
                bt,
                bn,
            ],
            pers: [bt_per, bn_per],
            cost,
            at: p,
            own: [
                day.tokens as i64,
                day.nanos,
                month.tokens as i64,
                month.nanos,
            ],
            answer: tx,
        };
        if self.queue.send(Pending::Admit(asked)).is_err() {
            return self.admit_in_outage(state, limits, cost, now);
        }
        let answer = match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(v)) => v,
            // The batch failed: the batcher has entered outage mode.
            Ok(Err(_)) => return self.admit_in_outage(state, limits, cost, now),
            // This request alone goes by `on_outage`; whether Redis is
            // out is the supervisor's ping to tell.
            Err(_) => {
                self.doubt(false);
                return self.admit_in_outage(state, limits, cost, now);
            }
        };
        let at = |i: usize| answer[i].max(0) as u64;
        let wait = |n: u64| Duration::from_secs(n.max(1));
        match at(0) {
            0 => {
                lock(&self.open).insert(seq, (caller.clone(), cost));
                self.leases.admitted(caller);
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
                    budgets,
                    lease: None,
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
    /// and the settle joins the batcher's next script call (kept for
    /// replay when Redis does not take it). The response never waits on it.
    pub fn settle(
        self: &Arc<Self>,
        caller: Arc<str>,
        state: &CallerState,
        ticket: SharedTicket,
        actual: Cost,
    ) {
        state.record_spend(ticket.at, actual);
        self.leases
            .settle(&caller, ticket.lease, ticket.reserved, actual);
        if ticket.lease.is_some() {
            return;
        }
        lock(&self.open).remove(&ticket.seq);
        let (day, month) = state.own_spend(SystemTime::now());
        // A ticket of an earlier period publishes that period's figures
        // only when they are still the current ones; a period without a
        // budget is left to the heartbeat.
        let figures = |s: super::Spend, period: u64, budget: bool| {
            if budget && s.period == period {
                [s.tokens as i64, s.nanos]
            } else {
                [-1, -1]
            }
        };
        let [dt, dn] = figures(day, ticket.at.day, ticket.budgets.0);
        let [mt, mn] = figures(month, ticket.at.month, ticket.budgets.1);
        let u = Unsettled {
            caller,
            ticket,
            actual_tokens: actual.tokens,
            own: [dt, dn, mt, mn],
        };
        if self.outage.load(Ordering::Relaxed) {
            self.keep_unsettled(u);
            return;
        }
        if let Err(e) = self.queue.send(Pending::Settle(u)) {
            if let Pending::Settle(u) = e.0 {
                self.keep_unsettled(u);
            }
        }
    }

    fn keep_unsettled(&self, u: Unsettled) {
        let mut q = lock(&self.unsettled);
        if q.len() < MAX_UNSETTLED {
            q.push(u);
        }
    }

    /// The batcher: takes what is queued (up to [`MAX_BATCH`] items) while
    /// the previous call is out, sends it as one script call, hands each
    /// admission its answer. One call at a time: under load a batch fills
    /// during the round trip of the one before.
    async fn batches(self: Arc<Self>) {
        let Some(mut queued) = lock(&self.queued).take() else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = queued.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queued.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            self.send_batch(&mut batch).await;
            batch.clear();
        }
    }

    async fn send_batch(&self, batch: &mut Vec<Pending>) {
        // A request that stopped waiting (its timeout passed) is not
        // reserved for.
        batch.retain(|p| !matches!(p, Pending::Admit(a) if a.answer.is_closed()));
        if batch.is_empty() {
            return;
        }
        let Some(mut conn) = self.connection() else {
            self.give_back(batch);
            return;
        };
        let mut call = self.batch_call();
        let factor = lease::ROOM * u64::from(self.cfg.replicas.max(1));
        for p in batch.iter() {
            match p {
                Pending::Admit(a) => push_admit(&mut call, a),
                Pending::Settle(u) => push_settle(&mut call, u),
                Pending::Lease(r, at, own, _) => push_relet(&mut call, r, *at, Some(*own), factor),
            }
        }
        let answer: Vec<i64> = match self
            .invoke(&self.batch, &call, &mut conn, self.cfg.timeout)
            .await
        {
            Ok(v) => {
                self.late.store(0, Ordering::Relaxed);
                v
            }
            Err(e) => {
                // Its admissions go by `on_outage` (their answers are
                // dropped here); a late call is only a doubt.
                match e {
                    CallError::Late => self.doubt(true),
                    CallError::Failed(e) => self.fail(&e),
                }
                self.give_back(batch);
                return;
            }
        };
        // Six numbers per admission, eight per lease, in order.
        let mut numbers = answer.as_slice();
        let at = Instant::now();
        for p in batch.drain(..) {
            let a = match p {
                Pending::Admit(a) => a,
                Pending::Lease(r, _, _, told) => {
                    match numbers.split_at_checked(8) {
                        Some((eight, rest)) => {
                            self.leases.apply(&r, eight, at);
                            numbers = rest;
                            let _ = told.send(());
                        }
                        None => self.leases.lost(std::slice::from_ref(&r), at),
                    }
                    continue;
                }
                Pending::Settle(_) => continue,
            };
            // (None when Redis answered short: the request goes by
            // `on_outage`; the leases after it are still seen to.)
            let Some((six, rest)) = numbers.split_at_checked(6) else {
                continue;
            };
            numbers = rest;
            let mut out = [0i64; 6];
            out.copy_from_slice(six);
            if a.answer.send(out).is_err() && out[0] == 0 {
                // Reserved for a request that stopped waiting: given back.
                let ticket = SharedTicket {
                    seq: a.seq,
                    second: out[5].max(0) as u64,
                    reserved: a.cost,
                    at: a.at,
                    budgets: (false, false),
                    lease: None,
                };
                let u = Unsettled {
                    caller: a.caller,
                    ticket,
                    actual_tokens: 0,
                    own: [-1; 4],
                };
                let _ = self.queue.send(Pending::Settle(u));
            }
        }
    }

    /// The lease keeper: every [`lease::TICK`], gives back and takes the
    /// leases due (see [`super::lease`]), [`lease::RELETS_PER_TICK`] at
    /// most in one script call, so that between two of its calls the
    /// batcher's admissions have Redis to themselves. Runs for the life of
    /// the process.
    async fn keep_leases(self: Arc<Self>, callers: Callers) {
        let mut tick = tokio::time::interval(lease::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if self.outage.load(Ordering::Relaxed) {
                continue;
            }
            let plan = self
                .leases
                .plan(Instant::now(), &self.seq, lease::RELETS_PER_TICK);
            if !plan.is_empty() {
                // No request waits on a relet (its carry admits while it
                // is out), so a relet may take up to a tick before its
                // leases are dropped: on a loaded host, dropping them at
                // `timeout` sent every one of their callers to the exact
                // path at once.
                let bound = self.cfg.timeout.max(lease::TICK);
                self.relet(plan, &callers, bound).await;
            }
        }
    }

    /// Sends relets; what Redis does not take is dropped here (and frees
    /// itself in Redis by its deadline). A failed relet is no outage: its
    /// callers go back to the exact path, whose batcher decides that.
    async fn relet(&self, plan: Vec<Relet>, callers: &Callers, bound: Duration) {
        let Some(mut conn) = self.connection() else {
            self.leases.lost(&plan, Instant::now());
            return;
        };
        let states: HashMap<Arc<str>, Arc<CallerState>> =
            callers().into_iter().map(|c| (c.name, c.state)).collect();
        let now = SystemTime::now();
        let p = Periods::of(now);
        let factor = lease::ROOM * u64::from(self.cfg.replicas.max(1));
        let mut chunks = plan.chunks(lease::RELETS_PER_CALL);
        while let Some(chunk) = chunks.next() {
            let mut call = self.batch_call();
            for r in chunk {
                let own = states.get(&r.caller).map(|s| s.own_spend(now));
                push_relet(&mut call, r, p, own, factor);
            }
            match self
                .invoke::<Vec<i64>>(&self.batch, &call, &mut conn, bound)
                .await
            {
                Ok(answer) => {
                    let at = Instant::now();
                    for (r, eight) in chunk.iter().zip(answer.chunks_exact(8)) {
                        self.leases.apply(r, eight, at);
                    }
                }
                Err(e) => {
                    // Only these leases are dropped (their callers take the
                    // exact path, which is what detects a real outage): a
                    // slow relet must not deny every caller.
                    tracing::warn!(
                        address = %self.cfg.address, error = %e, relets = plan.len(),
                        "leases dropped: Redis did not take their relet in time"
                    );
                    let at = Instant::now();
                    self.leases.lost(chunk, at);
                    for rest in chunks {
                        self.leases.lost(rest, at);
                    }
                    return;
                }
            }
        }
    }

    /// Gives every lease back, taking none: at shutdown, so that what this
    /// instance did not use is free at once rather than at its deadline.
    pub async fn release(&self) {
        let Some(callers) = self.callers.get() else {
            return;
        };
        let plan = self.leases.release(&self.seq);
        if !plan.is_empty() {
            self.relet(plan, callers, self.cfg.timeout).await;
        }
    }

    /// A batch Redis did not take: its admissions learn it at once (they
    /// go by `on_outage`), its settles wait for the replay, its leases are
    /// dropped.
    fn give_back(&self, batch: &mut Vec<Pending>) {
        let now = Instant::now();
        for p in batch.drain(..) {
            match p {
                Pending::Settle(u) => self.keep_unsettled(u),
                // Dropped like any relet Redis did not take.
                Pending::Lease(r, ..) => self.leases.lost(std::slice::from_ref(&r), now),
                Pending::Admit(_) => {}
            }
        }
    }

    /// `EVALSHA <batch script> 0 <instance> <lease>`, items to be appended.
    fn batch_call(&self) -> redis::Cmd {
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.batch.get_hash())
            .arg(0)
            .arg(&*self.instance)
            .arg(LEASE.as_millis() as u64);
        call
    }

    /// Runs a script call within `bound`, loading the script first when
    /// Redis does not know it (a restarted or `SCRIPT FLUSH`ed server).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        call: &redis::Cmd,
        conn: &mut MultiplexedConnection,
        bound: Duration,
    ) -> Result<T, CallError> {
        let once = async {
            match call.query_async::<T>(conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script.load_async(conn).await?;
                    call.query_async::<T>(conn).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(bound, once).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Failed(e.to_string())),
            Err(_) => Err(CallError::Late),
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
                Err(_) => me.doubt(false),
            }
        });
    }

    /// Connects, keeps the heartbeat, and brings the instance back to
    /// shared mode after an outage; runs for the life of the process.
    /// `callers` lists the current callers each beat.
    pub async fn run(self: Arc<Self>, callers: Callers) {
        let Some(client) = self.client.clone() else {
            return;
        };
        tokio::spawn(self.clone().batches());
        let _ = self.callers.set(callers.clone());
        tokio::spawn(self.clone().keep_leases(callers.clone()));
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.cfg.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(None);
        loop {
            if self.outage.load(Ordering::Relaxed) {
                match self.recover(&client, &config, &callers).await {
                    Ok(()) => {
                        let down_for = lock(&self.since).elapsed().unwrap_or_default();
                        *lock(&self.since) = SystemTime::now();
                        self.late.store(0, Ordering::Relaxed);
                        self.doubt.store(false, Ordering::Relaxed);
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
            // Woken early by a request that saw Redis fail or answer late.
            let _ = tokio::time::timeout(BEAT, self.wake.notified()).await;
            if self.outage.load(Ordering::Relaxed) {
                continue;
            }
            let Some(mut conn) = self.conn.load_full().map(|c| (*c).clone()) else {
                continue;
            };
            let bound = self.cfg.timeout.max(DOUBT_PING);
            if self.doubt.swap(false, Ordering::Relaxed) {
                if let Err(e) = ping(&mut conn, bound).await {
                    self.fail(&format!("a late answer, then no answer to a ping: {e}"));
                    continue;
                }
            }
            match self.heartbeat(&mut conn, &callers, false).await {
                Ok(()) => {}
                // A late heartbeat is a doubt like any late answer.
                Err(CallError::Late) => {
                    if let Err(e) = ping(&mut conn, bound).await {
                        self.fail(&format!("heartbeat late, then no answer to a ping: {e}"));
                    }
                }
                Err(CallError::Failed(e)) => self.fail(&format!("heartbeat: {e}")),
            }
        }
    }

    /// Reconnects when needed, loads the scripts, replays the settles and
    /// counts of the outage; `Ok` when Redis took all of it.
    async fn recover(
        &self,
        client: &redis::Client,
        config: &AsyncConnectionConfig,
        callers: &Callers,
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
        for s in [&self.batch, &self.beat, &self.cooldown] {
            tokio::time::timeout(bound, s.load_async(&mut conn))
                .await
                .map_err(|_| "SCRIPT LOAD timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        }
        // Replayed in batches, oldest first; what Redis does not take stays.
        loop {
            let chunk: Vec<Unsettled> = {
                let mut q = lock(&self.unsettled);
                let n = q.len().min(MAX_BATCH);
                q.drain(..n).collect()
            };
            if chunk.is_empty() {
                break;
            }
            let mut call = self.batch_call();
            for u in &chunk {
                push_settle(&mut call, u);
            }
            if let Err(e) = self
                .invoke::<redis::Value>(&self.batch, &call, &mut conn, bound)
                .await
            {
                let mut q = lock(&self.unsettled);
                let later = std::mem::take(&mut *q);
                *q = chunk;
                q.extend(later);
                return Err(format!("settle replay: {e}"));
            }
        }
        self.heartbeat(&mut conn, callers, true)
            .await
            .map_err(|e| format!("heartbeat: {e}"))
    }

    /// Every open ticket's deadline pushed forward (those of leases not
    /// relet for [`lease::STALE`]: a relet renews its own), every
    /// caller's spend republished when it changed (all of it every
    /// [`FULL_BEAT`] beats, and when Redis lost this instance's marker);
    /// with `reconcile`, all of it, and the in-process windows of the
    /// outage are added to the shared ones (and emptied here). In calls of
    /// [`BEAT_CALLERS`] callers, each sent after the previous one's answer:
    /// with a thousand callers one call would hold Redis for milliseconds,
    /// and every admission behind it. Callers with nothing to do are left
    /// out.
    async fn heartbeat(
        &self,
        conn: &mut MultiplexedConnection,
        callers: &Callers,
        reconcile: bool,
    ) -> Result<(), CallError> {
        let now = SystemTime::now();
        let p = Periods::of(now);
        let mut by_caller: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for (seq, (c, cost)) in lock(&self.open).iter() {
            by_caller
                .entry(c.clone())
                .or_default()
                .push(format!("{seq}:{}:{}", cost.tokens, cost.nanos));
        }
        let stale = Instant::now().checked_sub(lease::STALE);
        let stale = if reconcile { None } else { stale };
        for (c, ticket) in self.leases.tickets(stale) {
            by_caller.entry(c).or_default().push(ticket);
        }
        let full = reconcile
            || self.republish.swap(false, Ordering::Relaxed)
            || self.beats.fetch_add(1, Ordering::Relaxed) % FULL_BEAT == 0;
        let mut items = Vec::new();
        {
            let mut published = lock(&self.published);
            if full {
                published.clear();
            }
            for c in callers() {
                let (day, month) = c.state.own_spend(now);
                let figures = |s: super::Spend, has: bool| {
                    if has {
                        [s.tokens.min(i64::MAX as u64) as i64, s.nanos]
                    } else {
                        [-1, -1]
                    }
                };
                let [dt, dn] = figures(day, c.budgets.0);
                let [mt, mn] = figures(month, c.budgets.1);
                let mut spend = [dt, dn, mt, mn];
                if published.get(&c.name) == Some(&spend) {
                    spend = [-1; 4];
                } else if spend != [-1; 4] {
                    published.insert(c.name.clone(), spend);
                }
                let tickets = by_caller.remove(&c.name).unwrap_or_default();
                let seconds = if reconcile {
                    c.state.take_window(now)
                } else {
                    Vec::new()
                };
                if spend == [-1; 4] && tickets.is_empty() && seconds.is_empty() {
                    continue;
                }
                items.push(BeatItem {
                    name: c.name,
                    spend,
                    tickets,
                    seconds,
                });
            }
        }
        if items.is_empty() {
            return ping(conn, self.cfg.timeout.max(Duration::from_millis(500)))
                .await
                .map_err(CallError::Failed);
        }
        let bound = if reconcile {
            self.cfg.timeout.max(Duration::from_millis(500))
        } else {
            self.cfg.timeout.max(Duration::from_millis(200))
        };
        let mut chunks = items.chunks(BEAT_CALLERS);
        while let Some(chunk) = chunks.next() {
            let call = self.beat_call(chunk, p);
            match self.invoke::<i64>(&self.beat, &call, conn, bound).await {
                Ok(known) => {
                    if known == 0 {
                        // A flushed or new Redis: every spend again.
                        self.republish.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    // Not known to be published: sent again next beat.
                    let mut published = lock(&self.published);
                    for item in chunk.iter().chain(chunks.flatten()) {
                        published.remove(&item.name);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// One heartbeat call for `items`.
    fn beat_call(&self, items: &[BeatItem], p: Periods) -> redis::Cmd {
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.beat.get_hash())
            .arg(0)
            .arg(&*self.instance)
            .arg(LEASE.as_millis() as u64);
        for c in items {
            call.arg(&*c.name).arg(p.day).arg(p.month);
            for n in c.spend {
                call.arg(n);
            }
            call.arg(c.tickets.len());
            for t in &c.tickets {
                call.arg(t);
            }
            call.arg(c.seconds.len());
            for (s, r, t) in &c.seconds {
                call.arg(s).arg(r).arg(t);
            }
        }
        call
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

/// Why a script call did not answer.
#[derive(Debug)]
enum CallError {
    /// Not within its bound.
    Late,
    /// The connection or Redis said no.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Late => f.write_str("no answer within shared_state.timeout"),
            CallError::Failed(e) => f.write_str(e),
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
