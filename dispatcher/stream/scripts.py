"""The Lua scripts that make each step on the stream atomic.

Each runs atomically in Redis and, with AOF on, is persisted whole: a result is never
recorded without its id being marked done and its entry acknowledged, nor the reverse.
Every script is idempotent: a script whose reply was lost to a dropped connection can
be run again without recording or sending anything twice.
"""

#: ARGV: rows of (kind, key, mark_id, line, payload). kind J: a job (key: its id, in
#: the ids hash, with its line); I: an invalid line whose id is its own (the same, and
#: the id is marked done); L: an invalid line keyed by line number and digest (lines
#: set); S: a job whose every recipient is on the suppression list (its id is marked
#: done as suppressed, its row recorded, nothing to send). A row whose key is already
#: there adds nothing. An I row is also kept in the invalid stream (for ``requeue
#: --invalid``). Returns {added, rejected, already, suppressed}.
ENQUEUE = """
local added, rejected, already, suppressed = 0, 0, 0, 0
for i = 1, #ARGV, 5 do
  local kind, key, id, line, payload = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  local new
  if kind == 'L' then
    new = redis.call('SADD', KEYS[4], key)
  else
    new = redis.call('HSETNX', KEYS[3], key, line)
  end
  if new == 1 then
    if kind == 'J' then
      redis.call('XADD', KEYS[1], '*', 'id', id, 'line', line, 'job', payload)
      added = added + 1
    elseif kind == 'S' then
      redis.call('XADD', KEYS[2], '*', 'r', payload)
      redis.call('HSETNX', KEYS[5], id, 'suppressed')
      suppressed = suppressed + 1
    else
      local row = redis.call('XADD', KEYS[2], '*', 'r', payload)
      if id ~= '' then
        redis.call('HSETNX', KEYS[5], id, 'invalid')
        redis.call('XADD', KEYS[7], '*', 'id', id, 'line', line, 'job', '', 'row', row)
      end
      rejected = rejected + 1
    end
  else
    already = already + 1
  end
end
if added > 0 then redis.call('HINCRBY', KEYS[6], 'enqueued', added) end
if rejected > 0 then
  redis.call('HINCRBY', KEYS[6], 'rejected', rejected)
  redis.call('HINCRBY', KEYS[6], 'invalid', rejected)
end
if suppressed > 0 then redis.call('HINCRBY', KEYS[6], 'suppressed', suppressed) end
return {added, rejected, already, suppressed}
"""

#: Entries carry {id, line, job} and, once handed back, ``tries``: the deliveries that
#: counted before that entry was added. A delivery counts when it ended in a transient
#: failure or its worker died (the entry was claimed); handing an entry back unsent (a
#: signal, the relay down, a configuration error) does not count.

#: ARGV: group, consumer, max_deliveries, then rows of (kind, entry, id, status, payload).
#: F: finished — record the result unless the id is already done (an invalid job is also
#: kept in the invalid stream, for ``requeue --invalid``), then XACK and XDEL (status ''
#: acknowledges an id found done). D: deferred (a transient failure; payload:
#: why) — this delivery counts; at max_deliveries the job goes to the dead stream with
#: that reason, otherwise back to the end of the stream at once. R: released (never
#: sent) — back to the end of the stream, this delivery not counted. D and R act only on
#: an entry still this consumer's. With the group gone (the stream deleted, FLUSHALL),
#: results are still recorded: what was sent is never sent again. Returns the number
#: newly done.
SETTLE = """
local group, consumer, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
local finished = 0
for i = 4, #ARGV, 5 do
  local kind, entry, id, status, payload = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  if kind == 'F' then
    if status ~= '' and redis.call('HSETNX', KEYS[3], id, status) == 1 then
      local row = redis.call('XADD', KEYS[2], '*', 'r', payload)
      if status == 'invalid' then
        local e = redis.call('XRANGE', KEYS[1], entry, entry)
        local f = {}
        if e[1] then for j = 1, #e[1][2], 2 do f[e[1][2][j]] = e[1][2][j + 1] end end
        redis.call('XADD', KEYS[8], '*', 'id', id, 'line', f['line'] or '', 'job', f['job'] or '', 'row', row)
      end
      redis.call('HINCRBY', KEYS[4], status, 1)
      finished = finished + 1
    end
    redis.call('HDEL', KEYS[5], id)
    redis.pcall('XACK', KEYS[1], group, entry)
    redis.call('XDEL', KEYS[1], entry)
  else
    local p = redis.pcall('XPENDING', KEYS[1], group, entry, entry, 1)
    if p['err'] then p = {} end
    local e = redis.call('XRANGE', KEYS[1], entry, entry)
    if p[1] and p[1][2] == consumer and e[1] then
      local f = {}
      for j = 1, #e[1][2], 2 do f[e[1][2][j]] = e[1][2][j + 1] end
      local n = tonumber(f['tries'] or '0') + p[1][4]
      if kind == 'R' then n = n - 1 end
      if kind == 'D' then redis.call('HSET', KEYS[5], id, payload) end
      if kind == 'D' and n >= max then
        redis.call('XADD', KEYS[7], '*', 'id', id, 'line', f['line'] or '', 'job', f['job'] or '',
                   'reason', payload, 'deliveries', n)
        redis.call('HDEL', KEYS[5], id)
        redis.call('HINCRBY', KEYS[4], 'dead', 1)
      else
        redis.call('XADD', KEYS[1], '*', 'id', id, 'line', f['line'] or '', 'job', f['job'] or '', 'tries', n)
      end
      redis.call('XACK', KEYS[1], group, entry)
      redis.call('XDEL', KEYS[1], entry)
    end
  end
end
if finished > 0 then
  local key = KEYS[6] .. ':' .. redis.call('TIME')[1]
  redis.call('INCRBY', key, finished)
  redis.call('EXPIRE', key, 120)
end
return finished
"""

#: ARGV: source ('dead' or 'invalid'), then entry ids of that stream. Each goes back on
#: the jobs stream for another try (not counting its earlier deliveries) and leaves its
#: source; an invalid one loses its done mark and its results row (the next result
#: replaces it). A job invalid at enqueue has no body to put back: its id is forgotten,
#: so that enqueuing the fixed file adds it again. Returns {requeued, forgotten}.
REQUEUE = """
local requeued, forgotten = 0, 0
for i = 2, #ARGV do
  local e = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if e[1] then
    local f = {}
    for j = 1, #e[1][2], 2 do f[e[1][2][j]] = e[1][2][j + 1] end
    local id = f['id'] or ''
    if ARGV[1] == 'invalid' then
      if redis.call('HDEL', KEYS[3], id) == 1 then redis.call('HINCRBY', KEYS[4], 'invalid', -1) end
      if f['row'] then redis.call('XDEL', KEYS[6], f['row']) end
    else
      redis.call('HINCRBY', KEYS[4], 'dead', -1)
    end
    redis.call('HDEL', KEYS[5], id)
    if f['job'] and f['job'] ~= '' then
      redis.call('XADD', KEYS[1], '*', 'id', id, 'line', f['line'] or '', 'job', f['job'])
      requeued = requeued + 1
    else
      redis.call('HDEL', KEYS[7], id)
      redis.call('HINCRBY', KEYS[4], 'rejected', -1)
      forgotten = forgotten + 1
    end
    redis.call('XDEL', KEYS[2], ARGV[i])
  end
end
return {requeued, forgotten}
"""

#: ARGV: group, consumer, mode, min_idle_ms, count, max_deliveries, start.
#: mode 'own': this consumer's pending entries after ``start`` (a restarted worker takes
#: them back); 'idle': XAUTOCLAIM of anyone's entries idle longer than min_idle_ms.
#: An entry whose deliveries (its tries plus this one) pass max_deliveries goes to the
#: dead stream with its last error, and is acknowledged. Returns {next start ('' when
#: done), {{entry id, fields, deliveries}, ...}}.
TAKE = """
local stream, group, consumer, mode = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local count, max = tonumber(ARGV[5]), tonumber(ARGV[6])
local claimed, out, nextid = {}, {}, ''
if mode == 'own' then
  local pending = redis.call('XPENDING', stream, group, ARGV[7], '+', count, consumer)
  for _, p in ipairs(pending) do
    local got = redis.call('XCLAIM', stream, group, consumer, 0, p[1])
    if got[1] then
      claimed[#claimed + 1] = {got[1], p[4] + 1}
    else
      redis.call('XACK', stream, group, p[1])
    end
    nextid = '(' .. p[1]
  end
  if #pending < count then nextid = '' end
else
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[4], ARGV[7], 'COUNT', count)
  nextid = r[1]
  if nextid == '0-0' then nextid = '' end
  for _, entry in ipairs(r[2]) do
    local p = redis.call('XPENDING', stream, group, entry[1], entry[1], 1)
    claimed[#claimed + 1] = {entry, p[1][4]}
  end
end
for _, c in ipairs(claimed) do
  local entry = c[1]
  local f = {}
  for j = 1, #entry[2], 2 do f[entry[2][j]] = entry[2][j + 1] end
  local n = tonumber(f['tries'] or '0') + c[2]
  if n > max then
    local id = f['id'] or ''
    local reason = redis.call('HGET', KEYS[3], id)
    if not reason then
      reason = 'delivered ' .. (n - 1) .. ' times without a result (its worker stopped or died while sending it)'
    end
    redis.call('XADD', KEYS[2], '*', 'id', id, 'line', f['line'] or '', 'job', f['job'] or '',
               'reason', reason, 'deliveries', n - 1)
    redis.call('XACK', stream, group, entry[1])
    redis.call('XDEL', stream, entry[1])
    redis.call('HDEL', KEYS[3], id)
    redis.call('HINCRBY', KEYS[4], 'dead', 1)
  else
    out[#out + 1] = {entry[1], entry[2], n}
  end
end
return {nextid, out}
"""

#: ARGV: group, consumer, entry ids. Resets the idle time of the entries this consumer
#: still owns (XCLAIM JUSTID does not count a delivery), so that no other worker claims
#: what a live worker is still sending. Returns the ids it no longer owns.
TOUCH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

#: ARGV: group, consumer, entry id, job id. Right before a job goes on the wire after its
#: worker's lease lapsed (a pause): is the entry still this consumer's, and its id not
#: done? Then reset its idle time (the lease starts again). Returns 1 (go on), 0 (another
#: worker claimed it: leave it alone), 2 (its id is done: acknowledge it unsent).
CONFIRM = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not (p[1] and p[1][2] == ARGV[2]) then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[4]) == 1 then return 2 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

#: ARGV: token, ttl_ms. Take or keep a worker's name: the key is free, expired or ours
#: (then it is set to expire in ttl_ms, and '' is returned), or another live worker
#: holds it (its token is returned).
NAME = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ''
end
return holder
"""

#: ARGV: token. A worker leaving gives its name back (if it still holds it).
UNNAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: ARGV: group, consumer (kept), idle_ms. Forgets consumers with nothing pending that
#: have not read for idle_ms (workers that exited or died), so status stays readable.
PRUNE = """
local removed = 0
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local f = {}
  for j = 1, #c, 2 do f[c[j]] = c[j + 1] end
  if f['name'] ~= ARGV[2] and f['pending'] == 0 and f['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
"""

#: ARGV: group, consumer. A worker leaving with nothing pending removes its consumer.
FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""

#: GCRA (virtual scheduling, burst of one): reserve the next slot ARGV[1] microseconds
#: after the previous one, never before now; return how many microseconds to wait for
#: it. Times come from Redis's clock, so workers' clocks do not matter.
RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(tat, now)
local nexttat = start + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', nexttat), 'PX', math.floor((nexttat - now) / 1000) + 1000)
return start - now
"""
