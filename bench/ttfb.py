"""Time to the first body byte of a streamed answer, each proxy paired with direct."""

from __future__ import annotations

import json
import time

from bench.targets import Target
from bench.workload import stream_body

TTFB_WARMUP = 5  # streamed requests per target before TTFB samples are kept


async def measure_ttfb(targets: list[Target], count: int) -> None:
    """Time to the first body byte of a streamed answer, one request at a time, each proxy
    paired with direct: `count` times a request straight to the upstream, then one through
    the proxy. The added TTFB is the proxy's median over the median of its own direct
    samples, taken under the same machine state a moment apart (a proxy timed in a block of
    its own, minutes from direct, or right after a heavyweight peer has run, measures the
    machine as much as itself). The first few pairs warm connections and are dropped."""
    import aiohttp

    direct, proxies = targets[0], targets[1:]
    bodies = {target.name: json.loads(stream_body(target.body)) for target in targets}

    async def sample(session: aiohttp.ClientSession, target: Target) -> float | None:
        body = bodies[target.name]
        started = time.perf_counter()
        async with session.post(target.url, json=body, headers=target.headers) as reply:
            await reply.content.readany()
            elapsed_ms = (time.perf_counter() - started) * 1000
            await reply.read()
        target.answered += reply.status == 200
        return elapsed_ms if reply.status == 200 else None

    async with aiohttp.ClientSession() as session:
        for target in proxies:
            for index in range(count + TTFB_WARMUP):
                base, through = await sample(session, direct), await sample(session, target)
                if index >= TTFB_WARMUP and base is not None and through is not None:
                    target.ttfb_direct_ms.append(base)
                    target.ttfb_ms.append(through)
                    direct.ttfb_ms.append(base)
