"""A growable Fenwick tree counting marked slots among append-only sequence numbers.

The waiting line marks a slot when its entry stops waiting; a position is then
`slot + 1 - marks before it`. Slots start unmarked, so growing costs nothing per append:
the tree's size is a power of two, and doubling it only copies the old total into the
new root (every other new node covers slots that do not exist yet, hence zero).
"""

from __future__ import annotations

from array import array

_INT = "i"  # 4 bytes a node: a lane never holds 2**31 entries


class Marks:
    __slots__ = ("tree", "cap")

    def __init__(self, tree: array[int] | None = None) -> None:
        self.tree: array[int] = tree if tree is not None else array(_INT, bytes(8))  # cap 1
        cap = len(self.tree) - 1
        if cap < 1 or cap & (cap - 1):
            raise ValueError(f"Fenwick tree size {cap} is not a power of two")
        self.cap = cap

    def ensure(self, slots: int) -> None:
        """Make room for slots 0..slots-1."""
        while slots > self.cap:
            cap = self.cap
            self.tree.extend(array(_INT, bytes(4 * cap)))
            self.tree[2 * cap] = self.tree[cap]
            self.cap = 2 * cap

    def mark(self, slot: int) -> None:
        tree, cap, i = self.tree, self.cap, slot + 1
        while i <= cap:
            tree[i] += 1
            i += i & -i

    def count(self, end: int) -> int:
        """Marked slots among 0..end-1, in O(log n)."""
        tree, total = self.tree, 0
        while end:
            total += tree[end]
            end &= end - 1
        return total

    def total(self) -> int:
        return self.tree[self.cap]
