"""Chunks of a batch on several threads (:mod:`polytope.bounds.parallel`): same numbers, same gradients."""

from __future__ import annotations

import pytest
import torch
from strategies import DTYPE, ConvSpec, build_conv

import polytope as pt
from polytope.bounds import parallel
from polytope.bounds.parallel import MIN_CHUNK, chunk_size, map_chunks


@pytest.fixture
def two_threads(monkeypatch):
    """Two torch threads, and chunks of the smallest size (the test network is tiny)."""
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 0)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_chunk_size_follows_the_largest_dense_block_and_the_threads():
    x32 = torch.zeros(1, 1, 28, 28).expand(4096, 1, 28, 28)
    assert chunk_size([(1, 28, 28), (16, 14, 14), (32, 7, 7), (100,), (10,)], x32) == MIN_CHUNK  # MNIST
    assert chunk_size([(784,), (50,), (50,), (50,), (10,)], x32) == parallel.CHUNK_BYTES // (50 * 784 * 4)
    assert chunk_size([(784,), (50,), (10,)], x32.double()) == parallel.CHUNK_BYTES // (50 * 784 * 8)
    assert chunk_size([(2,), (4,), (3,)], x32) == parallel.MAX_CHUNK
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert chunk_size([(2,), (4,), (3,)], x32[:100]) == 50  # one chunk per thread
        assert chunk_size([(2,), (4,), (3,)], x32[:20]) == MIN_CHUNK
    finally:
        torch.set_num_threads(threads)


def _case():
    seq = build_conv((1, 8, 8), [ConvSpec(3, 3, 2, 1, True), ConvSpec(4, 3, 1, 1, True)], [10], 4, seed=3)
    x = torch.rand(3 * MIN_CHUNK - 2, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    y = torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    return seq, pt.Network.from_torch(seq), x, y


def _margins_and_grads(slopes: str):
    seq, net, x, y = _case()
    seq.zero_grad()
    loss, _ = pt.robust_loss(net, x, y, pt.LinfBall(0.05), slopes=slopes)
    loss.backward()
    with torch.no_grad():
        margins = pt.margin_bounds(net, x, y, pt.LinfBall(0.05), slopes=slopes)
    return margins, [p.grad.clone() for p in seq.parameters()]


@pytest.mark.parametrize("slopes", ["fixed", "adaptive"])
def test_threads_give_the_serial_numbers_and_gradients(slopes, two_threads):
    threaded, grads = _margins_and_grads(slopes)
    torch.set_num_threads(1)
    serial, grads_1 = _margins_and_grads(slopes)
    torch.testing.assert_close(threaded, serial, atol=1e-12, rtol=1e-12)
    for g, g1 in zip(grads, grads_1, strict=True):
        torch.testing.assert_close(g, g1, atol=1e-12, rtol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads)


def test_workers_run_under_the_callers_autograd_mode(two_threads):
    _, net, x, y = _case()
    with torch.no_grad():
        assert not pt.margin_bounds(net, x, y, pt.LinfBall(0.05)).requires_grad
    with torch.inference_mode():
        assert pt.margin_bounds(net, x, y, pt.LinfBall(0.05)).is_inference()
    x = x.clone().requires_grad_(True)
    assert pt.margin_bounds(net, x, y, pt.LinfBall(0.05)).requires_grad


def test_chunks_keep_their_order_and_errors_reach_the_caller(two_threads):
    device = torch.device("cpu")
    assert map_chunks(lambda s: s, 20, 8, device) == [0, 8, 16]
    assert map_chunks(lambda s: s, 0, 8, device) == [0]

    def fail(start: int) -> int:
        if start == 8:
            raise pt.InvalidInputError("chunk 8")
        return start

    with pytest.raises(pt.InvalidInputError, match="chunk 8"):
        map_chunks(fail, 20, 8, device)


def test_observed_calls_run_in_the_callers_thread(two_threads):
    """A dispatch mode (here the FLOP counter) sees the work of a serial run: no chunk escapes it.

    (Equal to a few units: intra-op threads round reductions differently, which can move a unit
    across a bound and change a padded size.)"""
    from torch.utils.flop_counter import FlopCounterMode

    _, net, x, y = _case()
    counts = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pt.margin_bounds(net, x, y, pt.LinfBall(0.05), slopes="adaptive")
        counts.append(counter.get_total_flops())
    assert counts[1] > 0 and abs(counts[0] - counts[1]) <= 0.01 * counts[1]
