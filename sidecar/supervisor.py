"""`ringside serve --workers N`: fork N serving processes that share the listeners, forward
signals to them, reap them and replace one that dies."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from sidecar.serve import run_worker
from sidecar.settings import Settings

log = logging.getLogger("ringside")


def supervise(settings: Settings, config_path: str, started: float, workers: int) -> int:
    """Fork `workers` processes sharing the listeners (SO_REUSEPORT); forward signals; reap.

    Metrics go through prometheus-client's multiprocess mode so that whichever worker answers
    /metrics reports the sum of all of them. A worker that dies is replaced until shutdown.
    """
    from prometheus_client import multiprocess

    def spawn() -> int:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os._exit(run_worker(settings, config_path, started, workers))
        return pid

    children = {spawn() for _ in range(workers)}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        multiprocess.mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, abs(code))
        elif code in (2, 3):  # a config or listen error: the next worker would fail the same way
            stopping = True
            forward(signal.SIGTERM, None)
            worst = code
        else:
            log.error("worker %d exited with %d; starting another", pid, code)
            time.sleep(0.5)
            children.add(spawn())
    return worst
