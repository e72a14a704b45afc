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
    if amount ~= 'released' then redis.call('DECRBY', KEYS[2], amount) end
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
# An empty id only purges and reports. An id already there: nothing changes (1 for a hold,
# 0 for a tombstone; no caller waits for the answer of a reserve that was released).
RESERVE = (
    _PURGE
    + """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
local amount = tonumber(ARGV[2])
if ARGV[3] == '' then return {0, spent, held} end
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
# KEYS: spent, held, holds, amounts, guard hash[, record, record index]
# ARGV: hold id ('' for none), cost, guard field, spent ttl s (0: none), guard ttl s (0: none),
#       prompt tokens, completion tokens, time, time ms, usage id, customer, record ttl s
SETTLE = (
    "if ARGV[1] ~= '' then\n"
    + _RELEASE
    + """end
local fresh = redis.call('HSETNX', KEYS[5], ARGV[3], '1')
local spent
if fresh == 1 then
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
