"""Adversarial numerics (issue 13): the strided-view memo is a bounded, locked LRU."""

from __future__ import annotations

import threading

import torch

from dilated_attention_pytorch.engine import _ViewMemo


# ---- item 9: the strided-view memo is a bounded, thread-safe LRU -------------------------------------


def test_view_memo_evicts_least_recently_used():
    memo = _ViewMemo(maxsize=3)
    builds = []
    x = torch.randn(4, 6)

    def call(i):
        return memo(x, ("col", i), lambda t: (builds.append(i), t[:, i])[1])

    for i in range(3):
        call(i)
    call(0)  # remembered: no build; now the most recent
    call(3)  # full: evicts the least recently used (1), not everything
    builds.clear()
    for i in (0, 2, 3):
        assert torch.equal(call(i), x[:, i])
    assert builds == []
    call(1)
    assert builds == [1]


def test_view_memo_is_thread_safe():
    """Eight threads, more layouts than the memo holds: every view is right, the memo stays bounded."""
    memo = _ViewMemo(maxsize=8)
    barrier = threading.Barrier(8)
    errors = []

    def worker(seed):
        gen = torch.Generator().manual_seed(seed)
        barrier.wait()
        try:
            for _ in range(300):
                rows = int(torch.randint(2, 6, (1,), generator=gen))
                start = int(torch.randint(0, 3, (1,), generator=gen))
                x = torch.randn(rows + 3, 5)[start:]
                got = memo(x, ("narrow", rows), lambda t, r=rows: t.narrow(0, 0, r).t())
                if not (torch.equal(got, x[:rows].t()) and got.stride() == x[:rows].t().stride()):
                    errors.append("wrong view")
        except Exception as e:  # a failure in a thread must reach the test
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(memo._specs) <= 8
