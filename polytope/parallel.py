"""Independent chunks of a batch on the CPU's cores.

The dual network of a chunk of :data:`polytope.robust.MARGIN_CHUNK` examples runs hundreds of
small tensor operations; torch's intra-op threads split each of them and wait at its end, which
leaves cores idle between operations.  Running whole chunks side by side (torch releases the
GIL inside its kernels) keeps every core busy: 1.2-1.3x the throughput of intra-op threads alone
on a 2-core CPU (``benchmarks/``).  Results are the same numbers in the same order either way.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def map_chunks(fn: Callable[[int], T], size: int, chunk: int, device: torch.device) -> list[T]:
    """``[fn(start) for start in range(0, size, chunk)]``, on ``torch.get_num_threads()`` threads on a CPU.

    Each worker thread runs under the caller's autograd mode (grad, no-grad or inference mode
    are thread-local in torch), so a graph built in the workers backpropagates from the caller.
    On other devices, or with one thread or one chunk, the chunks run in order in this thread.
    """
    starts = list(range(0, max(size, 1), chunk))
    workers = min(torch.get_num_threads(), len(starts))
    if device.type != "cpu" or workers <= 1:
        return [fn(s) for s in starts]
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(start: int) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(start)

    with ThreadPoolExecutor(workers, thread_name_prefix="polytope") as pool:
        return list(pool.map(run, starts))
