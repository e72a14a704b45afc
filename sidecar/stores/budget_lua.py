"""The Lua scripts of the redis budget store: each runs atomically on one Cluster slot.

Money is integer nano-USD; Lua's numbers are doubles, exact to 2**53 (about $9 million).
Hold expiry uses the server's clock (`TIME`), so sidecars with skewed clocks agree.

A reserve whose reply was lost (a timeout, a connection cut) may still run later: the server
was frozen with it in its socket buffers, or a retry sent it twice. Its release (journaled,
replayed when redis answers) therefore leaves a tombstone: the hold id with the amount
`released`, expiring like a hold. RESERVE does nothing for an id it already has, a hold (a
second copy of the same reserve) or a tombstone (a reserve that arrives after its release).
"""

_PURGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(expired) do
  local amount = redis.call('HGET', KEYS[4], id)
  if amount then
    if amount ~= 'released' then
      redis.call('DECRBY', KEYS[2], amount)
      if string.byte(id, 1) == 76 then redis.call('HINCRBY', KEYS[4], '~leased', -amount) end
    end
    redis.call('HDEL', KEYS[4], id)
  end
  redis.call('ZREM', KEYS[3], id)
end
"""
_RELEASE = """
local amount = redis.call('HGET', KEYS[4], ARGV[1])
if amount and amount ~= 'released' then
  redis.call('DECRBY', KEYS[2], amount)
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
"""
# KEYS: spent, held, holds (zset id → expiry ms), hold amounts. ARGV: limit, amount, id, ttl ms.
# An empty id only purges and reports, with a fourth number: the part of held that is leases.
# An id already there: nothing changes (1 for a hold, 0 for a tombstone; no caller waits for
# the answer of a reserve that was released).
RESERVE = (
    _PURGE
    + """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
local amount = tonumber(ARGV[2])
if ARGV[3] == '' then
  return {0, spent, held, tonumber(redis.call('HGET', KEYS[4], '~leased') or '0')}
end
local had = redis.call('HGET', KEYS[4], ARGV[3])
if had then return {had == 'released' and 0 or 1, spent, held} end
if spent + held + amount > tonumber(ARGV[1]) then return {0, spent, held} end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
redis.call('HSET', KEYS[4], ARGV[3], amount)
held = redis.call('INCRBY', KEYS[2], amount)
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return {1, spent, held}
"""
)
# KEYS: spent, held, holds, amounts. ARGV: hold id[, tombstone ttl ms]. With a ttl (a journaled
# release: its reserve may not have run yet) the id stays as a tombstone for that long; the
# keys live at least as long, never shorter than before (held too, which the purge of any
# hold in them subtracts from).
RELEASE = (
    _RELEASE
    + """
if ARGV[2] then
  local ttl = tonumber(ARGV[2])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], 'released')
  for i = 2, 4 do
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
"""
)
_SETTLED = """
local fresh = redis.call('HSETNX', KEYS[5], ARGV[3], '1')
local spent
if fresh == 1 then
  LEASE_TAKE
  spent = redis.call('INCRBY', KEYS[1], ARGV[2])
  if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
  if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[5], ARGV[5]) end
  if #KEYS >= 7 then
    redis.call('HSETNX', KEYS[6], 'time', ARGV[8])
    redis.call('HSETNX', KEYS[6], 'customer', ARGV[11])
    redis.call('HINCRBY', KEYS[6], 'cost', ARGV[2])
    redis.call('HINCRBY', KEYS[6], 'prompt_tokens', ARGV[6])
    redis.call('HINCRBY', KEYS[6], 'completion_tokens', ARGV[7])
    redis.call('EXPIRE', KEYS[6], ARGV[12])
    redis.call('ZADD', KEYS[7], 'NX', ARGV[9], ARGV[10])
  end
else
  spent = tonumber(redis.call('GET', KEYS[1]) or '0')
end
return {fresh, spent, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
# KEYS: spent, held, holds, amounts, guard hash[, record, record index]
# ARGV: hold id ('' for none), cost, guard field, spent ttl s (0: none), guard ttl s (0: none),
#       prompt tokens, completion tokens, time, time ms, usage id, customer, record ttl s
SETTLE = "if ARGV[1] ~= '' then\n" + _RELEASE + "end\n" + _SETTLED.replace("LEASE_TAKE", "")
# The settle of a request admitted on a lease (ARGV[1] the lease id, ARGV[13] what to take off
# the lease's hold: the cost, at most the request's own worst case): spent, the record and the
# lease's hold move together, once (the guard), so spent + held never drops below what is
# committed. A lease that is gone (expired, returned) has nothing to take: spent still grows.
LEASE_SETTLE = _SETTLED.replace(
    "LEASE_TAKE",
    """local had = redis.call('HGET', KEYS[4], ARGV[1])
  if had and had ~= 'released' then
    local take = math.min(tonumber(ARGV[13]), tonumber(had))
    if take > 0 then
      redis.call('HINCRBY', KEYS[4], ARGV[1], -take)
      redis.call('HINCRBY', KEYS[4], '~leased', -take)
      redis.call('DECRBY', KEYS[2], take)
    end
  end""",
)
_KEEP = """
local function keep(ttl)
  for i = 2, 4 do
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
"""
# A process's lease on a scope (ids start with 'L': the purge keeps '~leased', the sum of live
# leases in the amounts hash, in step). KEYS: spent, held, holds, amounts.
# ARGV: limit, want, least, share divisor, lease id, ttl ms, trim, new ('1': the lease may be
# created; else it must be live to grow).
# First `trim` comes off the lease (room the process gives back); then the lease grows by
# min(want, free / share), free = limit - spent - held, when that is at least `least` (else
# not at all: the caller holds per request). A live lease's expiry is renewed whatever else
# happens. Returns {grant, spent, held, live}: live 1 when the lease is there after the call.
LEASE = (
    _PURGE
    + _KEEP
    + """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local id, ttl = ARGV[5], tonumber(ARGV[6])
local had = redis.call('HGET', KEYS[4], id)
local live = had and had ~= 'released'
local trim = tonumber(ARGV[7])
if live and trim > 0 then
  local cut = math.min(trim, tonumber(had))
  redis.call('HINCRBY', KEYS[4], id, -cut)
  redis.call('HINCRBY', KEYS[4], '~leased', -cut)
  redis.call('DECRBY', KEYS[2], cut)
end
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
local free = tonumber(ARGV[1]) - spent - held
local grant = math.min(tonumber(ARGV[2]), math.floor(free / tonumber(ARGV[4])))
if grant > 0 and grant >= tonumber(ARGV[3]) and (live or (not had and ARGV[8] == '1')) then
  redis.call('HINCRBY', KEYS[4], id, grant)
  redis.call('HINCRBY', KEYS[4], '~leased', grant)
  held = redis.call('INCRBY', KEYS[2], grant)
  redis.call('ZADD', KEYS[3], now + ttl, id)
  keep(ttl)
  return {grant, spent, held, 1}
end
if live then
  redis.call('ZADD', KEYS[3], now + ttl, id)
  keep(ttl)
end
return {0, spent, held, live and 1 or 0}
"""
)
# A lease given back (idle, closing, or after a failed connection: its state unknown): its
# hold leaves held, and its id stays as a tombstone for `ttl` ms so a late copy of a LEASE
# that grows it finds it gone. KEYS: spent, held, holds, amounts. ARGV: lease id, ttl ms.
LEASE_RETURN = (
    _KEEP
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local had = redis.call('HGET', KEYS[4], ARGV[1])
if had and had ~= 'released' then
  redis.call('DECRBY', KEYS[2], had)
  redis.call('HINCRBY', KEYS[4], '~leased', -tonumber(had))
end
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], 'released')
keep(ttl)
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
)
# KEYS: record, index. ARGV: guard field, usage id, time ms, record ttl s, cost, prompt,
#       completion, drop-before ms, then field/value pairs.
FINISH = """
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'cost', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'prompt_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'completion_tokens', ARGV[7])
if #ARGV > 8 then redis.call('HSET', KEYS[1], unpack(ARGV, 9)) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8])
return 1
"""
INDEX = "return redis.call('SADD', KEYS[1], ARGV[1])"
