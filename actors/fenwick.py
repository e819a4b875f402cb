"""A growable Fenwick tree counting marked slots among append-only sequence numbers.

The waiting line marks a slot when its entry stops waiting; a position is then
`slot + 1 - marks before it`. Slots start unmarked, so growing costs nothing per append:
the tree's size is a power of two, and doubling it only copies the old total into the
new root (every other new node covers slots that do not exist yet, hence zero).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort

_INT = "i"  # 4 bytes a node: a lane never holds 2**31 entries


class Marks:
    """Counts marked slots. Besides the tree it keeps the fast shape of a real line:
    `prefix` (slots 0..prefix-1 are all marked — the head has been served) and the sorted
    list of marked slots beyond it (people who left out of order). A count is then one
    comparison plus a C-level bisect instead of ~log2(n) interpreted tree steps, which
    is what bounds position reads at a million entries."""

    __slots__ = ("tree", "cap", "prefix", "scattered")

    def __init__(self, tree: array[int] | None = None) -> None:
        self.prefix = 0
        self.scattered: list[int] = []
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
        if slot == self.prefix:
            self.prefix += 1
            scattered = self.scattered
            if scattered and scattered[0] == self.prefix:
                k = 0  # absorb the run of marks the prefix has now reached
                while k < len(scattered) and scattered[k] == self.prefix + k:
                    k += 1
                self.prefix += k
                del scattered[:k]
        else:
            insort(self.scattered, slot)

    def rebuild(self, marked: list[int]) -> None:
        """Set the fast shape from the sorted marked slots (after loading a snapshot)."""
        prefix = 0
        while prefix < len(marked) and marked[prefix] == prefix:
            prefix += 1
        self.prefix, self.scattered = prefix, marked[prefix:]

    def fast_count(self, end: int) -> int:
        """Marked slots among 0..end-1, from the prefix and the scattered marks."""
        if end <= self.prefix:
            return end
        return self.prefix + bisect_left(self.scattered, end)

    def count(self, end: int) -> int:
        """Marked slots among 0..end-1, in O(log n)."""
        tree, total = self.tree, 0
        while end:
            total += tree[end]
            end &= end - 1
        return total

    def total(self) -> int:
        return self.tree[self.cap]
