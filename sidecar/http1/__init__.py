"""A lean keep-alive HTTP/1.1 client for every upstream call, whole or streamed.

aiohttp's ClientSession costs about 0.2 ms of CPU per request here (request and response
objects, tracing hooks, cookie jar, timers), measured at more than half of a bare
aiohttp forwarder's whole cost. A provider call needs much less: write one request, read one
response. This package does only that, in six modules:
- `client`: an Egress per provider setting (proxy, TLS, caps), the request head, the exchange;
- `pool`: targets, and a pool of keep-alive connections per origin and egress, capped;
- `proxy`: proxies from the environment or the provider's config (CONNECT tunnels, absolute
  form);
- `dial`: a short DNS cache and happy eyeballs;
- `connection`: the request written in one piece, the response parsed by httptools (llhttp,
  the parser of Node.js and uvicorn);
- `body`: a stream's body handed over as it arrives, pausing the socket while the reader is
  behind, and bounding the kernel's receive buffer from then on (what a stalled stream holds
  is small on both sides).
`request` returns the whole body (capped at MAX_BODY_BYTES); `stream` returns at the response
head; `forward` too, for a pass-through request whose body may arrive in pieces (an `Upload`).

Timeouts follow the provider's: `connect` for the TCP (and TLS) handshake, `read` from the
request written to the response complete (streamed: to the head, then between two pieces of
the body), `total` over everything, a stream's body included.
"""

from sidecar.http1.body import MAX_BODY_BYTES, BodyReader, Streamed, UpstreamProtocolError
from sidecar.http1.client import Egress, Http1Client
from sidecar.http1.connection import Connection, Response, Upload
from sidecar.http1.pool import Origin, Pool, Target

__all__ = [
    "MAX_BODY_BYTES",
    "BodyReader",
    "Connection",
    "Egress",
    "Http1Client",
    "Origin",
    "Pool",
    "Response",
    "Streamed",
    "Target",
    "Upload",
    "UpstreamProtocolError",
]
