"""A value's size as orjson serializes it, read from sizes measured earlier where they hold it.

The `response_format` bound (SPEC 2.3, 128 KiB serialized) is one `orjson.dumps` of the format:
~0.3-1 ms for a 500 KB schema, in one block of the event loop. For a large body those sizes are
measured a slice at a time beforehand (`sidecar.api.big_body.measure_part`), and the bound
reads them here.
"""

from __future__ import annotations

import orjson

# Sizes of parts of a body, by id, with the part itself: held, so that its id cannot be reused
# by another object while the sizes are kept.
Sizes = dict[int, tuple[object, int]]
SIZE_NESTING = 32  # `serialized_size` follows small containers this deep, then serializes
_SMALL = 64  # members: a container this small, not measured itself, is summed from its members


def serialized_size(value: object, sizes: Sizes | None, depth: int = 0) -> int:
    """len(orjson.dumps(value)): from `sizes` where they hold `value`, or for a small container
    built around parts of a body (the Responses API's format, wrapped as chat's) from what is
    inside it; else serialized."""
    if not sizes:
        return len(orjson.dumps(value))
    known = sizes.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    if depth < SIZE_NESTING:
        if type(value) is dict and 0 < len(value) <= _SMALL:
            # "{" and "}", a colon per member, the commas between them
            members = sum(
                len(orjson.dumps(k)) + serialized_size(v, sizes, depth + 1)
                for k, v in value.items()
            )
            return 1 + 2 * len(value) + members
        if type(value) is list and 0 < len(value) <= _SMALL:
            return 1 + len(value) + sum(serialized_size(v, sizes, depth + 1) for v in value)
    return len(orjson.dumps(value))
