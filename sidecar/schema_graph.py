"""A client's JSON Schema as a graph, and the bound of the work one answer value can cause.

`measure` walks a schema once. It refuses it (`Refused`: a 400 naming the bound) over a hard
bound of `sidecar.schema_cost`, or with a `$ref` that leaves the document or loops without
descending into the answer (`$dynamicRef`, `$recursiveRef` and an `$id` below the root too:
they make where a reference leads depend on the path taken, which this does not follow). Each
subschema becomes a node: its own work (`own_work`), the subschemas applied in place with it
(allOf, anyOf, oneOf, not, if/then/else, dependentSchemas, $ref) and, per kind of member or
item, those applied to it together.

The bound is the work of one value at each depth of an answer: summed over the subschemas that
can reach it, the worst kind of member or item taken at each level, an object's and an array's
apart (a value is one or the other). Where the schema recurses, it is iterated depth by depth
until it repeats; a recursion that keeps growing (two branches that both recurse into the same
value: 2^depth) leaves a bound per depth, deeper values too costly. A schema whose values cost
too much already near the top is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from sidecar.schema_cost import (
    BUDGET_NS,
    IN_PLACE,
    MAX_NESTING,
    MAX_PATTERN_CHARS,
    MAX_PATTERNS,
    MAX_SUBSCHEMAS,
    MEMBERS,
    MIN_ANSWER_BYTES,
    MIN_ANSWER_DEPTH,
    NS_APPLY,
    NS_UNEVALUATED,
    NS_UNIQUE,
    ZERO,
    Cost,
    Refused,
    Work,
    add,
    as_dict,
    as_list,
    larger,
    largest,
    own_work,
    total,
)

_SPECIAL = frozenset(
    {"$ref", "$anchor", "$dynamicAnchor", "$id", "$dynamicRef", "$recursiveRef", "pattern",
     "patternProperties", "$defs", "definitions"}
)  # fmt: skip


def measure(schema: Any) -> Cost:
    """Check `schema`'s bounds and work out its `Cost`; `Refused` says why one is refused."""
    graph = _Graph(schema)
    graph.build()
    cost = graph.cost()
    shallow = largest(cost.by_depth[1:MIN_ANSWER_DEPTH] or cost.by_depth)
    need = cost.check_ns(MIN_ANSWER_BYTES, below=shallow)
    if need > BUDGET_NS or (not cost.bounded and len(cost.by_depth) < MIN_ANSWER_DEPTH):
        raise Refused(
            f"is too costly: checking a {MIN_ANSWER_BYTES // 1024} KiB answer against it could "
            f"take {need / 1e6:.0f} ms, over the {BUDGET_NS / 1e6:.0f} ms a request may spend "
            "on its schema (its subschemas apply to one value too many times, through "
            "anyOf/allOf/$ref or recursion)"
        )
    return cost


@dataclass(slots=True)
class _Node:
    own: Work
    in_place: list[int]  # subschemas applied to the same value
    objects: list[list[int]]  # per kind of member: the subschemas applied to it together
    arrays: list[list[int]]  # per kind of item: the same


class _Graph:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.nodes: list[_Node] = []
        self.index: dict[int | str, int] = {}  # id(schema object) → node; true, false: one each
        self.anchors: dict[str, int] = {}
        self.refs: list[tuple[int, str]] = []
        self.patterns = 0
        self.hashed: int | None = None  # what uniqueItems does to the values under an array
        self.consulting: list[tuple[int, int]] = []  # what unevaluated* asks, and of whom

    # -- the walk: nodes, edges, bounds -------------------------------------------------------
    def build(self) -> None:
        self._node(self.root, 0)
        resolved = 0
        while resolved < len(self.refs):  # a target may be new: walked, with refs of its own
            at, ref = self.refs[resolved]
            self.nodes[at].in_place.append(self._resolve(ref))
            resolved += 1

    def _node(self, schema: Any, depth: int) -> int:
        key = id(schema) if isinstance(schema, dict) else repr(schema)
        found = self.index.get(key)
        if found is not None:
            return found
        at = len(self.nodes)
        self.index[key] = at
        if not isinstance(schema, dict):  # true, false (or not a schema: the compiler says so)
            self.nodes.append(_Node((NS_APPLY, 0.0, float(schema is False)), [], [], []))
            return at
        if at >= MAX_SUBSCHEMAS:
            raise Refused(f"has over {MAX_SUBSCHEMAS} subschemas; at most {MAX_SUBSCHEMAS}")
        if depth > MAX_NESTING:
            raise Refused(f"nests subschemas over {MAX_NESTING} deep; at most {MAX_NESTING}")
        keys = schema.keys()
        node = _Node(own_work(schema, keys), [], [], [])
        self.nodes.append(node)
        if keys & _SPECIAL:
            self._special(schema, at, depth)
        if keys & IN_PLACE:
            node.in_place = self._in_place(schema, depth + 1)
        if keys & MEMBERS:
            node.objects, node.arrays = self._members(schema, at, depth + 1)
        if schema.get("uniqueItems") is True:
            node.arrays = [[*kind, self._hashing()] for kind in node.arrays] or [[self._hashing()]]
        return at

    def _consulting(self, at: int) -> int:
        """unevaluated* asks, of each member or item, every subschema applied in place with it
        whether it evaluated that member: a node whose cost is set once the references are
        resolved (in `cost`: a subschema may be reached in place through a $ref)."""
        pseudo = len(self.nodes)
        self.nodes.append(_Node(ZERO, [], [], []))
        self.consulting.append((pseudo, at))
        return pseudo

    def _hashing(self) -> int:
        """uniqueItems hashes (or compares) every value under the array's items: a node that
        applies to each of them, at every depth."""
        if self.hashed is None:
            self.hashed = len(self.nodes)
            self.nodes.append(_Node((NS_UNIQUE, 0.0, 0.0), [], [], []))
            self.nodes[self.hashed].objects = [[self.hashed]]
            self.nodes[self.hashed].arrays = [[self.hashed]]
        return self.hashed

    def _special(self, schema: dict[str, Any], at: int, depth: int) -> None:
        for name in ("$dynamicRef", "$recursiveRef"):
            if name in schema:
                raise Refused(f"uses {name}, which the gateway does not support")
        if "$id" in schema and depth:
            raise Refused("has an $id below its root, which the gateway does not support")
        for name in ("$anchor", "$dynamicAnchor"):
            if isinstance(schema.get(name), str):
                self.anchors[schema[name]] = at
        if isinstance(schema.get("$ref"), str):
            self.refs.append((at, schema["$ref"]))
        patterns = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
        patterns.extend(as_dict(schema.get("patternProperties")))
        self.patterns += len(patterns)
        if self.patterns > MAX_PATTERNS:
            raise Refused(f"has over {MAX_PATTERNS} patterns; at most {MAX_PATTERNS}")
        for pattern in patterns:
            if len(pattern) > MAX_PATTERN_CHARS:
                raise Refused(
                    f"has a pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS}"
                )
        for name in ("$defs", "definitions"):
            for sub in as_dict(schema.get(name)).values():
                self._node(sub, depth + 1)

    def _in_place(self, schema: dict[str, Any], depth: int) -> list[int]:
        found = [self._node(schema[name], depth) for name in ("not", "if", "then", "else")
                 if name in schema]  # fmt: skip
        for name in ("allOf", "anyOf", "oneOf"):
            found.extend(self._node(sub, depth) for sub in as_list(schema.get(name)))
        found.extend(
            self._node(sub, depth) for sub in as_dict(schema.get("dependentSchemas")).values()
        )
        return found

    def _members(self, schema: dict[str, Any], at: int, depth: int) -> tuple[list[list[int]], ...]:
        """The subschemas that apply together to one member of an object, for each kind of
        member (a declared property, any other, a name), and to one item of an array."""

        def nodes(*names: str) -> list[int]:
            return [self._node(schema[name], depth) for name in names if name in schema]

        # a pattern may match any name; unevaluated* may apply to any member or item; a name is
        # checked with its member
        any_member = nodes("unevaluatedProperties", "propertyNames") + [
            self._node(sub, depth) for sub in as_dict(schema.get("patternProperties")).values()
        ]
        any_item = nodes("contains", "unevaluatedItems")
        if "unevaluatedProperties" in schema or "unevaluatedItems" in schema:
            consulted = self._consulting(at)
            any_member.append(consulted)
            any_item.append(consulted)
        objects = [
            [self._node(sub, depth), *any_member]
            for sub in as_dict(schema.get("properties")).values()
        ]
        objects.append(nodes("additionalProperties") + any_member)
        arrays = [[self._node(sub, depth), *any_item] for sub in as_list(schema.get("prefixItems"))]
        arrays.append(nodes("items") + any_item)
        return [kind for kind in objects if kind], [kind for kind in arrays if kind]

    def _resolve(self, ref: str) -> int:
        if not ref.startswith("#"):
            raise Refused(
                f"has a $ref that cannot be resolved: {ref!r} (only references inside the "
                "schema, '#…', are followed)"
            )
        fragment = unquote(ref[1:])
        if fragment and not fragment.startswith("/"):
            if fragment not in self.anchors:
                raise Refused(f"has a $ref that cannot be resolved: {ref!r} (no such $anchor)")
            return self.anchors[fragment]
        target = self.root
        for raw in fragment.split("/")[1:]:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise Refused(f"has a $ref that cannot be resolved: {ref!r} (no such location)")
        if not isinstance(target, dict | bool):
            raise Refused(f"has a $ref to {ref!r}, which is not a schema")
        return self._node(target, 1)

    # -- the bound: the work of one value, by depth ----------------------------------------------
    def cost(self) -> Cost:
        # without a $ref the schema is a tree (and uniqueItems' node only loops on itself)
        cyclic = bool(self.refs) or self.hashed is not None
        in_place_order = self._in_place_order() if cyclic or self.consulting else []
        if self.consulting:
            paths = [1] * len(self.nodes)  # in-place paths from a node, itself included
            for at in in_place_order:
                paths[at] += sum(paths[c] for c in self.nodes[at].in_place)
            for pseudo, at in self.consulting:
                self.nodes[pseudo].own = (NS_UNEVALUATED * paths[at], 0.0, 0.0)
        recursive = self._recursive() if cyclic else set()
        self._finite(recursive)
        if 0 not in recursive:
            below = larger(self.below_object[0], self.below_array[0])
            return Cost.of((self.at_value[0], below), bounded=True)
        return self._iterate([at for at in in_place_order if at in recursive], recursive)

    def _edges(self, at: int) -> Iterator[int]:
        node = self.nodes[at]
        yield from node.in_place
        for kind in node.objects:
            yield from kind
        for kind in node.arrays:
            yield from kind

    def _in_place_order(self) -> list[int]:
        """Nodes with every in-place child before its parent; Refused on an in-place cycle
        (a $ref loop that never descends into the answer would recurse forever)."""
        return _post_order(
            len(self.nodes),
            lambda at: iter(self.nodes[at].in_place),
            on_cycle=Refused("has a $ref cycle that never descends into the answer"),
        )

    def _recursive(self) -> set[int]:
        """The nodes from which a cycle (through a member or an item) can be reached."""
        on_cycle = _cyclic(len(self.nodes), self._edges)
        parents: dict[int, list[int]] = {}
        for at in range(len(self.nodes)):
            for child in self._edges(at):
                parents.setdefault(child, []).append(at)
        reaching = set(on_cycle)
        pending = list(on_cycle)
        while pending:
            for parent in parents.get(pending.pop(), ()):
                if parent not in reaching:
                    reaching.add(parent)
                    pending.append(parent)
        return reaching

    def _finite(self, recursive: set[int]) -> None:
        """For each node that reaches no recursion: its work on the value it is applied to
        (`at_value`), on a value below it for each type of the value it applies to
        (`below_object`, `below_array`), at any depth (`any_depth`), and `height`, the deepest
        value below it that it reaches."""
        self.at_value: dict[int, Work] = {}
        self.below_object: dict[int, Work] = {}
        self.below_array: dict[int, Work] = {}
        self.any_depth: dict[int, Work] = {}
        self.height: dict[int, int] = {}
        order = _post_order(
            len(self.nodes),
            lambda at: (c for c in self._edges(at) if c not in recursive),
            skip=recursive,
        )
        for at in order:
            node = self.nodes[at]
            in_place = node.in_place
            if not (in_place or node.objects or node.arrays):  # a leaf: most subschemas
                self.at_value[at] = self.any_depth[at] = node.own
                self.below_object[at] = self.below_array[at] = ZERO
                self.height[at] = 0
                continue
            self.at_value[at] = add(node.own, total(self.at_value[c] for c in in_place))
            objects = _worst_kind(node.objects, self.any_depth)
            arrays = _worst_kind(node.arrays, self.any_depth)
            self.below_object[at] = add(objects, total(self.below_object[c] for c in in_place))
            self.below_array[at] = add(arrays, total(self.below_array[c] for c in in_place))
            self.any_depth[at] = larger(
                self.at_value[at], larger(self.below_object[at], self.below_array[at])
            )
            self.height[at] = max(
                [self.height[c] for c in in_place]
                + [self.height[c] + 1 for kinds in (node.objects, node.arrays)
                   for kind in kinds for c in kind]
                + [0]
            )  # fmt: skip

    def _iterate(self, inner: list[int], recursive: set[int]) -> Cost:
        """The work of one value at depth k below the root for k = 0, 1, …: until it repeats
        (it then holds at any depth), or no value that deep could be checked within a budget.
        Each recursive node's work is kept per type of the value it applies to: its in-place
        subschemas see the same value, so an array's items and an object's members never add."""
        settled = max(self.height.values(), default=0) + 2  # finite parts are done by then
        previous: dict[int, tuple[Work, Work]] = {}
        by_depth: list[Work] = []
        for depth in range(settled + 64):
            current: dict[int, tuple[Work, Work]] = {}
            for at in inner:
                current[at] = self._at_depth(at, depth, current, previous, recursive)
            by_depth.append(larger(*current[0]))
            if by_depth[-1][0] > BUDGET_NS:  # not even one value this deep
                return Cost.of(tuple(by_depth[:-1]), bounded=False)
            if depth > settled and current == previous:
                return Cost.of(tuple(by_depth), bounded=True)
            previous = current
        return Cost.of(tuple(by_depth), bounded=False)

    def _at_depth(
        self,
        at: int,
        depth: int,
        current: dict[int, tuple[Work, Work]],
        previous: dict[int, tuple[Work, Work]],
        recursive: set[int],
    ) -> tuple[Work, Work]:
        """(work if the value it applies to is an object, if it is an array)."""
        node = self.nodes[at]
        if depth == 0:
            in_place = [current[c][0] if c in recursive else self.at_value[c]
                        for c in node.in_place]  # fmt: skip
            work = add(node.own, total(in_place))
            return work, work

        def below(child: int) -> Work:  # a member's or item's work, one level up
            if child in recursive:
                return larger(*previous[child])
            if depth == 1:
                return self.at_value[child]
            return self.any_depth[child] if depth - 1 <= self.height[child] else ZERO

        found: list[Work] = []
        for family, kinds, finite in (
            (0, node.objects, self.below_object),
            (1, node.arrays, self.below_array),
        ):
            work = ZERO
            for kind in kinds:
                work = larger(work, total(below(c) for c in kind))
            for c in node.in_place:
                if c in recursive:
                    work = add(work, current[c][family])
                elif depth <= self.height[c]:
                    work = add(work, finite[c])
            found.append(work)
        return found[0], found[1]


def _post_order(
    count: int,
    children: Any,
    skip: set[int] | None = None,
    on_cycle: Exception | None = None,
) -> list[int]:
    """Nodes, each after its children (iterative depth-first); `on_cycle` raised on a cycle."""
    state = [0] * count  # 0 new, 1 on the path, 2 done
    order: list[int] = []
    for start in range(count):
        if state[start] or (skip and start in skip):
            continue
        state[start] = 1
        stack: list[tuple[int, Iterator[int]]] = [(start, children(start))]
        while stack:
            at, pending = stack[-1]
            child = next(pending, None)
            if child is None:
                stack.pop()
                state[at] = 2
                order.append(at)
            elif state[child] == 1:
                if on_cycle is not None:
                    raise on_cycle
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, children(child)))
    return order


def _cyclic(count: int, edges: Any) -> set[int]:
    """Nodes on a cycle: members of a strongly connected component of two or more, or their own
    child (Tarjan, iterative)."""
    index = [-1] * count
    low = [0] * count
    on_stack = [False] * count
    stack: list[int] = []
    cyclic: set[int] = set()
    counter = 0
    for start in range(count):
        if index[start] >= 0:
            continue
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack[start] = True
        work: list[tuple[int, Iterator[int]]] = [(start, edges(start))]
        while work:
            at, children = work[-1]
            child = next(children, None)
            if child is not None:
                if index[child] < 0:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack[child] = True
                    work.append((child, edges(child)))
                elif on_stack[child]:
                    low[at] = min(low[at], index[child])
                    if child == at:
                        cyclic.add(at)
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[at])
            if low[at] == index[at]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    component.append(member)
                    if member == at:
                        break
                if len(component) > 1:
                    cyclic.update(component)
    return cyclic


def _worst_kind(kinds: list[list[int]], work: dict[int, Work]) -> Work:
    """The most work one member (or item) can get: the worst kind of it, componentwise."""
    worst = ZERO
    for kind in kinds:
        worst = larger(worst, total(work[c] for c in kind))
    return worst
