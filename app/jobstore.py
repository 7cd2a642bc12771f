"""The Redis job store: one hash per job, the team's indexes, compare-and-set transitions, progress,
an event log (a Redis stream) and idempotency keys with a TTL.

Job ids sort by creation time (hex milliseconds first), so lexicographic order is newest-last and
the team indexes are sorted sets ranged by lex. Status changes go through one Lua script so the
check, the write, the index move and the event are atomic. Single Redis instance (no cluster):
the scripts derive the team's index keys from the job.

What a job keeps in Redis, and how it stays bounded however many shards the job has (see
`JOB_KEY_SUFFIXES`, the one list of a job's keys, and README "Operations"):

- `job:<id>`: the job hash: a fixed set of fields (constant size); never expires by default.
- `:progress`: running sums (`sum:*`, what `read` returns), the folded totals of finished shards
  (`folded:*`) and the live progress of the shards still rendering (`shard<k>:*`, removed when the
  shard finishes: fields for in-flight shards only, so bounded by the workers, not the shards).
- `:shards_done_bits`: one bit per shard (a redelivered shard cannot count twice): ceil(shards/8)
  bytes, e.g. 1.25 kB at 10,000 shards.
- `:events` and `:events:folded`: the event log. Per-shard task events (`task_started` /
  `task_ended` of a numbered task such as `render_shard:17`) are compacted: the first
  `EVENTS_KEEP_FIRST` and the last `EVENTS_KEEP_LAST` stay verbatim, the ones between are folded
  into one `compacted` marker event (counts by type and outcome, the id range) once more than
  `EVENTS_FOLD_BATCH` wait; so a job's stream holds at most EVENTS_TASK_CAP task events plus its
  other events (status, stage, sampling checkpoints, webhook attempts: none of them per shard).
- `:webhooks`: one message per webhook event (terminal events and stages: bounded).
- the task ledger (`workers/tasking.py`): `:attempts`, `:tasks_done`, `:tasks_done:<task>` bits
  and leases `:lease:<task>` (those expire by themselves).

When a job reaches a terminal state its progress sums are copied into the job hash and every key
above but the job hash gets an expiry `keys_ttl_s` later (`IDFORGE_JOB_KEYS_TTL_S`; 0 = keep);
a write that comes later (a late redelivery, a webhook attempt) keeps that same expiry.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from app.redis_client import PREFIX as P
from app.redis_client import connect, iso_from_epoch, now_iso, translate

Status = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "canceling", "succeeded", "failed", "canceled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
STAGES = ("sampling_identities", "sampling_variations", "rendering", "evaluating", "packaging")
# Allowed predecessors of each status.
TRANSITIONS: dict[str, frozenset[str]] = {
    "running": frozenset({"queued", "running"}),
    "canceling": frozenset({"queued", "running"}),
    "canceled": frozenset({"queued", "running", "canceling"}),
    "succeeded": frozenset({"running"}),
    "failed": frozenset({"queued", "running", "canceling"}),
}

# ---- the per-job footprint (module docstring) --------------------------------------------------
# Events of one shard's task: `task_started` and `task_ended` of a numbered task (`render_shard:17`).
FOLDABLE_EVENTS = frozenset({"task_started", "task_ended"})
_NUMBERED_TASK = re.compile(r".+:[0-9]+")
EVENTS_KEEP_FIRST = 64  # the first per-shard task events, kept verbatim
EVENTS_KEEP_LAST = 256  # the most recent ones, kept verbatim
EVENTS_FOLD_BATCH = 128  # compaction runs once this many more wait (amortised: O(1) per event)
# The most per-shard task events a job's stream holds at any time; then one `compacted` marker.
EVENTS_TASK_CAP = EVENTS_KEEP_FIRST + EVENTS_KEEP_LAST + EVENTS_FOLD_BATCH
EVENTS_MAXLEN = 10000  # backstop on the whole stream (XADD MAXLEN ~), far above what jobs write
MARKER_TASKS = 20  # restarted tasks named in the marker (the rest are counted)
# Every per-job key but the job hash: they expire `keys_ttl_s` after the job ends (leases, with
# their own short expiry, are not listed).
JOB_KEY_SUFFIXES = (":progress", ":shards_done_bits", ":shards_done", ":events", ":events:folded",
                    ":webhooks", ":attempts", ":tasks_done", ":tasks_done:render_shard")
BITMAP_TASKS = ("render_shard",)  # numbered tasks whose done marks are bits (`:tasks_done:<name>`)
DEFAULT_KEYS_TTL_S = 30 * 86400  # the default of IDFORGE_JOB_KEYS_TTL_S
LIST_MAX_SCAN = 2000  # jobs a filtered list page looks at, at most (`JobStore.list_jobs`)


def job_key(job_id: str, suffix: str = "") -> str:
    """The Redis key of a job (`suffix` ''), or of one of its records (`:progress`, ...)."""
    return P + f"job:{job_id}{suffix}"


def foldable(type_: str, data: dict[str, Any]) -> bool:
    """Whether an event is one of a shard's task events, which compaction may fold."""
    return type_ in FOLDABLE_EVENTS and bool(_NUMBERED_TASK.fullmatch(str(data.get("task", ""))))


# A later write to a job's record keeps the expiry the job got when it ended (KEYS[1] the job hash).
KEEP_EXPIRY = """
local function keep_expiry(job, key)
  local at = redis.call('HGET', job, 'keys_expire_at')
  if at then redis.call('PEXPIREAT', key, at) end
end
"""


# Sum the progress fields that `_decode` sums (folded:*, shard*:*) of the hash `key`: used once per
# job to seed the running sums, and by reads of jobs without them.
_SUM_SHARDS_FN = """
local function sum_shards(key)
  local ids, imgs = 0, 0
  local progress = redis.call('HGETALL', key)
  for i = 1, #progress, 2 do
    local part, what = string.match(progress[i], '^(.*):([^:]*)$')
    if part and (string.sub(part, 1, 5) == 'shard' or part == 'folded') then
      if what == 'identities' then ids = ids + tonumber(progress[i + 1])
      elseif what == 'images' then imgs = imgs + tonumber(progress[i + 1]) end
    end
  end
  return ids, imgs
end
"""

# KEYS[1] the job, KEYS[2] its progress, KEYS[3..] its other records (JOB_KEY_SUFFIXES). ARGV[5]:
# '' unless `to` is terminal, then the milliseconds its records are kept ('0': no expiry).
_TRANSITION = _SUM_SHARDS_FN + """
local job = KEYS[1]
local cur = redis.call('HGET', job, 'status')
if not cur then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
local to, now = ARGV[1], ARGV[2]
local id = redis.call('HGET', job, 'id')
local owner = redis.call('HGET', job, 'owner')
redis.call('HSET', job, 'status', to, 'updated_at', now)
if cur ~= to then redis.call('HSET', job, to .. '_at', now) end
for i = 6, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
redis.call('ZREM', ARGV[4] .. 'team:' .. owner .. ':status:' .. cur, id)
redis.call('ZADD', ARGV[4] .. 'team:' .. owner .. ':status:' .. to, 0, id)
if cur ~= to then
  redis.call('XADD', job .. ':events', 'MAXLEN', '~', %(maxlen)d, '*', 'type', 'status',
             'from', cur, 'to', to, 'at', now)
end
if ARGV[5] ~= '' and cur ~= to then
  -- Ended: the job hash keeps its progress (the progress hash may expire), the rest expires.
  local sums = redis.call('HMGET', KEYS[2], 'sum:identities', 'sum:images')
  local ids, imgs = tonumber(sums[1]), tonumber(sums[2])
  if not ids then ids, imgs = sum_shards(KEYS[2]) end
  redis.call('HSET', job, 'identities_done', ids, 'images_done', imgs)
  local ttl = tonumber(ARGV[5])
  if ttl > 0 then
    local t = redis.call('TIME')
    local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
    redis.call('HSET', job, 'keys_expire_at', at)
    for i = 2, #KEYS do redis.call('PEXPIREAT', KEYS[i], at) end
  end
  -- Retention (app/lifecycle.py): the data expires `retention_s` after the job ends.
  local keep = tonumber(redis.call('HGET', job, 'retention_s') or '0')
  if keep > 0 then
    local t = redis.call('TIME')
    local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + math.floor(keep * 1000)
    redis.call('HSET', job, 'expires_at_ms', at)
    redis.call('ZADD', ARGV[4] .. 'expiry', at, id)
  end
  -- Reuse: the team's latest succeeded job of each dataset hash.
  local dataset = redis.call('HGET', job, 'dataset_hash')
  if to == 'succeeded' and dataset then
    redis.call('HSET', ARGV[4] .. 'team:' .. owner .. ':reuse', dataset, id)
  end
end
return {1, cur}
""" % {"maxlen": EVENTS_MAXLEN}

_CREATE = """
local job, idem = KEYS[1], KEYS[2]
if idem ~= '' then
  local v = redis.call('GET', idem)
  if v then return {'exists', v} end
  redis.call('SET', idem, cjson.encode({hash = ARGV[5], job = ARGV[1], state = 'pending'}),
             'EX', tonumber(ARGV[6]))
end
redis.call('HSET', job, 'id', ARGV[1], 'owner', ARGV[2], 'status', 'queued', 'spec', ARGV[3],
           'spec_hash', ARGV[4], 'created_at', ARGV[7], 'queued_at', ARGV[7],
           'updated_at', ARGV[7], 'identities_total', ARGV[8], 'images_total', ARGV[9])
local extra = cjson.decode(ARGV[11])  -- lifecycle fields and the metadata indexes (`create`)
for k, v in pairs(extra.fields) do redis.call('HSET', job, k, v) end
for _, key in ipairs(extra.index) do redis.call('ZADD', key, 0, ARGV[1]) end
redis.call('ZADD', ARGV[10] .. 'team:' .. ARGV[2] .. ':jobs', 0, ARGV[1])
redis.call('ZADD', ARGV[10] .. 'team:' .. ARGV[2] .. ':status:queued', 0, ARGV[1])
redis.call('XADD', job .. ':events', 'MAXLEN', '~', %d, '*', 'type', 'status', 'from', '',
           'to', 'queued', 'at', ARGV[7])
return {'created', ARGV[1]}
""" % EVENTS_MAXLEN

# The progress hash (KEYS of the scripts below: 1 the job, 2 `:progress`, 3 `:shards_done_bits`,
# 4 the legacy `:shards_done` set):
# - `sum:identities`, `sum:images`: the running sums `read` returns (finished and live shards);
# - `folded:identities`, `folded:images`: what finished shards rendered (folded in by `shard_done`);
# - `shard<k>:identities`, `shard<k>:images`: a shard still rendering (`set_progress`), removed
#   when it finishes; `get` adds them to `folded:*`.
# A shard's bit in `:shards_done_bits` says it finished: its progress is final, so a redelivered
# or stale delivery neither reports for it again nor counts it twice.

_SUM_SHARDS = _SUM_SHARDS_FN + KEEP_EXPIRY + """
local function seed_sums(key)
  if redis.call('HEXISTS', key, 'sum:identities') == 0 then
    local si, sm = sum_shards(key)
    redis.call('HSET', key, 'sum:identities', si, 'sum:images', sm)
  end
end
-- A job that started under the per-shard layout (a set of shard numbers): into bits and folds.
local function migrate(set, bits, progress)
  if redis.call('EXISTS', set) == 0 then return end
  seed_sums(progress)
  for _, m in ipairs(redis.call('SMEMBERS', set)) do
    local k = tonumber(m)
    if k then
      redis.call('SETBIT', bits, k, 1)
      local p = 'shard' .. m
      local got = redis.call('HMGET', progress, p .. ':identities', p .. ':images')
      redis.call('HINCRBY', progress, 'folded:identities', tonumber(got[1] or '0'))
      redis.call('HINCRBY', progress, 'folded:images', tonumber(got[2] or '0'))
      redis.call('HDEL', progress, p .. ':identities', p .. ':images')
    end
  end
  redis.call('DEL', set)
end
"""

# Set one part's progress (ARGV: part, identities, images, now, the shard number or '') and move the
# running sums `sum:identities`/`sum:images` by the change, so reads need not add up every shard.
# A finished shard's report is dropped (0): its folded progress is final.
_RECORD_PROGRESS = _SUM_SHARDS + """
migrate(KEYS[4], KEYS[3], KEYS[2])
if ARGV[5] ~= '' and redis.call('GETBIT', KEYS[3], tonumber(ARGV[5])) == 1 then return 0 end
local part, ids, imgs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
seed_sums(KEYS[2])
local old_ids = tonumber(redis.call('HGET', KEYS[2], part .. ':identities') or '0')
local old_imgs = tonumber(redis.call('HGET', KEYS[2], part .. ':images') or '0')
redis.call('HSET', KEYS[2], part .. ':identities', ids, part .. ':images', imgs)
if string.sub(part, 1, 5) == 'shard' then
  redis.call('HINCRBY', KEYS[2], 'sum:identities', ids - old_ids)
  redis.call('HINCRBY', KEYS[2], 'sum:images', imgs - old_imgs)
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
keep_expiry(KEYS[1], KEYS[2])
return 1
"""

# A shard finished (ARGV: shard, identities, images, now; identities '' = as last reported): set its
# bit; the first time, fold its final progress into `folded:*` (the sums move by the change) and
# drop its live fields. Returns how many distinct shards are done.
_SHARD_DONE = _SUM_SHARDS + """
migrate(KEYS[4], KEYS[3], KEYS[2])
local k = tonumber(ARGV[1])
if redis.call('SETBIT', KEYS[3], k, 1) == 0 then
  seed_sums(KEYS[2])
  local p = 'shard' .. ARGV[1]
  local got = redis.call('HMGET', KEYS[2], p .. ':identities', p .. ':images')
  local old_ids, old_imgs = tonumber(got[1] or '0'), tonumber(got[2] or '0')
  local ids, imgs = old_ids, old_imgs
  if ARGV[2] ~= '' then ids, imgs = tonumber(ARGV[2]), tonumber(ARGV[3]) end
  redis.call('HINCRBY', KEYS[2], 'sum:identities', ids - old_ids)
  redis.call('HINCRBY', KEYS[2], 'sum:images', imgs - old_imgs)
  redis.call('HINCRBY', KEYS[2], 'folded:identities', ids)
  redis.call('HINCRBY', KEYS[2], 'folded:images', imgs)
  redis.call('HDEL', KEYS[2], p .. ':identities', p .. ':images')
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
end
keep_expiry(KEYS[1], KEYS[2])
keep_expiry(KEYS[1], KEYS[3])
return redis.call('BITCOUNT', KEYS[3])
"""

# A job's hash and its shards' summed progress, or an empty reply when there is no such job: the
# running sums, else what the job kept when it ended (its progress hash may have expired), else
# the sum of the fields (a job from before the running sums).
_READ = _SUM_SHARDS_FN + """
local job = redis.call('HGETALL', KEYS[1])
if #job == 0 then return {} end
local sums = redis.call('HMGET', KEYS[2], 'sum:identities', 'sum:images')
if sums[1] then return {job, tonumber(sums[1]), tonumber(sums[2])} end
local kept = redis.call('HMGET', KEYS[1], 'identities_done', 'images_done')
if kept[1] then return {job, tonumber(kept[1]), tonumber(kept[2])} end
local ids, imgs = sum_shards(KEYS[2])
return {job, ids, imgs}
"""

# Append an event (KEYS: 1 the job, 2 `:events`, 3 `:events:folded`; ARGV: foldable '1'/'0', keep
# first, keep last, fold batch, maxlen, restarted tasks named, now, then the event's field pairs) and,
# when more than `keep last + fold batch` foldable events wait after the first `keep first`, fold
# the oldest of them (all but the last `keep last`) into the one `compacted` marker: XDEL them,
# add their counts to `:events:folded`, and replace the previous marker by a new one at the end
# of the stream. Cursors stay valid (an id deleted from a stream still orders the ones after it);
# a reader who had not seen the folded events sees the marker saying what they were.
_ADD_EVENT = KEEP_EXPIRY + """
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
local meta = KEYS[3]
if ARGV[1] == '1' then
  local first, last, batch = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local seen = redis.call('HINCRBY', meta, 'seen', 1)
  if seen == first then redis.call('HSET', meta, 'head_last', id) end
  local waiting = seen - first - tonumber(redis.call('HGET', meta, 'folded') or '0')
  if waiting > last + batch then
    local want = waiting - last
    local cursor = redis.call('HGET', meta, 'last') or redis.call('HGET', meta, 'head_last')
    local start = cursor and ('(' .. cursor) or '-'
    local ids, restarted = {}, {}
    local named = cjson.decode(redis.call('HGET', meta, 'restarted') or '[]')
    while #ids < want do
      local got = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', want - #ids + 16)
      if #got == 0 then break end
      for _, e in ipairs(got) do
        if #ids >= want then break end
        start = '(' .. e[1]
        local f = {}
        for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end
        if %(foldable)s and f['task'] and string.match(f['task'], '^.+:%%d+$') then
          ids[#ids + 1] = e[1]
          redis.call('HINCRBY', meta, 't:' .. f['type'], 1)
          if f['outcome'] then redis.call('HINCRBY', meta, 'o:' .. f['outcome'], 1) end
          if f['type'] == 'task_started' and tonumber(f['attempt'] or '1') > 1 then
            redis.call('HINCRBY', meta, 'restarts', 1)
            if #named < tonumber(ARGV[6]) then named[#named + 1] = f['task'] end
          end
        end
      end
    end
    if #ids > 0 then
      redis.call('XDEL', KEYS[2], unpack(ids))
      local folded = redis.call('HINCRBY', meta, 'folded', #ids)
      redis.call('HSETNX', meta, 'first', ids[1])
      redis.call('HSET', meta, 'last', ids[#ids])
      if #named > 0 then redis.call('HSET', meta, 'restarted', cjson.encode(named)) end
      local counts, outcomes = {}, {}
      local all = redis.call('HGETALL', meta)
      local n = 0
      for j = 1, #all, 2 do
        local kind, name = string.match(all[j], '^([to]):(.*)$')
        if kind == 't' then counts[name] = tonumber(all[j + 1]); n = n + 1 end
        if kind == 'o' then outcomes[name] = tonumber(all[j + 1]) end
      end
      local old = redis.call('HGET', meta, 'marker')
      if old then redis.call('XDEL', KEYS[2], old) end
      local marker = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'compacted',
        'at', ARGV[7], 'folded', folded,
        'first', redis.call('HGET', meta, 'first'), 'last', ids[#ids],
        'counts', n > 0 and cjson.encode(counts) or '{}',
        'outcomes', next(outcomes) and cjson.encode(outcomes) or '{}',
        'restarts', redis.call('HGET', meta, 'restarts') or '0',
        'restarted', redis.call('HGET', meta, 'restarted') or '[]',
        'kept', 'the first ' .. first .. ' and the last ' .. last .. ' per-shard task events')
      redis.call('HSET', meta, 'marker', marker)
    end
  end
end
keep_expiry(KEYS[1], KEYS[2])
if ARGV[1] == '1' then keep_expiry(KEYS[1], meta) end
return id
""" % {"foldable": " or ".join(f"f['type'] == '{t}'" for t in sorted(FOLDABLE_EVENTS))}

# Quotas (app.api.limits), checked in the same script as the creation: this prelude runs first, then
# _CREATE's text. Its own arguments are the last five of ARGV (owner, images, prefix, max concurrent
# jobs, max images per UTC day; 0 = no limit), so _CREATE's stay as they are. An Idempotency-Key
# that exists is a replay (or a 409/422): it is never refused and counts nothing.
_QUOTA_PRELUDE = """
local qn = #ARGV
local q_team = ARGV[qn - 2] .. 'team:' .. ARGV[qn - 4]
local q_images, q_conc, q_daymax = tonumber(ARGV[qn - 3]), tonumber(ARGV[qn - 1]), tonumber(ARGV[qn])
local q_now = tonumber(redis.call('TIME')[1])
local q_day = math.floor(q_now / 86400)
local q_daykey = q_team .. ':images:' .. q_day
local q_conc_now = redis.call('ZCARD', q_team .. ':status:queued')
  + redis.call('ZCARD', q_team .. ':status:running') + redis.call('ZCARD', q_team .. ':status:canceling')
local q_used = tonumber(redis.call('GET', q_daykey) or '0')
local q_usage = {q_conc_now, q_used, q_day, 86400 - q_now % 86400}
if KEYS[2] == '' or redis.call('EXISTS', KEYS[2]) == 0 then
  if q_conc > 0 and q_conc_now >= q_conc then return {'quota', 'concurrent_jobs', unpack(q_usage)} end
  if q_daymax > 0 and q_used + q_images > q_daymax then
    return {'quota', 'images_per_day', unpack(q_usage)}
  end
  redis.call('INCRBY', q_daykey, q_images)
  redis.call('EXPIRE', q_daykey, 2 * 86400)
end
"""

# A stage's queue clock (KEYS[1] the job; ARGV: stage, 'queued' or 'started'), Redis' time in
# seconds: the first mark of each kind counts. 'started' returns the wait since 'queued' (as a
# string; '' when the stage was never marked queued), or false when it had started already.
_STAGE_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local field = ARGV[2] .. '_ts:' .. ARGV[1]
if redis.call('HSETNX', KEYS[1], field, string.format('%.6f', now)) == 0 then return false end
if ARGV[2] ~= 'started' then return false end
local q = redis.call('HGET', KEYS[1], 'queued_ts:' .. ARGV[1])
if not q then return '' end
return string.format('%.6f', math.max(0, now - tonumber(q)))
"""

# KEYS[1] `:webhooks`, KEYS[2] the job.
_PUT_WEBHOOK = KEEP_EXPIRY + """
if redis.call('HSETNX', KEYS[1], 'once:' .. ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'msg:' .. ARGV[2], ARGV[3])
keep_expiry(KEYS[2], KEYS[1])
return 1
"""


def _uint64_pattern() -> str:
    """A regex (no anchors) for the decimal numbers 0 .. 2**64 - 1, written without leading zeros:
    exactly what Redis reads as one part of a stream id. ASCII digits only (Python's `\\d` and
    `int()` also take other scripts' digits, which Redis refuses)."""
    top = str(2**64 - 1)
    alts = ["0", f"[1-9][0-9]{{0,{len(top) - 2}}}"]  # 1 .. 19 digits
    for i, d in enumerate(top):  # 20 digits: equal to `top` up to i, then a smaller digit
        lo = 1 if i == 0 else 0
        if int(d) - 1 >= lo:
            rest = len(top) - i - 1
            digit = str(lo) if int(d) - 1 == lo else f"[{lo}-{int(d) - 1}]"
            alts.append(top[:i] + digit + ("[0-9]" if rest == 1 else f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(top)
    return "(?:" + "|".join(alts) + ")"


UINT64 = _uint64_pattern()
STREAM_ID_MAX = f"{2**64 - 1}-{2**64 - 1}"
# An event cursor: `-` (from the start) or a stream id `<ms>-<seq>`, each part below 2**64.
EVENT_CURSOR_PATTERN = rf"^(?:-|{UINT64}-{UINT64})$"
EVENT_CURSOR_MAX_LENGTH = len(STREAM_ID_MAX)
_EVENT_CURSOR = re.compile(EVENT_CURSOR_PATTERN)


def check_event_cursor(after: str) -> str:
    """`after` when it is an event cursor (`-`, or `<ms>-<seq>` with both parts below 2**64 and no
    leading zeros); ValueError otherwise, before it reaches Redis. Any well-formed id is a cursor,
    whether or not the stream holds it."""
    if not isinstance(after, str) or not _EVENT_CURSOR.fullmatch(after):
        raise ValueError(f"not an event cursor: {after!r} (expected '-' or '<ms>-<seq>', each a "
                         f"decimal number below 2**64)")
    return after


_last_us = 0


def new_job_id() -> str:
    """Sortable id: 14 hex digits of microseconds (strictly increasing within a process), then 8
    random hex digits."""
    global _last_us
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return f"j{_last_us:014x}{secrets.token_hex(4)}"


def metadata_index(owner: str, key: str, value: str) -> str:
    """The Redis key of the team's index of jobs whose `metadata[key]` is `value` (a sorted set of
    ids, like the other team indexes): hashed, so any key and value make a short Redis key."""
    import hashlib

    digest = hashlib.sha256(f"{key}\x00{value}".encode()).hexdigest()[:32]
    return P + f"team:{owner}:meta:{digest}"


def _extras(owner: str, spec: dict[str, Any], retention_s: float, dataset_hash: str | None) -> str:
    """The creation script's ARGV[11]: lifecycle fields of the job hash and the metadata indexes
    the job joins (strings only: Lua would print a large number in exponent form)."""
    fields: dict[str, str] = {}
    if retention_s:
        fields["retention_s"] = repr(float(retention_s))
    if dataset_hash:
        fields["dataset_hash"] = dataset_hash
    meta = spec.get("metadata") or {}
    return json.dumps({"fields": fields,
                       "index": [metadata_index(owner, k, v) for k, v in sorted(meta.items())]})


def id_time_iso(job_id: str) -> str:
    """The job's `created_at`: the time its id holds (microseconds, shown to the millisecond), so
    that `created_after=<its created_at>` finds the job; a second clock read after the id would come
    later than it, by more than a millisecond on a busy machine."""
    return iso_from_epoch(int(job_id[1:15], 16) / 1_000_000)


def id_bound(epoch_s: float) -> str:
    """The smallest job id made at or after `epoch_s` (ids start with the microsecond, in hex)."""
    return f"j{max(0, int(epoch_s * 1_000_000)):014x}"


@dataclass(frozen=True)
class Created:
    job_id: str
    created: bool  # False: an earlier request with the same Idempotency-Key made it
    body_hash: str | None = None  # the earlier request's body hash (when created is False)
    pending: bool = False  # the earlier request is still being processed


class JobStore:
    """`keys_ttl_s`: how long a job's records but its hash (JOB_KEY_SUFFIXES) are kept after it
    ends (IDFORGE_JOB_KEYS_TTL_S; 0 = for ever)."""

    def __init__(self, client: redis.Redis, *, keys_ttl_s: int = DEFAULT_KEYS_TTL_S) -> None:
        # redis-py's annotations do not model decode_responses=True (str, not bytes): Any here.
        self.r: Any = client
        self.keys_ttl_s = keys_ttl_s
        self._add_event = client.register_script(_ADD_EVENT)
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)
        self._shard_done = client.register_script(_SHARD_DONE)
        self._put_webhook = client.register_script(_PUT_WEBHOOK)
        self._create_quota = client.register_script(_QUOTA_PRELUDE + _CREATE)
        self._read = client.register_script(_READ)
        self._record_progress = client.register_script(_RECORD_PROGRESS)
        self._stage_mark = client.register_script(_STAGE_MARK)

    @classmethod
    def from_url(cls, url: str, *, keys_ttl_s: int = DEFAULT_KEYS_TTL_S) -> JobStore:
        return cls(connect(url), keys_ttl_s=keys_ttl_s)

    def ping(self) -> bool:
        with translate():
            return bool(self.r.ping())

    # ---- creation and reads -------------------------------------------------------------

    def create(self, owner: str, spec: dict[str, Any], spec_hash: str, *, identities: int,
               images: int, idempotency_key: str | None = None, body_hash: str | None = None,
               idempotency_ttl_s: int = 86400, retention_s: float = 0,
               dataset_hash: str | None = None) -> Created:
        job_id = new_job_id()
        idem = self._idem_key(owner, idempotency_key) if idempotency_key else ""
        with translate():
            kind, value = self._create(
                keys=[P + f"job:{job_id}", idem],
                args=[job_id, owner, json.dumps(spec, sort_keys=True), spec_hash,
                      body_hash or "", idempotency_ttl_s, id_time_iso(job_id), identities, images, P,
                      _extras(owner, spec, retention_s, dataset_hash)],
            )
        if kind == "created":
            return Created(job_id, True)
        prior = json.loads(value)
        return Created(prior["job"], False, prior["hash"], prior["state"] == "pending")

    def create_within_quota(self, owner: str, spec: dict[str, Any], spec_hash: str, *, identities: int,
                            images: int, max_concurrent: int, max_images_per_day: int,
                            idempotency_key: str | None = None, body_hash: str | None = None,
                            idempotency_ttl_s: int = 86400, retention_s: float = 0,
                            dataset_hash: str | None = None) -> tuple[Created | None, dict[str, Any]]:
        """`create`, unless the team's quotas refuse it, checked and counted in the same script:
        `max_concurrent` non-terminal jobs, `max_images_per_day` images submitted in the current UTC
        day (0 = no limit). Returns (Created, usage) or (None, usage) when refused, where usage has
        `refused` ('concurrent_jobs', 'images_per_day' or ''), `concurrent`, `images_today`,
        `day` (days since the epoch) and `seconds_left` (until 00:00 UTC): as the refusal saw them,
        or after the creation."""
        script = self._create_quota
        job_id = new_job_id()
        idem = self._idem_key(owner, idempotency_key) if idempotency_key else ""
        with translate():
            got = script(keys=[P + f"job:{job_id}", idem], args=[
                job_id, owner, json.dumps(spec, sort_keys=True), spec_hash, body_hash or "",
                idempotency_ttl_s, id_time_iso(job_id), identities, images, P,
                _extras(owner, spec, retention_s, dataset_hash),
                owner, images, P, max_concurrent, max_images_per_day])
        if got[0] == "quota":
            conc, used, day, left = (int(x) for x in got[2:6])
            return None, {"refused": got[1], "concurrent": conc, "images_today": used, "day": day,
                          "seconds_left": left}
        usage: dict[str, Any] = {**self.quota_usage(owner), "refused": ""}
        if got[0] == "created":
            return Created(job_id, True), usage
        prior = json.loads(got[1])
        return Created(prior["job"], False, prior["hash"], prior["state"] == "pending"), usage

    def quota_usage(self, owner: str) -> dict[str, int]:
        """The team's non-terminal jobs and today's (UTC) submitted images, by Redis' clock."""
        team = P + f"team:{owner}"
        with translate():
            now = int(self.r.time()[0])
            day = now // 86400
            pipe = self.r.pipeline(transaction=False)
            for s in ("queued", "running", "canceling"):
                pipe.zcard(f"{team}:status:{s}")
            pipe.get(f"{team}:images:{day}")
            *counts, used = pipe.execute()
        return {"concurrent": sum(counts), "images_today": int(used or 0), "day": day,
                "seconds_left": 86400 - now % 86400}

    def refund_images(self, owner: str, images: int, day: int) -> None:
        """Take back images counted by create_within_quota on `day` (a job that was not enqueued)."""
        with translate():
            self.r.decrby(P + f"team:{owner}:images:{day}", images)

    def confirm_idempotency(self, owner: str, key: str, job_id: str, body_hash: str) -> None:
        value = json.dumps({"hash": body_hash, "job": job_id, "state": "done"})
        with translate():
            self.r.set(self._idem_key(owner, key), value, keepttl=True)

    def forget_idempotency(self, owner: str, key: str) -> None:
        with translate():
            self.r.delete(self._idem_key(owner, key))

    @staticmethod
    def _idem_key(owner: str, key: str) -> str:
        import hashlib

        return P + f"idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record with decoded JSON fields and summed progress, or None."""
        with translate():
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(P + f"job:{job_id}")
            pipe.hgetall(P + f"job:{job_id}:progress")
            raw, progress = pipe.execute()
        if not raw:
            return None
        return _decode(raw, progress)

    def read(self, job_id: str) -> dict[str, Any] | None:
        """What `get` returns, in one round trip whose size does not grow with the job's shards:
        progress comes from the running sums that `set_progress` keeps (the status poll's read)."""
        with translate():
            got = self._read(keys=[job_key(job_id), job_key(job_id, ":progress")])
        if not got:
            return None
        flat, identities, images = got
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return _decode(raw, {"shards:identities": identities, "shards:images": images})

    def set_progress(self, job_id: str, part: str, *, identities: int, images: int) -> bool:
        """Progress of one part (a shard `shard<k>`, or sampling), and the job's running sums that
        `read` returns. Set, not added: a redelivered shard that starts again moves the sums back.
        A shard that `shard_done` recorded keeps its final progress: a late report of it is dropped
        (False)."""
        shard = part[5:] if part.startswith("shard") and part[5:].isdigit() else ""
        with translate():
            return bool(self._record_progress(keys=self._progress_keys(job_id),
                                              args=[part, identities, images, now_iso(), shard]))

    @staticmethod
    def _progress_keys(job_id: str) -> list[str]:
        return [job_key(job_id), job_key(job_id, ":progress"), job_key(job_id, ":shards_done_bits"),
                job_key(job_id, ":shards_done")]

    def status(self, job_id: str) -> str | None:
        with translate():
            status: str | None = self.r.hget(P + f"job:{job_id}", "status")
        return status

    def list_jobs(self, owner: str, *, status: str | None = None, limit: int = 20,
                  after: str | None = None, metadata: dict[str, str] | None = None,
                  created_after: float | None = None, created_before: float | None = None,
                  max_scan: int = LIST_MAX_SCAN) -> tuple[list[dict[str, Any]], str | None]:
        """The team's jobs, newest first; `after` is the `next` of the previous page. Filters:
        `status`, `metadata` (every key equal to its value), creation time in [created_after,
        created_before) (epoch seconds: job ids sort by creation time, so these are bounds on the
        index). The scan walks the narrowest index (a metadata index, else the status one) and
        checks the other filters per job; it looks at most `max_scan` jobs a page, so a page with
        few matches may be short, with `next` where the scan stopped."""
        metadata = metadata or {}
        indexes = [metadata_index(owner, k, v) for k, v in sorted(metadata.items())]
        if status:
            indexes.append(P + f"team:{owner}:status:{status}")
        with translate():
            if len(indexes) > 1:
                pipe = self.r.pipeline(transaction=False)
                for key in indexes:
                    pipe.zcard(key)
                sizes = pipe.execute()
                index = indexes[min(range(len(indexes)), key=lambda k: sizes[k])]
            else:
                index = indexes[0] if indexes else P + f"team:{owner}:jobs"
            lo = f"[{id_bound(created_after)}" if created_after is not None else "-"
            top = id_bound(created_before) if created_before is not None else None
            if after is not None and (top is None or after < top):
                top = after
            hi = f"({top}" if top is not None else "+"
            jobs: list[dict[str, Any]] = []
            scanned, last = 0, None
            while len(jobs) <= limit and scanned < max_scan:
                ids = self.r.zrevrangebylex(index, hi, lo, start=0, num=min(max_scan - scanned, 2 * limit + 2))
                if not ids:
                    return jobs[:limit], None
                pipe = self.r.pipeline(transaction=False)
                for i in ids:
                    pipe.hgetall(P + f"job:{i}")
                    pipe.hgetall(P + f"job:{i}:progress")
                rows = pipe.execute()
                for k, i in enumerate(ids):
                    scanned, last = scanned + 1, i
                    raw = rows[2 * k]
                    if raw and _matches(raw, status, metadata):
                        jobs.append(_decode(raw, rows[2 * k + 1]))
                        if len(jobs) > limit:
                            break
                hi = f"({last}"
        if len(jobs) > limit:
            return jobs[:limit], jobs[limit - 1]["id"]
        return jobs, last  # the scan budget ran out first: go on from where it stopped

    def count_by_status(self, owners: list[str]) -> dict[str, int]:
        """Jobs in each status, summed over the teams `owners` (the sizes of their status indexes,
        one round trip)."""
        with translate():
            pipe = self.r.pipeline(transaction=False)
            for owner in owners:
                for s in STATUSES:
                    pipe.zcard(P + f"team:{owner}:status:{s}")
            sizes = pipe.execute() if owners else []
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for k, n in enumerate(sizes):
            counts[STATUSES[k % len(STATUSES)]] += int(n)
        return counts

    # ---- transitions and progress -----------------------------------------------------

    def transition(self, job_id: str, to: Status, *, allowed: frozenset[str] | None = None,
                   **fields: Any) -> tuple[bool, str | None]:
        """Compare-and-set: move to `to` if the current status is in `allowed` (default: every
        legal predecessor). Returns (done, previous status)."""
        ended = str(max(0, self.keys_ttl_s) * 1000) if to in TERMINAL else ""
        args: list[Any] = [to, now_iso(), ",".join(allowed or TRANSITIONS[to]), P, ended]
        for k, v in fields.items():
            args += [k, v if isinstance(v, str) else json.dumps(v)]
        with translate():
            ok, prev = self._transition(
                keys=[job_key(job_id)] + [job_key(job_id, x) for x in JOB_KEY_SUFFIXES], args=args)
        return bool(ok), (prev or None)

    def request_cancel(self, job_id: str) -> str | None:
        """Queued jobs cancel at once; running ones go to `canceling` until a worker stops."""
        if self.transition(job_id, "canceled", allowed=frozenset({"queued"}))[0]:
            return "canceled"
        self.transition(job_id, "canceling", allowed=frozenset({"running"}))
        return self.status(job_id)

    def set_stage(self, job_id: str, stage: str) -> None:
        key = P + f"job:{job_id}"
        with translate():
            if self.r.hget(key, "stage") == stage:
                return
            pipe = self.r.pipeline()
            pipe.hset(key, mapping={"stage": stage, "updated_at": now_iso()})
            self._event(pipe, job_id, "stage", {"stage": stage})
            pipe.execute()

    def set_totals(self, job_id: str, **totals: int) -> None:
        with translate():
            self.r.hset(P + f"job:{job_id}", mapping={f"{k}": v for k, v in totals.items()})

    def set_priority(self, job_id: str, priority: str, requested: str | None, note: str | None) -> None:
        """The priority the job runs at, the one its spec asked for (None: the team's default), and
        why they differ."""
        fields = {"priority": priority, "priority_requested": requested or ""}
        if note:
            fields["priority_note"] = note
        with translate():
            self.r.hset(job_key(job_id), mapping=fields)

    def interactive_images(self, owner: str) -> int:
        """Images of the team's live (queued, running, canceling) interactive jobs."""
        team = P + f"team:{owner}"
        with translate():
            pipe = self.r.pipeline(transaction=False)
            for s in ("queued", "running", "canceling"):
                pipe.zrange(f"{team}:status:{s}", 0, -1)
            ids = [i for group in pipe.execute() for i in group]
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(job_key(i), "priority", "images_total")
            rows = pipe.execute() if ids else []
        return sum(int(n or 0) for p, n in rows if p == "interactive")

    def stage_queued(self, job_id: str, stage: str) -> None:
        """The stage's work was enqueued (or held): its queue wait starts (the first mark counts)."""
        with translate():
            self._stage_mark(keys=[job_key(job_id)], args=[stage, "queued"])

    def stage_started(self, job_id: str, stage: str) -> float | None:
        """A worker began the stage's first task: the seconds it waited since `stage_queued`, the
        first time only (None after, or when it was never queued)."""
        with translate():
            got = self._stage_mark(keys=[job_key(job_id)], args=[stage, "started"])
        return float(got) if got else None

    def set_stage_progress(self, job_id: str, done: int, total: int, unit: str) -> None:
        """Progress within the current stage (optimiser steps, gallery images...)."""
        with translate():
            self.r.hset(P + f"job:{job_id}", mapping={
                "stage_done": done, "stage_total": total, "stage_unit": unit,
                "updated_at": now_iso()})

    def add_event(self, job_id: str, type_: str, **data: Any) -> None:
        """Append an event to the job's log. A shard's task events (`foldable`) may later be folded
        into the log's `compacted` marker (module docstring)."""
        with translate():
            self._event(None, job_id, type_, data)

    def _event(self, client: Any, job_id: str, type_: str, data: dict[str, Any]) -> Any:
        at = now_iso()
        fields: dict[str, str] = {"type": type_, "at": at}
        fields.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()})
        return self._add_event(
            keys=[job_key(job_id), job_key(job_id, ":events"), job_key(job_id, ":events:folded")],
            args=["1" if foldable(type_, data) else "0", EVENTS_KEEP_FIRST, EVENTS_KEEP_LAST,
                  EVENTS_FOLD_BATCH, EVENTS_MAXLEN, MARKER_TASKS, at,
                  *(x for kv in fields.items() for x in kv)],
            client=client)

    def events(self, job_id: str, *, after: str = "-", limit: int = 1000,
               block_ms: int | None = None) -> list[dict[str, Any]]:
        """The job's events after the cursor `after` (exclusive; `-`: from the first), at most
        `limit`; with `block_ms`, wait that long for one when there is none yet. A malformed
        cursor is a ValueError (see `check_event_cursor`)."""
        check_event_cursor(after)
        key = P + f"job:{job_id}:events"
        if after == STREAM_ID_MAX and block_ms is None:
            return []  # nothing comes after the largest id (and Redis refuses `(max` as a start)
        with translate():
            if block_ms is not None:
                got = self.r.xread({key: after if after != "-" else "0-0"}, count=limit,
                                   block=block_ms)
                items = got[0][1] if got else []
            else:
                start = f"({after}" if after != "-" else "-"
                items = self.r.xrange(key, start, "+", count=limit)
        return [{"id": eid, **fields} for eid, fields in items]

    def shard_done(self, job_id: str, shard: int, *, identities: int | None = None,
                   images: int | None = None) -> int:
        """Record shard completion with its final progress (None: as it last reported), folded into
        the job's totals once however often it is recorded; returns how many distinct shards are
        done. Per shard this keeps one bit (`:shards_done_bits`)."""
        final = ["", ""] if identities is None else [identities, images if images is not None else 0]
        with translate():
            return int(self._shard_done(keys=self._progress_keys(job_id),
                                        args=[shard, *final, now_iso()]))

    # ---- webhook messages ------------------------------------------------------------------

    def put_webhook(self, job_id: str, once: str, msg_id: str, message: str) -> bool:
        """Store a webhook message unless one was already stored for `once` (an event name, or
        `stage:<stage>`); True when this call stored it. The message is re-read by id at each
        delivery attempt, so every attempt sends the same bytes."""
        with translate():
            return bool(self._put_webhook(keys=[job_key(job_id, ":webhooks"), job_key(job_id)],
                                          args=[once, msg_id, message]))

    def get_webhook(self, job_id: str, msg_id: str) -> str | None:
        with translate():
            message: str | None = self.r.hget(P + f"job:{job_id}:webhooks", f"msg:{msg_id}")
        return message

    # ---- model status published by workers ----------------------------------------------

    def publish_models(self, worker: str, statuses: dict[str, dict[str, Any]]) -> None:
        with translate():
            self.r.hset(P + "models", mapping={
                n: json.dumps({**s, "worker": worker, "at": now_iso()}) for n, s in statuses.items()
            })

    def model_statuses(self) -> dict[str, dict[str, Any]]:
        with translate():
            return {k: json.loads(v) for k, v in self.r.hgetall(P + "models").items()}


def _matches(raw: dict[str, str], status: str | None, metadata: dict[str, str]) -> bool:
    """Whether a job hash passes the list's status and metadata filters."""
    if status and raw.get("status") != status:
        return False
    if not metadata:
        return True
    have = json.loads(raw.get("spec") or "{}").get("metadata") or {}
    return all(have.get(k) == v for k, v in metadata.items())


_JSON_FIELDS = ("spec", "result", "error")
_INT_FIELDS = ("identities_total", "images_total", "shards_total")


def _decode(raw: dict[str, str], progress: dict[str, str]) -> dict[str, Any]:
    job: dict[str, Any] = dict(raw)
    kept = (job.pop("identities_done", None), job.pop("images_done", None))  # set when it ended
    for f in _JSON_FIELDS:
        if f in job:
            job[f] = json.loads(job[f])
    for f in _INT_FIELDS:
        if f in job:
            job[f] = int(job[f])
    done = {"identities": 0, "images": 0}
    for k, v in progress.items():  # finished shards' folded totals plus the live shards
        part, _, what = k.rpartition(":")
        if (part.startswith("shard") or part == "folded") and what in done:
            done[what] += int(v)
    if not progress and kept[0] is not None:  # the progress hash expired after the job ended
        done = {"identities": int(kept[0]), "images": int(kept[1] or 0)}
    stages: dict[str, dict[str, str]] = {}
    for k in [k for k in job if k.startswith(("queued_ts:", "started_ts:"))]:
        kind, _, stage = k.partition("_ts:")
        stages.setdefault(stage, {})[f"{kind}_at"] = iso_from_epoch(float(job.pop(k)))
    job["stages"] = stages
    if "retention_s" in job:
        job["retention_s"] = float(job["retention_s"])
    if "expires_at_ms" in job:
        job["expires_at"] = iso_from_epoch(int(job.pop("expires_at_ms")) / 1000)
    job["progress"] = {
        "identities_done": done["identities"],
        "identities_total": job.get("identities_total", 0),
        "images_done": done["images"],
        "images_total": job.get("images_total", 0),
        "stage": {"done": int(job.pop("stage_done", 0)), "total": int(job.pop("stage_total", 0)),
                  "unit": job.pop("stage_unit", None)},
    }
    return job
