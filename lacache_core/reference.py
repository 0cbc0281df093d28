"""A slow, literal re-derivation of the official LaCache slot selection from LACACHE_SPEC.md.

Written from the spec's prose, step by step, with per-layer Python lists, as the official code
works: the tests check the fast tensor implementation (:class:`lacache_core.LaCache`) against it,
and ``scripts/bench_decode.py --official_slow`` times it as "the official way". Indexing is
explicit (``lst[k]``), so a step that would read past a list raises instead of silently
truncating. It reproduces the official defects too (see docs/reference_differences.md); do not use it for runs.
"""
import math


class ReferenceLaCache:
    def __init__(self, num_layers, cache_size, span, overlap, start_size):
        self.L, self.C, self.s = num_layers, cache_size, start_size
        self.B = 1 + math.ceil((num_layers - span) / (span - overlap))
        self.A = min(math.ceil(span / (span - overlap)), self.B)
        self.R = self.B - self.A
        self.cursor = start_size
        self.compensated = False
        self.startovers = 0
        self.layers = [[] for _ in range(num_layers)]
        self.seen = 0

    def slots_to_keep(self, n):
        """Per layer, the list of slots (``0 .. n-1``) kept after a call on ``n`` cached slots."""
        self.layers = [list(range(n)) for _ in range(self.L)]
        self.call()
        return self.layers

    def append(self, count):
        new = list(range(self.seen, self.seen + count))
        self.seen += count
        for lst in self.layers:
            lst.extend(new)

    def call(self):
        L, B, A, R, s = self.L, self.B, self.A, self.R, self.s
        n = len(self.layers[0])
        if n <= self.C:
            return
        if not self.compensated:
            self.C += R // 2
            self.compensated = True
        need = n - self.C
        if need <= 0:
            return
        room = self.C - self.cursor - L
        capacity = (room // A) * R
        startover = need > capacity
        groups = room // A if startover else math.ceil(need / R)
        step4 = []
        for i, lst in enumerate(self.layers):
            keep = lst[: self.cursor]
            for j in range(groups):
                for t in range(A):
                    keep.append(lst[self.cursor + B * j + (i % (R + 1)) + t])
            keep += lst[self.cursor + B * groups:]
            step4.append(keep)
        if not startover:
            self.layers = step4
            self.cursor += groups * A
            return
        self.startovers += 1
        need2 = need - capacity
        full = ((self.C - s - L) // A) * R
        times = math.ceil(need2 / full)
        B2 = B + (times - 1) * (B - 1)
        R2 = B2 - A
        groups2 = math.ceil(need2 / R2)
        step5 = []
        for i, lst in enumerate(step4):
            keep = lst[:s]
            for j in range(groups2):
                for k in range(A):
                    keep.append(lst[s + (i % (R2 + 1)) + B2 * j + times * k])
            keep += lst[s + B2 * groups2:]
            step5.append(keep)
        self.layers = step5
        self.cursor = s + groups2 * A
