"""DeviceFeed: a pass-through on CPU; on CUDA (driven here through a CPU fake of its stream/event ops)
order and values are kept, copies run a bounded `depth` ahead, and each batch is waited on before use."""

import weakref
from typing import Any, cast

import pytest
import torch

from sae_sweep.data import device_feed
from sae_sweep.data.device_feed import DeviceFeed

CUDA = torch.device("cuda")


def positions(n, per_epoch=3):
    return [(i // per_epoch, i % per_epoch) for i in range(n)]


def make_batches(n, per_epoch=3):
    """Batches whose every value is the batch's global index, crossing epoch boundaries."""
    return [(e, b, torch.full((4, 5), float(i))) for i, (e, b) in enumerate(positions(n, per_epoch))]


class Tracked:
    """An iterator over batches that counts pulls and, like a generator, notices close()."""

    def __init__(self, batches):
        self.batches = batches
        self.pulled = 0
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.pulled == len(self.batches):
            raise StopIteration
        self.pulled += 1
        return self.batches[self.pulled - 1]

    def close(self):
        self.closed = True


class FakeOps:
    """Stands in for _CudaOps with CPU tensors and records what DeviceFeed asks of it."""

    instances: list["FakeOps"] = []

    def __init__(self, device):
        self.device = device
        self.log = []  # ("pin" | "copy" | "wait", batch index)
        self.events = {}  # id(x_dev) -> the event its copy recorded
        self.hosts = {}  # id(x_dev) -> weakref to the pinned source of its copy
        self.waited = set()  # ids of x_dev the compute stream waited on
        FakeOps.instances.append(self)

    def pin(self, x):
        self.log.append(("pin", int(x[0, 0])))
        return x.clone()  # a new tensor, as pin_memory() makes

    def copy(self, x):
        self.log.append(("copy", int(x[0, 0])))
        x_dev, event = x.clone(), object()
        self.events[id(x_dev)] = event
        self.hosts[id(x_dev)] = weakref.ref(x)
        return x_dev, event

    def wait(self, x_dev, event):
        self.log.append(("wait", int(x_dev[0, 0])))
        assert self.events[id(x_dev)] is event, "waited on another batch's event"
        assert self.hosts[id(x_dev)]() is not None, "pinned source freed before the batch was handed out"
        self.waited.add(id(x_dev))

    def count(self, kind):
        return sum(1 for k, _ in self.log if k == kind)


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeOps.instances = []
    monkeypatch.setattr(device_feed, "_CudaOps", FakeOps)
    return FakeOps.instances


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_cuda_path_keeps_order_values_and_bounded_lookahead(fake_cuda, depth, n):
    source = Tracked(make_batches(n))
    feed = DeviceFeed(source, CUDA, depth=depth, host_thread=False)
    (ops,) = fake_cuda
    out = []
    for epoch, batch, x in feed:
        out.append((epoch, batch, x))
        # The batch handed out plus `depth` more are copied (the overlap), and never further ahead.
        assert ops.count("copy") == source.pulled == min(len(out) + depth, n)
        assert id(x) in ops.waited, "handed out before the compute stream waited on its copy"
        assert ops.log[-1] == ("wait", len(out) - 1), "the wait must be the last thing before hand-out"
    assert [(e, b) for e, b, _ in out] == positions(n)
    for i, (_, _, x) in enumerate(out):
        assert torch.equal(x, torch.full((4, 5), float(i)))
    # Each batch pinned, then copied, then waited on, and no batch twice.
    for i in range(n):
        kinds = [k for k, j in ops.log if j == i]
        assert kinds == ["pin", "copy", "wait"]
    with pytest.raises(StopIteration):
        next(feed)
    with pytest.raises(StopIteration):
        next(feed)


def test_cuda_path_copies_the_pinned_tensor_not_the_source(fake_cuda):
    pinned = []

    class PinRecorder(FakeOps):
        def pin(self, x):
            out = super().pin(x)
            pinned.append(out)
            return out

        def copy(self, x):
            assert any(x is p for p in pinned), "copied from pageable memory"
            return super().copy(x)

    feed = DeviceFeed(iter(make_batches(4)), CUDA, depth=2, host_thread=False)
    feed._ops = cast(Any, PinRecorder(CUDA))  # a fake of the private CUDA ops
    assert len(list(feed)) == 4 and len(pinned) == 4


def test_close_closes_the_wrapped_generator(fake_cuda):
    state = {"finally": False, "yielded": 0}

    def gen():
        try:
            for batch in make_batches(100):
                state["yielded"] += 1
                yield batch
        finally:
            state["finally"] = True

    feed = DeviceFeed(gen(), CUDA, depth=2, host_thread=False)
    assert next(feed)[:2] == (0, 0)
    assert state == {"finally": False, "yielded": 3}
    feed.close()
    assert state["finally"]
    feed.close()  # idempotent
    with pytest.raises(StopIteration):
        next(feed)
    assert state["yielded"] == 3


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_close_once_and_without_a_close_method(fake_cuda, device):
    source = Tracked(make_batches(5))
    feed = DeviceFeed(source, torch.device(device))
    next(feed)
    feed.close()
    assert source.closed
    source.closed = False
    feed.close()
    assert not source.closed, "close() reached the wrapped iterator twice"
    DeviceFeed(iter(make_batches(2)), torch.device(device)).close()  # a list iterator has no close()


@pytest.mark.parametrize("host_thread", [False, True])
def test_errors_from_the_wrapped_iterator_propagate(fake_cuda, host_thread):
    def broken():
        yield from make_batches(2)
        raise RuntimeError("shard unreadable")

    with pytest.raises(RuntimeError, match="shard unreadable"):
        list(DeviceFeed(broken(), CUDA, depth=1, host_thread=host_thread))


def test_host_thread_gathers_and_pins_off_the_loop_in_order(fake_cuda):
    import threading

    pin_threads = []

    class ThreadRecorder(FakeOps):
        def pin(self, x):
            pin_threads.append(threading.current_thread())
            return super().pin(x)

    source = Tracked(make_batches(11))
    feed = DeviceFeed(source, CUDA, depth=2)
    feed._ops = cast(Any, ThreadRecorder(CUDA))
    out = list(feed)
    assert [(e, b) for e, b, _ in out] == positions(11)
    for i, (_, _, x) in enumerate(out):
        assert torch.equal(x, torch.full((4, 5), float(i)))
    assert len(pin_threads) == 11 and threading.main_thread() not in pin_threads
    with pytest.raises(StopIteration):
        next(feed)
    feed.close()
    assert source.closed


def test_close_stops_a_host_thread_blocked_on_a_full_queue(fake_cuda):
    import time

    state = {"finally": False, "yielded": 0}

    def endless():
        try:
            i = 0
            while True:
                state["yielded"] += 1
                yield 0, i, torch.full((4, 5), float(i))
                i += 1
        finally:
            state["finally"] = True

    feed = DeviceFeed(endless(), CUDA, depth=2)
    assert next(feed)[1] == 0
    time.sleep(0.2)  # the thread fills its queue and blocks
    ahead = state["yielded"]
    assert ahead <= 1 + 2 + 2 + 1  # handed out + copies in flight + queue + the one it holds
    feed.close()
    assert state["finally"] and feed._host is not None and not feed._host.thread.is_alive()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        DeviceFeed(iter([]), torch.device("cpu"), depth=0)


def test_cpu_is_a_pass_through(monkeypatch):
    def no_pin(self, *args, **kwargs):
        raise AssertionError("pin_memory called on the CPU path")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pin)
    batches = make_batches(7)
    source = Tracked(batches)
    feed = DeviceFeed(source, torch.device("cpu"), depth=3)
    assert feed._ops is None
    for i, got in enumerate(feed):
        assert source.pulled == i + 1, "the CPU path must not read ahead"
        assert got[:2] == batches[i][:2] and got[2] is batches[i][2]
    with pytest.raises(StopIteration):
        next(feed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_path(monkeypatch):
    device = torch.device("cuda")
    pins = []
    real_pin = torch.Tensor.pin_memory

    def counting_pin(self, *args, **kwargs):
        pins.append(self)
        return real_pin(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", counting_pin)
    n = 9
    batches = make_batches(n)
    batches[4] = (*batches[4][:2], real_pin(batches[4][2]))  # already pinned: used as it is
    feed = DeviceFeed(iter(batches), device, depth=2)
    out = []
    for epoch, batch, x in feed:
        assert x.device.type == "cuda"
        y = (x @ torch.ones(5, 5, device=device)).sum()  # compute on the current stream while copies run
        out.append((epoch, batch, x.cpu(), float(y)))
    assert [(e, b) for e, b, _, _ in out] == positions(n)
    for i, (_, _, x, y) in enumerate(out):
        assert torch.equal(x, torch.full((4, 5), float(i)))
        assert y == pytest.approx(100.0 * i)
    assert len(pins) == n - 1
    feed.close()
