"""The marks counter: its fast shape (prefix + scattered) always agrees with the tree."""

from __future__ import annotations

from hypothesis import given, strategies as st

from actors.fenwick import Marks


@given(st.integers(1, 300).flatmap(
    lambda n: st.tuples(st.just(n), st.permutations(range(n)), st.integers(0, n))))
def test_fast_count_agrees_with_tree_and_brute_force(case):
    n, order, k = case
    marks = Marks()
    marks.ensure(n)
    marked = set(order[:k])
    for slot in order[:k]:
        marks.mark(slot)
    rebuilt = Marks(marks.tree)
    rebuilt.rebuild(sorted(marked))
    for end in range(n + 1):
        expected = sum(1 for s in marked if s < end)
        assert marks.count(end) == expected
        assert marks.fast_count(end) == expected
        assert rebuilt.fast_count(end) == expected
