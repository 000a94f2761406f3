"""The live view of one user's nodes: one :class:`NodeView` per node, kept up to date node by node.

A :class:`~controller.scheduling.snapshot.Snapshot` is immutable, so a placement over
fresh data must build a new one — a view, a score and a per-type index for every node
of the user, every time. :class:`LiveSnapshot` is the same picture kept current
instead: whoever learns that a node changed (a heartbeat, a state change, a hello, an
assignment that reserves or frees resources) builds that one node's new view and
:meth:`LiveSnapshot.put` s it; its score is computed once, there, and its placement
row moves to its new place in the per-type, per-region order (a binary search and a
list insertion). A placement then reads the current order directly: no per-placement
rebuild (:func:`controller.scheduling.select.place` accepts a live snapshot wherever it
accepts a snapshot and decides exactly as it would on a ``Snapshot`` of the same views).

Not thread-safe and not a point-in-time copy: a :class:`~controller.scheduling.select.Placement`
made over a live snapshot computes its rejected nodes' reasons lazily from the current
views, so explain it before the next change is applied (in asyncio: before the next
``await``), as the deployments harness does.

Pure: no I/O, no clock. Feeding it is the caller's job (``controller/deployments/snapshot.py``).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Collection, Iterable
from typing import cast

from controller.scheduling.feasible import RESOURCE_EPSILON
from controller.scheduling.snapshot import (
    SCHEDULABLE,
    SENTINEL,
    NodeView,
    PlacementRow,
    ReplicaRequest,
    build_regions,
)

_FREE = (3, 4, 5)
"""The free CPU cores, memory MB and disk MB columns of a :data:`PlacementRow`."""


class _LiveTypeIndex:
    """The rows of one node type by region, kept sorted as views change; and what tells,
    without walking every node, which nodes can be infeasible for a request of the type:
    the nodes outside the order (not schedulable, or not of the type), and the least free
    CPU, memory and disk among those in it (a heap per resource, stale entries dropped
    when they reach the top: O(log n) per change, whatever left)."""

    __slots__ = ("_heaps", "_rows", "node_type", "outside", "regions")

    def __init__(self, nodes: Iterable[NodeView], node_type: str) -> None:
        self.node_type = node_type
        nodes = tuple(nodes)
        self.regions = build_regions(nodes, node_type)
        self.outside = {view.node_id for view in nodes if not self._member(view)}
        self._rows: dict[str, PlacementRow] = {}
        self._heaps: tuple[list[tuple[float, str]], ...] = ([], [], [])
        self._rebuild_heaps({row[1]: row for rows in self.regions.values() for row in rows[:-1]})

    def _rebuild_heaps(self, rows: dict[str, PlacementRow]) -> None:
        self._rows = rows
        self._heaps = tuple(
            [(cast(float, row[column]), node_id) for node_id, row in rows.items()] for column in _FREE
        )
        for heap in self._heaps:
            heapq.heapify(heap)

    def _member(self, view: NodeView | None) -> bool:
        return view is not None and view.state in SCHEDULABLE and self.node_type in view.node_types

    def least_free(self) -> tuple[float, float, float]:
        """The least free CPU cores, memory MB and disk MB among the nodes in the order
        (each on its own; infinite when the order is empty)."""
        rows = self._rows
        least = [math.inf, math.inf, math.inf]
        for i, (column, heap) in enumerate(zip(_FREE, self._heaps, strict=True)):
            while heap:
                value, node_id = heap[0]
                row = rows.get(node_id)
                if row is not None and row[column] == value:
                    least[i] = value
                    break
                heapq.heappop(heap)  # the node left the order, or its free resources changed
        return (least[0], least[1], least[2])

    def replace(self, old: NodeView | None, new: NodeView | None) -> None:
        was_in, is_in = self._member(old), self._member(new)
        if old is not None and not was_in:
            self.outside.discard(old.node_id)
        if new is not None and not is_in:
            self.outside.add(new.node_id)
        if was_in:
            assert old is not None
            row = old.placement_row
            rows = self.regions[row[2]]
            at = bisect_left(rows, row, 0, len(rows) - 1)
            if at < len(rows) - 1 and rows[at][1] == row[1]:
                del rows[at]
            else:  # cannot happen: the row is where it was put
                rows.remove(row)
            if len(rows) == 1:  # only the sentinel is left
                del self.regions[row[2]]
            self._rows.pop(row[1], None)
        if is_in:
            assert new is not None
            row = new.placement_row
            found = self.regions.get(row[2])
            if found is None:
                self.regions[row[2]] = [row, SENTINEL]
            else:
                insort(found, row, 0, len(found) - 1)
            self._rows[row[1]] = row
            for column, heap in zip(_FREE, self._heaps, strict=True):
                heapq.heappush(heap, (cast(float, row[column]), row[1]))
            if len(self._heaps[0]) > 2 * len(self._rows) + 64:  # mostly stale entries: start over
                self._rebuild_heaps(self._rows)


class LiveSnapshot:
    """One user's nodes as placement sees them, updated one node at a time.

    Offers what placement reads of a :class:`~controller.scheduling.snapshot.Snapshot`
    (``nodes``, ``node()``, ``len()``) plus :meth:`regions`, the per-type placement
    order, which it maintains instead of rebuilding.
    """

    def __init__(self, user_id: str, nodes: tuple[NodeView, ...] = ()) -> None:
        self.user_id = user_id
        self._views: dict[str, NodeView] = {}
        self._indexes: dict[str, _LiveTypeIndex] = {}
        self._order: list[str] | None = None
        self._nodes: tuple[NodeView, ...] | None = None
        for node in nodes:
            self.put(node)

    def __len__(self) -> int:
        return len(self._views)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._views

    def node(self, node_id: str) -> NodeView | None:
        """The node's current view, or ``None``."""
        return self._views.get(node_id)

    @property
    def nodes(self) -> tuple[NodeView, ...]:
        """Every current view, in node id order (built on demand, kept until a view changes)."""
        if self._nodes is None:
            if self._order is None:
                self._order = sorted(self._views)
            views = self._views
            self._nodes = tuple(views[node_id] for node_id in self._order)
        return self._nodes

    def put(self, view: NodeView) -> NodeView | None:
        """Make ``view`` the node's current view; returns the one it replaces (None: a new node)."""
        if view.user_id != self.user_id:
            raise ValueError(
                f"live snapshot of user {self.user_id!r} given node {view.node_id!r} of user {view.user_id!r}"
            )
        old = self._views.get(view.node_id)
        self._views[view.node_id] = view
        if old is None:
            self._order = None
        self._nodes = None
        for index in self._indexes.values():
            index.replace(old, view)
        return old

    def remove(self, node_id: str) -> NodeView | None:
        """Forget the node (removed, or no longer the user's); returns its last view."""
        old = self._views.pop(node_id, None)
        if old is not None:
            self._order = None
            self._nodes = None
            for index in self._indexes.values():
                index.replace(old, None)
        return old

    def regions(self, node_type: str) -> dict[str, list[PlacementRow]]:
        """The schedulable nodes of ``node_type`` by region, best first, each list ended by
        :data:`SENTINEL` (built on the first request for the type, then maintained)."""
        return self._index(node_type).regions

    def _index(self, node_type: str) -> _LiveTypeIndex:
        index = self._indexes.get(node_type)
        if index is None:
            index = self._indexes[node_type] = _LiveTypeIndex(self._views.values(), node_type)
        return index

    def room_for_all(self, request: ReplicaRequest) -> bool:
        """Whether every node in the type's placement order has room for ``request``."""
        cpu, memory, disk = self._index(request.node_type).least_free()
        return (
            cpu >= request.cpu_cores - RESOURCE_EPSILON
            and memory >= request.memory_mb - RESOURCE_EPSILON
            and disk >= request.disk_mb - RESOURCE_EPSILON
        )

    def maybe_infeasible(self, request: ReplicaRequest, exclude: Collection[str]) -> list[NodeView] | None:
        """The nodes that can be infeasible for ``request`` with ``exclude``, in :attr:`nodes`
        order — those outside the type's order and the excluded ones — when every node in the
        order has room for it; else None (any node may be: walk them all). Rejections are
        reported with every placement, and in a large fleet with room to spare this is a
        handful of nodes instead of all of them."""
        if not self.room_for_all(request):
            return None
        index = self._index(request.node_type)
        views = self._views
        candidates = index.outside.union(node_id for node_id in exclude if node_id in views)
        return [views[node_id] for node_id in sorted(candidates)]
