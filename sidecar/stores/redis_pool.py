"""The one redis connection pool of a sidecar, shared by its three redis stores (idempotency,
budgets and usage, rate limits): one set of connections to watch in `CLIENT LIST` (each named
`ringside`), one place for the timeouts, one `close()`.

Its settings are the ones every store can live with: a connect or a reply that takes longer
than the timeouts below is an outage (outage.py), and a pooled connection gone stale (redis
restarted, an idle timeout) is tried once more at once, on a new connection. Replies are bytes:
each store decodes what it reads. The pool holds at most `storage.redis_max_connections`: a burst
of requests waits for a free connection (up to the reply timeout, then it is an outage) rather
than opening one connection per request in flight, which a fleet of sidecars would multiply
into redis's `maxclients`. The rate limiter waits less than this (see ratelimit_redis:
it bounds its own calls, on these same connections).
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 2.0
CLIENT_NAME = "ringside"


def redis_pool(url: str, max_connections: int) -> ConnectionPool:
    """A pool of `url`; connections are made when first used, so a sidecar starts while
    redis is down. Close it with `await pool.aclose()`."""
    return BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=COMMAND_TIMEOUT,  # waiting for a free connection: as long as for a reply
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=COMMAND_TIMEOUT,
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
        client_name=CLIENT_NAME,
    )


def redis_client(url: str, max_connections: int) -> Redis:
    """A client of its own pool (closed with the client): for a store opened alone."""
    return Redis.from_pool(redis_pool(url, max_connections))
