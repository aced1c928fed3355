"""NativeCopyEngine (C copy workers, no GIL): exact copies, prerequisites, link throttling, draining, bad input,
and the swapping KV cache's reference test running on it. Skips only where no C compiler can build it."""

from __future__ import annotations

import time

import pytest
import torch

from pie_engine.pie.copy import worker_lib as copy_worker_lib
from pie_engine.pie.copy.base import StepEntry
from pie_engine.pie.copy.factory import make_copy_engine
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.native import NativeCopyEngine, native_available
from pie_engine.pie.copy.tensors import kv_flat
from pie_engine.pie.copy.threads import ThreadCopyEngine
from pie_engine.pie.copy.trace import Trace
from pie_engine.pie.copy.worker_lib import unavailable_reason
from pie_engine.pie.swap_cache import LayerSwapKVCache
from tests.unit.engine.pie.kv_swap_driver import ToyDriver

pytestmark = pytest.mark.skipif(not native_available(),
                                reason=f"native copy engine unavailable: {unavailable_reason()}")
LAYERS, BLOCKS, BS, HEADS, DIM = 6, 12, 4, 2, 4


@pytest.fixture
def engines():
    made: list[NativeCopyEngine] = []

    def factory(**kw) -> NativeCopyEngine:
        made.append(NativeCopyEngine(**kw))
        return made[-1]

    yield factory
    for e in made:
        e.close()


def kv(nb: int, fill: str = "randn") -> torch.Tensor:
    return getattr(torch, fill)(2, nb, BS, HEADS, DIM)


def test_span_and_row_copies_are_exact(engines) -> None:
    eng = engines()
    src, dst = kv(7), kv(5, "zeros")  # different NB: the V plane starts at a different offset in each
    h = eng.swap_in(dst, src, 1, 4, slot_free=None, host_ready=None, layer=0, slot=0)
    eng.wait(h)
    want = torch.zeros_like(dst)
    want[:, 1:4] = src[:, 1:4]
    assert torch.equal(dst, want) and h.nbytes == 2 * 3 * src[0, 0].numel() * 4

    host = kv(9, "zeros")
    slots = torch.tensor([0, 3, 17, 19, 4 * 5 - 1])
    wb = eng.write_back(src, host, slots, slots, layer=1, slot=0)
    slots = torch.tensor([0, 0])  # the caller's index buffer may change at once: the job copied it
    eng.synchronize()
    assert wb.is_done() and wb.seconds is not None and wb.keep is None
    want = torch.zeros_like(host)
    idx = torch.tensor([0, 3, 17, 19, 19])
    kv_flat(want).index_copy_(1, idx, kv_flat(src).index_select(1, idx))
    assert torch.equal(host, want)
    stats = eng.end_step()
    assert stats.swap_in_bytes == h.nbytes and stats.swap_out_bytes == wb.nbytes and stats.copy_seconds > 0


def no_write_back(layer: int) -> None:
    return None


def test_whole_step_program_waits_for_each_fence(engines) -> None:
    """A step program queued at once: write-back i starts only once its layer is reported done (compute fence
    base + i + 1), and the swap-in behind it only after that write-back; both copy exactly. A fence left unpassed
    makes synchronize refuse instead of hang, and release lets everything finish."""
    eng = engines()
    slots = [kv(4), kv(4)]
    host_wb = [kv(4, "zeros"), kv(4, "zeros")]
    refill = kv(6)
    # Entry 1 has no refill (a wrapped prefetch that is switched off).
    prog = eng.step_program([StepEntry(0, 0, slots[0], host_wb[0], 2, refill),
                             StepEntry(1, 1, slots[1], host_wb[1], None, None)])
    refill_src = refill.clone()
    rows = torch.tensor([1, 6, 9])
    before = [s.clone() for s in slots]
    copies = prog.submit(3, rows, rows, no_write_back)
    wbs, ins = copies.write_backs, copies.swap_ins
    assert ins[1] is None and ins[0] is not None and len(wbs) == 2
    time.sleep(0.01)
    assert not any(w.is_done() for w in wbs) and not ins[0].is_done()  # every write-back waits
    with pytest.raises(RuntimeError, match="compute fence"):
        eng.synchronize()
    assert copies.layer_done(0) == (wbs[0], ins[0])
    eng.wait(ins[0])
    assert wbs[0].is_done() and not wbs[1].is_done()  # only the first fence was passed
    want = torch.zeros_like(host_wb[0])
    kv_flat(want).index_copy_(1, rows, kv_flat(before[0]).index_select(1, rows))
    assert torch.equal(host_wb[0], want)  # written back before the refill overwrote the slot
    assert torch.equal(slots[0][:, :3], refill_src[:, :3]) and torch.equal(slots[0][:, 3:], before[0][:, 3:])
    copies.release()
    eng.synchronize()
    kv_flat(want).zero_()
    kv_flat(want).index_copy_(1, rows, kv_flat(before[1]).index_select(1, rows))
    assert torch.equal(host_wb[1], want)
    stats = eng.end_step()
    assert stats.swap_out_bytes == sum(w.nbytes for w in wbs) and stats.swap_in_bytes == ins[0].nbytes
    with pytest.raises(ValueError, match="exceed"):
        prog.submit(5, rows, rows, no_write_back)  # the slots hold 4 blocks
    bad = prog.submit(1, torch.tensor([99]), torch.tensor([99]), no_write_back)
    bad.release()
    with pytest.raises(RuntimeError, match="copy of layer 0 failed"):
        bad.write_backs[0].wait_host()


def test_swap_in_waits_for_a_throttled_write_back(engines) -> None:
    """host_ready on the other direction: the swap-in cannot complete before the slow write-back did, and reads
    the rows it wrote."""
    eng = engines(link_out=LinkModel(latency_s=0.03))
    dev, host, back = kv(3), kv(3, "zeros"), kv(3, "zeros")
    slots = torch.tensor([1, 5, 6])
    wb = eng.write_back(dev, host, slots, slots, layer=0, slot=0)
    h = eng.swap_in(back, host, 0, 3, slot_free=None, host_ready=wb, layer=0, slot=1)
    counters = eng._sh.counters
    # Holds at any instant, however the threads are scheduled (no sleep-and-hope): the swap-in completes only after
    # the write-back, and its counter is read first.
    swapped_in, written_back = counters[0], counters[1]
    assert swapped_in <= written_back
    pending = not h.is_done()
    eng.wait(h)
    assert wb.is_done() and counters[1] == 1
    # The swap-in read what the write-back wrote (the host started as zeros): the order held.
    assert torch.equal(kv_flat(back)[:, slots], kv_flat(dev)[:, slots])
    assert kv_flat(back)[:, 0].abs().sum() == 0
    # A wait on a copy still queued behind the throttle is a stall; one the workers already finished is not (a
    # test thread descheduled for the 30 ms finds it done).
    assert eng.end_step().stall_seconds > 0 or not pending


def test_throttle_takes_at_least_the_modeled_time(engines) -> None:
    link = LinkModel(bandwidth_bytes_per_s=1e6, latency_s=0.002)
    eng = engines(link_in=link)
    src, dst = kv(4), kv(4, "zeros")
    t0 = time.perf_counter()
    h = eng.swap_in(dst, src, 0, 4, slot_free=None, host_ready=None, layer=0, slot=0)
    eng.wait(h)
    modeled = link.seconds(h.nbytes)
    assert time.perf_counter() - t0 >= modeled and h.seconds >= modeled
    assert eng.copy_seconds_total("in") >= modeled and torch.equal(dst, src)


def test_close_drains(engines) -> None:
    eng = NativeCopyEngine(link_in=LinkModel(latency_s=0.002))
    pairs = [(kv(2), kv(2, "zeros")) for _ in range(5)]
    handles = [eng.swap_in(d, s, 0, 2, slot_free=None, host_ready=None, layer=i, slot=0)
               for i, (s, d) in enumerate(pairs)]
    eng.close()
    assert all(h.is_done() for h in handles) and all(torch.equal(s, d) for s, d in pairs)
    eng.close()  # idempotent


def test_bad_input_is_rejected(engines) -> None:
    eng = engines()
    src, dst = kv(4), kv(4, "zeros")
    with pytest.raises(ValueError, match="contiguous"):
        eng.swap_in(dst, src.transpose(3, 4), 0, 2, slot_free=None, host_ready=None, layer=0, slot=0)
    with pytest.raises(ValueError, match="contiguous int64"):
        eng.write_back(src, dst, torch.arange(4)[::2], torch.arange(4)[::2], layer=0, slot=0)
    with pytest.raises(ValueError, match="outside"):
        eng.swap_in(dst, src, 0, 5, slot_free=None, host_ready=None, layer=0, slot=0)
    with pytest.raises(ValueError, match="differ"):
        eng.swap_in(dst.double(), src, 0, 2, slot_free=None, host_ready=None, layer=0, slot=0)
    # An out-of-range row fails in C without writing, surfaces at the waiter, and fails a swap-in that needed it.
    bad = eng.write_back(src, dst, torch.tensor([2, 99]), torch.tensor([2, 99]), layer=1, slot=0)
    after = eng.swap_in(kv(4, "zeros"), dst, 0, 4, slot_free=None, host_ready=bad, layer=1, slot=1)
    with pytest.raises(RuntimeError, match="out copy of layer 1 failed"):
        eng.wait(bad)
    with pytest.raises(RuntimeError, match="in copy of layer 1 failed"):
        eng.wait(after)
    assert dst.abs().sum() == 0
    with pytest.raises(ValueError, match="no Trace"):
        NativeCopyEngine(trace=Trace())


def test_make_copy_engine_choice(monkeypatch) -> None:
    cpu = torch.device("cpu")
    for env, trace, want in (("", None, NativeCopyEngine), ("threads", None, ThreadCopyEngine),
                             ("native", None, NativeCopyEngine), ("native", Trace(), ThreadCopyEngine)):
        monkeypatch.setenv("PIE_COPY_ENGINE", env)
        eng = make_copy_engine(cpu, trace=trace)
        eng.close()
        assert type(eng) is want
    monkeypatch.setattr(copy_worker_lib, "_lib", None)
    monkeypatch.setattr(copy_worker_lib, "_unavailable", "RuntimeError: no C compiler")
    monkeypatch.setenv("PIE_COPY_ENGINE", "native")
    with pytest.raises(RuntimeError, match="no C compiler"):
        make_copy_engine(cpu)
    monkeypatch.setenv("PIE_COPY_ENGINE", "")
    eng = make_copy_engine(cpu)
    eng.close()
    assert type(eng) is ThreadCopyEngine


@pytest.mark.parametrize(("m", "k", "link"), [(1, 1, None), (2, 2, None), (3, 3, None), (5, 1, None), (2, 4, None),
                                              (3, 2, LinkModel(bandwidth_bytes_per_s=2e7, latency_s=0.0005))])
def test_swapping_cache_matches_reference(monkeypatch, m: int, k: int, link: LinkModel | None) -> None:
    monkeypatch.setenv("PIE_COPY_ENGINE", "native")
    cache = LayerSwapKVCache(LAYERS, BLOCKS, BS, HEADS, DIM, torch.float32, torch.device("cpu"), layers_on_host=m,
                             num_staging=k, link_in=link, link_out=link)
    try:
        assert isinstance(cache.engine, NativeCopyEngine)
        driver = ToyDriver(cache, seed=m * 10 + k)
        for _ in range(25 if link is None else 10):
            driver.step()
        driver.reconfigure(max(0, m - 1))
        for _ in range(5):
            driver.step()
        assert driver.reads > 0 and cache.swap_in_bytes_total > 0 and cache.swap_out_bytes_total > 0
        if link is not None:
            assert cache.swap_stall_seconds_total > 0
    finally:
        cache.close()
