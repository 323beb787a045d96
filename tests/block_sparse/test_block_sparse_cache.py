"""The metadata LRU: bounds, hit/miss counters, thread safety, and keys that include what metadata depends on."""

from __future__ import annotations

import threading

import pytest
import torch

from dilated_attention_pytorch.block_sparse import METADATA_CACHE, LRUCache, layout_digest
from dilated_attention_pytorch.block_sparse.cache import tensor_bytes
from dilated_attention_pytorch.block_sparse.functional import plan_for_layout


def test_bounded_and_evicts_least_recently_used():
    cache = LRUCache(maxsize=3)
    for i in range(3):
        cache.get_or_create(i, lambda i=i: i * 10)
    cache.get_or_create(0, lambda: -1)  # hit: 0 becomes most recent
    cache.get_or_create(3, lambda: 30)  # evicts 1
    assert len(cache) == 3 and 1 not in cache and 0 in cache and 3 in cache
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.size, stats.maxsize) == (1, 4, 3, 3)
    assert stats.nbytes == 0 and stats.max_bytes is None
    assert cache.get_or_create(0, lambda: -1) == 0
    cache.clear()
    assert len(cache) == 0 and cache.stats().hits == 0


def test_byte_bound_evicts_and_keeps_newest():
    cache = LRUCache(maxsize=10, max_bytes=100)
    for i in range(3):
        cache.get_or_create(i, lambda: torch.zeros(10), tensor_bytes)  # 40 bytes each
    assert len(cache) == 2 and 0 not in cache and cache.stats().nbytes == 80
    cache.get_or_create("big", lambda: torch.zeros(100), tensor_bytes)  # 400 bytes: alone over the bound
    assert len(cache) == 1 and "big" in cache and cache.stats().nbytes == 400


def test_tensor_bytes_of_metadata():
    layout = torch.ones(2, 4, 4, dtype=torch.bool)
    plan = plan_for_layout(layout, 2, 32, 8, False)
    assert tensor_bytes(plan) == sum(3 * c.heads.numel() * 8 for c in plan.calls)
    assert tensor_bytes((torch.zeros(3), [torch.zeros(2, dtype=torch.float64)])) == 12 + 16


def test_bad_maxsize():
    with pytest.raises(ValueError, match="maxsize must be an int >= 1"):
        LRUCache(0)


def test_thread_safety_and_single_value_per_key():
    cache = LRUCache(maxsize=8)
    results = []
    barrier = threading.Barrier(8)

    def worker(tid):
        barrier.wait()
        for i in range(200):
            results.append((i % 16, cache.get_or_create(i % 16, lambda i=i: object())))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert stats.size <= 8 and stats.hits + stats.misses == 8 * 200
    assert len(cache) <= 8


def test_digest_depends_on_content_and_shape():
    a = torch.zeros(2, 3, 3, dtype=torch.bool)
    b = a.clone()
    b[1, 2, 0] = True
    assert layout_digest(a) == layout_digest(a.clone())
    assert layout_digest(a) != layout_digest(b)
    assert layout_digest(a) != layout_digest(torch.zeros(3, 3, 2, dtype=torch.bool))


def test_digest_is_kept_while_the_layout_is_unchanged_and_follows_in_place_edits():
    layout = torch.rand(3, 6, 6) < 0.5
    first = layout_digest(layout)
    assert layout_digest(layout) == first
    layout[0, 1, 2] = not bool(layout[0, 1, 2])  # an in-place write: the version counter moves
    edited = layout_digest(layout)
    assert edited != first and edited == layout_digest(layout.clone())
    view = layout[1]
    view.fill_(True)  # a write through a view moves the base's counter too
    assert layout_digest(layout) == layout_digest(layout.clone()) != edited
    assert layout_digest(layout[:2]) == layout_digest(layout[:2].clone())  # a view hashes its own content


def test_plans_are_cached_by_content_block_size_and_causality():
    layout = torch.rand(2, 5, 5) < 0.5
    before = METADATA_CACHE.stats()
    p1 = plan_for_layout(layout, 2, 40, 8, False)
    p2 = plan_for_layout(layout.clone(), 2, 40, 8, False)  # same content, new tensor: hit
    assert p1 is p2
    p3 = plan_for_layout(layout, 2, 40, 8, True)  # causal: different metadata
    p4 = plan_for_layout(layout, 2, 37, 8, False)  # another length (last block shorter)
    assert p3 is not p1 and p4 is not p1
    after = METADATA_CACHE.stats()
    assert after.hits - before.hits >= 1 and after.misses - before.misses >= 3
