"""A share of a core per process, from the kernel's CPU controller (cgroup v2 or v1).

The `--workers` scaling run needs more cores than a 2-core machine has to spare: wrk and the
upstream take theirs too. Confining each sidecar worker to its own fraction of a core (a CFS
quota: `quota` of every 100 ms) makes each worker a "core" of that size, so the run can show
whether N workers serve N times what one does while the load generator keeps the rest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PERIOD_US = 100_000
V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/cpu")


class QuotaUnavailable(Exception):
    """No writable CPU controller here (not root, or a container without one)."""


class CoreQuota:
    """One cgroup per confined process, each limited to `share` of a core; `close()` removes
    them (once their processes have exited or been moved back)."""

    def __init__(self, share: float, name: str = "ringside-bench") -> None:
        if not 0 < share <= 1:
            raise ValueError("a core share is in (0, 1]")
        self.share = share
        self.name = f"{name}-{os.getpid()}"
        self.groups: list[Path] = []
        self.v2 = _v2_usable()
        if not self.v2 and not os.access(V1_ROOT, os.W_OK):
            raise QuotaUnavailable(
                f"neither {V2_ROOT}/cgroup.subtree_control offers cpu nor is {V1_ROOT} writable"
            )

    def confine(self, pid: int) -> None:
        group = (V2_ROOT if self.v2 else V1_ROOT) / f"{self.name}-{len(self.groups)}"
        try:
            group.mkdir()
            self.groups.append(group)
            quota = int(self.share * PERIOD_US)
            if self.v2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise QuotaUnavailable(f"cannot confine {pid} in {group}: {exc}") from exc

    def close(self) -> None:
        parent = V2_ROOT if self.v2 else V1_ROOT
        for group in self.groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    (parent / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


def _v2_usable() -> bool:
    controllers = V2_ROOT / "cgroup.subtree_control"
    try:
        return "cpu" in controllers.read_text().split() and os.access(V2_ROOT, os.W_OK)
    except OSError:
        return False
