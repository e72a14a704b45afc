"""Request and usage-record ids: unique across processes and replicas, without a syscall each.

A random 48-bit prefix per process (drawn again in every forked worker) and a counter: ids
never repeat within a process and collide across processes only if two prefixes do. Ids are
not secrets: nothing grants access by knowing one.
"""

from __future__ import annotations

import itertools
import os

# Per process by design, not per app (ARCHITECTURE rule 5 allows it): whichever app draws an
# id, it must not repeat within the process; a forked worker draws its own prefix.
_prefix = ""
_counter = itertools.count()


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(6).hex()
    _counter = itertools.count(int.from_bytes(os.urandom(3), "big") << 16)


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """24 lowercase hex characters."""
    return f"{_prefix}{next(_counter) & 0xFFFFFFFFFFFF:012x}"
