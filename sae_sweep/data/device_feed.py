"""Batches moved to the training device ahead of use, so the host->device copy hides behind compute.

On CUDA a training step is short enough that a plain `x.to(device)` of each batch leaves the GPU idle
while the batch crosses PCIe. DeviceFeed issues the copy of batch n+1 (up to `depth` batches ahead) on a
side stream while the step on batch n runs on the compute stream, and makes the compute stream wait on
that copy's event only when the batch is handed out. The host batch is first put in pinned (page-locked)
memory: only a copy from pinned memory is truly asynchronous, from pageable memory CUDA stages it through
a bounce buffer and the `non_blocking` copy blocks the host. On any other device the feed adds nothing.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

Batch = tuple[int, int, torch.Tensor]


class _CudaOps:
    """The CUDA side of DeviceFeed (pin, copy on a side stream, wait); tests swap in a CPU fake."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def pin(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_pinned() else x.pin_memory()

    def copy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.copy_stream):
            x_dev = x.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return x_dev, event

    def wait(self, x_dev: torch.Tensor, event: torch.cuda.Event) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)  # a GPU-side wait: the host does not block
        # x_dev was allocated on the copy stream; without this the caching allocator could hand its
        # memory out again as soon as the copy stream moves on, while compute still reads it.
        x_dev.record_stream(compute)


class _InFlight(NamedTuple):
    epoch: int
    batch: int
    x_dev: torch.Tensor
    event: Any
    # The pinned source, referenced while the copy may still read it; after hand-out the caching host
    # allocator that pinned memory comes from keeps the block until the copy's event has completed.
    host: torch.Tensor


class _HostStage:
    """Runs the wrapped iterator and the pinning in a thread, up to `depth` batches ahead. Gathering a
    batch out of the shuffle buffer and copying it into pinned memory are host memcpys (12 MB a batch at
    d_in 768) that would otherwise sit on the training loop's thread between GPU steps; torch releases
    the GIL inside both."""

    _END = object()

    def __init__(self, batches: Iterator[Batch], prepare: Any, depth: int) -> None:
        self.batches, self.prepare = batches, prepare
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.ended = False
        self.thread = threading.Thread(target=self._run, name="device-feed", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for epoch, batch, x in self.batches:
                if not self._put((epoch, batch, self.prepare(x))):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def __next__(self) -> Batch:
        if self.ended:
            raise StopIteration
        item = self.queue.get()
        if item is self._END:
            self.ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (unblocking it), then close the wrapped iterator from this thread."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


class DeviceFeed:
    """Wraps an iterator of (epoch, batch_in_epoch, x_cpu) and yields (epoch, batch_in_epoch, x_on_device)."""

    def __init__(
        self, batches: Iterator[Batch], device: torch.device, depth: int = 2, host_thread: bool = True
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.batches = batches
        self.device = torch.device(device)
        self.depth = depth
        self.host_thread = host_thread  # CUDA: gather and pin in a background thread (_HostStage)
        self._ops = _CudaOps(self.device) if self.device.type == "cuda" else None
        self._host: _HostStage | None = None
        self._in_flight: deque[_InFlight] = deque()
        self._exhausted = False
        self._closed = False

    def __iter__(self) -> DeviceFeed:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if self._ops is None:
            epoch, batch, x = next(self.batches)
            return epoch, batch, x.to(self.device)  # the same tensor object when it is already there
        self._fill(1)
        if not self._in_flight:
            raise StopIteration
        head = self._in_flight.popleft()
        # Issue the next copies before returning, so they run while the caller computes on head.
        self._fill(self.depth)
        self._ops.wait(head.x_dev, head.event)
        return head.epoch, head.batch, head.x_dev

    def _fill(self, n: int) -> None:
        """Pull and start copying batches until n are in flight or the wrapped iterator ends."""
        assert self._ops is not None
        if self.host_thread and self._host is None:
            self._host = _HostStage(self.batches, self._ops.pin, self.depth)
        while len(self._in_flight) < n and not self._exhausted:
            try:
                if self._host is not None:
                    epoch, batch, host = next(self._host)  # already pinned, in the thread
                else:
                    epoch, batch, x = next(self.batches)
                    host = self._ops.pin(x)
            except StopIteration:
                self._exhausted = True  # the batches in flight are still handed out, then StopIteration
                return
            x_dev, event = self._ops.copy(host)
            self._in_flight.append(_InFlight(epoch, batch, x_dev, event, host))

    def close(self) -> None:
        """Stop: drop the batches in flight and close the wrapped iterator (its reader thread); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._in_flight.clear()
        if self._host is not None:
            self._host.close()  # closes the wrapped iterator once its thread has stopped
            return
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
