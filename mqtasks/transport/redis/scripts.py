"""Lua scripts of the reliable Redis transport: each runs atomically in Redis.

Key layout and element format are described in :mod:`mqtasks.transport.redis`.
Scripts touch keys derived from their arguments (processing lists of other
consumers, a queue's priority lists), which is fine on a single Redis and on a
cluster as long as every key shares the transport's hash tag.
"""

from __future__ import annotations

__all__ = ["BEAT", "DELAY", "EMIT", "PROMOTE", "PUBLISH", "RESTORE", "SETTLE_FETCH", "TOPIC"]

# Priority levels, for the scripts that route a message to its level. A queue's
# own list (its "base" key) holds level 0; level k (1 to 9) is ``base .. '#' .. k``
# ('#' cannot appear in a queue name). Consumers block in BLMOVE on the base list
# only, so whenever a level list holds a message the base list must not be empty:
# wake() keeps it so by moving the next message of the highest level into an
# empty base list (where it is the only message, first in line), and
# normalize() moves such a message back to the head of its level before a fetch
# compares the levels or a message is put back at the head of the base list.
# So the base list holds at most one message of a higher level, at its
# consumption end.
_LEVELS = """
local function level(m)
  -- The encoder writes the priority ("p") last in the metadata line, or after it
  -- the level ("l") when the queue's max_priority lowered it; 0 when neither is there.
  local nl = string.find(m, '\\n', 1, true)
  if not nl then return 0 end
  local tail = string.sub(m, math.max(1, nl - 12), nl - 1)
  local p = tonumber(string.match(tail, '"[lp]":(%d+)}$'))
  if not p then return 0 end
  return math.min(p, 9)
end
local function any_level(base)
  return redis.call('EXISTS', base .. '#1', base .. '#2', base .. '#3', base .. '#4',
    base .. '#5', base .. '#6', base .. '#7', base .. '#8', base .. '#9') > 0
end
local function wake(base)
  if redis.call('EXISTS', base) == 1 or not any_level(base) then return end
  for k = 9, 1, -1 do
    if redis.call('LMOVE', base .. '#' .. k, base, 'RIGHT', 'RIGHT') then return end
  end
end
local function normalize(base)
  local m = redis.call('LINDEX', base, -1)
  if m then
    local k = level(m)
    if k > 0 then redis.call('LMOVE', base, base .. '#' .. k, 'RIGHT', 'RIGHT') end
  end
end
local function push_back(base, m)
  -- Back to the head of the line of its level (a requeue, a restore).
  local k = level(m)
  if k == 0 then
    normalize(base)
    redis.call('RPUSH', base, m)
  else
    redis.call('RPUSH', base .. '#' .. k, m)
    wake(base)
  end
end
local function take(base, proc)
  -- The next message: the highest level first, the oldest first within a level.
  for k = 9, 1, -1 do
    local m = redis.call('LMOVE', base .. '#' .. k, proc, 'RIGHT', 'LEFT')
    if m then return m end
  end
  return redis.call('LMOVE', base, proc, 'RIGHT', 'LEFT')
end
"""

# Settle what the consumer collected, then move up to n messages into processing
# lists. A queue with no message at a priority level takes the plain path: LMOVE
# from its own list, as if priorities did not exist.
# KEYS: s (source, processing) pairs, then k settlement processing keys, then k source keys.
# ARGV: n, s, k, then k actions (a ack, x reject, q requeue, u undo), then k elements.
SETTLE_FETCH = (
    _LEVELS
    + """
local n, s, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, k do
  local m = ARGV[3 + k + i]
  if redis.call('LREM', KEYS[2 * s + i], 1, m) == 1 then
    local action = ARGV[3 + i]
    if action == 'q' then
      push_back(KEYS[2 * s + k + i], 'r' .. string.sub(m, 2))
    elseif action == 'u' then
      push_back(KEYS[2 * s + k + i], m)
    end
  end
end
local out, got = {}, 0
for j = 1, s do
  local base, proc = KEYS[2 * j - 1], KEYS[2 * j]
  local levels = got < n and any_level(base)
  if levels then normalize(base) end
  while got < n do
    local m
    if levels then
      m = take(base, proc)
    else
      m = redis.call('LMOVE', base, proc, 'RIGHT', 'LEFT')
    end
    if not m then break end
    got = got + 1
    out[#out + 1] = j - 1
    out[#out + 1] = m
  end
  if levels then wake(base) end
end
return out
"""
)

# Refresh a consumer's liveness key and registration. With ARGV[4] == '1' (a
# reconnect), refuse to re-register a consumer that a sweep already restored.
# KEYS: registry, alive key. ARGV: consumer id, ttl ms, sources JSON, strict.
BEAT = """
local existed = redis.call('HEXISTS', KEYS[1], ARGV[1])
if existed == 0 and ARGV[4] == '1' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return existed
"""

# Move in-flight messages back to the consumption end of their queues (of their
# priority level), marked redelivered with their count of unsettled deliveries
# (the digits after the flag byte) raised by one, oldest first in line. With ARGV[2] set: release that consumer
# (a graceful close; ARGV[3] == '1' also forgets it). Otherwise: every
# registered consumer whose liveness key expired. Returns moved, then ids.
# KEYS: registry. ARGV: prefix, consumer id or '', forget.
RESTORE = (
    _LEVELS
    + """
local prefix = ARGV[1]
local function returned(m)
  local digits = string.match(m, '^%d*', 2)
  return 'r' .. ((tonumber(digits) or 0) + 1) .. string.sub(m, 2 + #digits)
end
local function restore(cid, sources)
  local moved = 0
  for i, src in ipairs(cjson.decode(sources)) do
    local proc = prefix .. ':proc:' .. cid .. ':' .. (i - 1)
    while true do
      local m = redis.call('LPOP', proc)
      if not m then break end
      push_back(src, returned(m))
      moved = moved + 1
    end
  end
  return moved
end
local out = {0}
if ARGV[2] ~= '' then
  local sources = redis.call('HGET', KEYS[1], ARGV[2])
  if sources then out[1] = restore(ARGV[2], sources) end
  redis.call('DEL', prefix .. ':alive:' .. ARGV[2])
  if ARGV[3] == '1' then redis.call('HDEL', KEYS[1], ARGV[2]) end
  return out
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if redis.call('EXISTS', prefix .. ':alive:' .. all[i]) == 0 then
    out[1] = out[1] + restore(all[i], all[i + 1])
    redis.call('HDEL', KEYS[1], all[i])
    out[#out + 1] = all[i]
  end
end
return out
"""
)

# Hold an element for a delay: add it to the queue's delayed set, scored by its
# due time in milliseconds on Redis' own clock (so publishers' clocks do not
# matter). NX: the same element published again (a retry after a lost reply)
# keeps its first due time and is stored once. Returns 1 if added, 0 if present.
# KEYS: delayed set. ARGV: delay in ms, element.
DELAY = """
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 + tonumber(ARGV[1])
return redis.call('ZADD', KEYS[1], 'NX', due, ARGV[2])
"""

# Move due elements of each delayed set to the tail of its ready list of their
# priority level (LPUSH: consumers take from the right, so the earliest due is
# taken first and after what was already ready), up to ARGV[1] per set. One
# script: a consumer dying mid-move loses nothing, and of several consumers
# running it the first moves each element, the others find nothing. It also
# wakes each queue (see LEVELS): a consumer that took the one message of a base
# list in BLMOVE leaves a blocked one waiting for the next level's message until
# this runs. Returns {moved, ms until the earliest element still held is due
# (0: more are due now; -1: none held)}.
# KEYS: q delayed sets, then their q ready lists. ARGV: most elements moved per set.
PROMOTE = (
    _LEVELS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local q, limit = #KEYS / 2, tonumber(ARGV[1])
local moved, wait = 0, -1
for i = 1, q do
  local base = KEYS[q + i]
  local due = redis.call('ZRANGE', KEYS[i], '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
  if #due > 0 then
    redis.call('ZREM', KEYS[i], unpack(due))
    local plain = {}
    for _, m in ipairs(due) do
      local k = level(m)
      if k == 0 then
        plain[#plain + 1] = m
      else
        redis.call('LPUSH', base .. '#' .. k, m)
      end
    end
    if #plain > 0 then redis.call('LPUSH', base, unpack(plain)) end
    moved = moved + #due
  end
  wake(base)
  local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if head[2] then
    local w = math.max(0, math.ceil(tonumber(head[2]) - now))
    if wait < 0 or w < wait then wait = w end
  end
end
return {moved, wait}
"""
)

# Publish a message of priority level 1 to 9: to the tail of its level's list,
# then wake the queue (see LEVELS), so that a consumer blocked on the queue's
# own list gets it at once. Level 0 is a plain LPUSH to the queue's own list.
# KEYS: the queue's own list, the list of the message's level. ARGV: element.
PUBLISH = (
    _LEVELS
    + """
redis.call('LPUSH', KEYS[2], ARGV[1])
wake(KEYS[1])
"""
)

# AMQP topic matching, as mqtasks.transport.topic.topic_matches does it (and
# tested against it): words split on '.', a key "" has none; in a pattern '*' is
# exactly one word and '#' zero or more. matches() walks the pattern's states
# over the key's words (the states reached so far, '#' letting a state pass
# without a word), so no pattern backtracks.
TOPIC = """
local function words(s)
  local out = {}
  if s == '' then return out end
  local start = 1
  while true do
    local dot = string.find(s, '.', start, true)
    if not dot then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, dot - 1)
    start = dot + 1
  end
end
local function closure(states, p)
  for i = 1, #p do
    if states[i] and p[i] == '#' then states[i + 1] = true end
  end
  return states
end
local function matches(p, k)
  local size = #p
  local states = closure({[1] = true}, p)
  for j = 1, #k do
    local following, any = {}, false
    for i = 1, size do
      if states[i] then
        local w = p[i]
        if w == '#' then
          following[i] = true
          any = true
        elseif w == '*' or w == k[j] then
          following[i + 1] = true
          any = true
        end
      end
    end
    if not any then return false end
    states = closure(following, p)
  end
  return states[size + 1] == true
end
"""

# Emit to a topic exchange: read its bindings (a hash, field "<queue> <pattern>",
# value the queue's max_priority or '', followed by ';live' for a queue declared
# with expires), match the routing key and LPUSH the
# element into each matching queue once, at its priority level as a publish
# would (capped at the queue's max_priority, written into the element as its
# level "l"), then wake the queues of levels above 0 (see LEVELS). All or none:
# a push Redis refuses (a key of another type, out of memory) undoes the pushes
# before it (LPOP of each: nothing else runs meanwhile) and fails the call.
# A ';live' queue whose liveness key (prefix .. queue) has expired (its worker
# is gone) gets nothing: its bindings are removed, its lists and delayed set deleted.
# Returns how many queues got it.
# KEYS: the bindings hash. ARGV: routing key, the message's level (0 to 9),
# element (no "l"), prefix of queue keys, prefix of queue liveness keys, prefix
# of delayed sets.
EMIT = (
    _LEVELS
    + TOPIC
    + """
local key, base_level, element, qprefix = words(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local lprefix, dprefix = ARGV[5], ARGV[6]
local all = redis.call('HGETALL', KEYS[1])
local seen, targets, stale = {}, {}, {}
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local sp = string.find(field, ' ', 1, true)
  if sp then
    local queue = string.sub(field, 1, sp - 1)
    local semi = string.find(value, ';', 1, true)
    if semi then
      if stale[queue] == nil then
        stale[queue] = redis.call('EXISTS', lprefix .. queue) == 0
      end
      if stale[queue] then
        redis.call('HDEL', KEYS[1], field)
      end
      value = string.sub(value, 1, semi - 1)
    end
    if not stale[queue] and not seen[queue] and matches(words(string.sub(field, sp + 1)), key) then
      seen[queue] = true
      targets[#targets + 1] = {queue, tonumber(value)}
    end
  end
end
for queue, gone in pairs(stale) do
  if gone then
    local base = qprefix .. queue
    redis.call('DEL', base, base .. '#1', base .. '#2', base .. '#3', base .. '#4',
      base .. '#5', base .. '#6', base .. '#7', base .. '#8', base .. '#9', dprefix .. queue)
  end
end
local pushed, woken = {}, {}
for _, t in ipairs(targets) do
  local base, lvl, m = qprefix .. t[1], base_level, element
  if t[2] and lvl > t[2] then
    lvl = t[2]
    local nl = string.find(element, '\\n', 1, true)
    m = string.sub(element, 1, nl - 2) .. ',"l":' .. lvl .. string.sub(element, nl - 1)
  end
  local target = base
  if lvl > 0 then target = base .. '#' .. lvl end
  local reply = redis.pcall('LPUSH', target, m)
  if type(reply) == 'table' and reply.err then
    for _, done in ipairs(pushed) do redis.call('LPOP', done) end
    return redis.error_reply('queue ' .. t[1] .. ': ' .. tostring(reply.err))
  end
  pushed[#pushed + 1] = target
  if lvl > 0 then woken[#woken + 1] = base end
end
for _, base in ipairs(woken) do pcall(wake, base) end
return #pushed
"""
)
