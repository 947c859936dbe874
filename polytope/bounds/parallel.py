"""Independent chunks of a batch on the CPU's cores.

The dual network of a chunk of examples (:func:`chunk_size`) runs hundreds of
small tensor operations; torch's intra-op threads split each of them and wait at its end, which
leaves cores idle between operations.  Running whole chunks side by side (torch releases the
GIL inside its kernels) keeps every core busy: 1.2-1.3x the throughput of intra-op threads alone
on a 2-core CPU (``benchmarks/``).  Results are the same numbers in the same order either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from polytope.model.ops import numel

T = TypeVar("T")

#: Bytes the largest per-chunk block of a dual pass (a layer's units times the inputs) may take.
CHUNK_BYTES = 8 << 20
#: The fewest and most examples per chunk on a CPU.
MIN_CHUNK, MAX_CHUNK = 16, 256


def chunk_size(shapes: list[tuple[int, ...]], x: torch.Tensor) -> int:
    """Examples per chunk of a batch ``x`` for a network with layer ``shapes`` (``[in, ..., out]``).

    On a CPU: as many as keep the largest dense block of the backward pass, ``units x inputs`` of one
    layer, within :data:`CHUNK_BYTES` (cache-sized, so every intermediate is reused from the
    allocator's free lists rather than page-faulted in), between :data:`MIN_CHUNK` and :data:`MAX_CHUNK`,
    and no more than one thread's share of the batch (one chunk per thread keeps every core busy
    when the machine is shared; a single chunk's intra-op threads wait at every operation): 16 on
    the paper's MNIST model (3,136 x 784 entries), up to 53 on a 784-50-50-50-10 network, where
    batches of 500 ran 1.5-2x faster than in chunks of 16.  On other devices the whole batch.
    """
    if x.device.type != "cpu":
        return max(x.shape[0], 1)
    per_example = max(numel(s) for s in shapes[1:]) * numel(shapes[0]) * x.element_size()
    share = -(-x.shape[0] // max(torch.get_num_threads(), 1))
    return max(MIN_CHUNK, min(MAX_CHUNK, share, CHUNK_BYTES // max(per_example, 1)))


def map_chunks(fn: Callable[[int], T], size: int, chunk: int, device: torch.device) -> list[T]:
    """``[fn(start) for start in range(0, size, chunk)]``, on ``torch.get_num_threads()`` threads on a CPU.

    Each worker thread runs under the caller's autograd mode (grad, no-grad or inference mode
    are thread-local in torch), so a graph built in the workers backpropagates from the caller.
    On other devices, with one thread or one chunk, or while something observes this thread
    (:func:`_observed`), the chunks run in order in this thread.
    """
    starts = list(range(0, max(size, 1), chunk))
    workers = min(torch.get_num_threads(), len(starts))
    if device.type != "cpu" or workers <= 1 or _observed():
        return [fn(s) for s in starts]
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(start: int) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(start)

    with ThreadPoolExecutor(workers, thread_name_prefix="polytope") as pool:
        return list(pool.map(run, starts))


def _observed() -> bool:
    """A torch dispatch or function mode (``FlopCounterMode``, fake tensors), the torch profiler, or a
    Python profiler or tracer (cProfile, coverage, a debugger) is active: all of them see this
    thread only, so work moved to other threads would escape them."""
    return (torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
            or torch.autograd.profiler._is_profiler_enabled or sys.getprofile() is not None
            or sys.gettrace() is not None)
