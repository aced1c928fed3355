"""AsyncEngine in-process: the engine thread, request groups, aborts, the waiting bound, calls on the engine thread."""

from __future__ import annotations

import asyncio

import pytest

from pie_engine.config import EngineConfig
from pie_engine.core.engine import LLMEngine
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.factory import create_engine
from pie_engine.server.async_engine import AsyncEngine, QueueFullError


@pytest.fixture
def engine(tiny_model) -> LLMEngine:
    return create_engine(EngineConfig(model=str(tiny_model("llama")), device="cpu", dtype="float32", block_size=4,
                                  num_device_blocks=64, max_num_seqs=2))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


async def _wait_for(pred, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_group_streams_deltas_equal_to_offline_generate(engine: LLMEngine) -> None:
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    expected = [o.text for o in engine.generate(prompts, greedy(12))]

    async def main() -> list[str]:
        ae = AsyncEngine(engine, max_waiting_requests=8)
        ae.start()
        group = ae.add_requests([(f"r-{i}", p, greedy(12)) for i, p in enumerate(prompts)])
        texts = ["", ""]
        async for out in group:
            texts[int(out.request_id[-1])] += out.delta_text
        await ae.shutdown(1.0)
        return texts

    assert asyncio.run(main()) == expected


def test_close_aborts_and_frees_blocks(engine: LLMEngine) -> None:
    async def main() -> None:
        ae = AsyncEngine(engine, max_waiting_requests=8)
        ae.start()
        group = ae.add_requests([("long", [5, 6, 7], greedy(200))])
        await group.__anext__()
        assert engine.block_manager.num_used_blocks > 0
        group.close()
        await _wait_for(lambda: ae.stats.num_running == 0 and ae.stats.kv_cache_usage == 0)
        assert not engine.has_unfinished_requests()
        await ae.shutdown(1.0)

    asyncio.run(main())


def test_waiting_bound_and_validation(engine: LLMEngine) -> None:
    async def main() -> None:
        ae = AsyncEngine(engine, max_waiting_requests=1)
        ae.start()
        running = []
        for i in range(2):  # max_num_seqs=2: both run; one at a time, as each counts as waiting until scheduled
            running.append(ae.add_requests([(f"run-{i}", [5, 6, 7], greedy(200))]))
            await _wait_for(lambda i=i: ae.stats.num_running == i + 1)
        waiting = ae.add_requests([("wait", [5, 6], greedy(5))])
        with pytest.raises(QueueFullError):
            ae.add_requests([("over", [5, 6], greedy(5))])
        with pytest.raises(ValueError, match="empty"):
            ae.add_requests([("empty", [], greedy(5))])
        for group in running:
            group.close()
        outs = [o async for o in waiting]
        assert outs[-1].finished and len(outs[-1].token_ids) == 5
        await ae.shutdown(1.0)

    asyncio.run(main())


def test_run_in_engine_shrinks_capacity_between_steps(engine: LLMEngine) -> None:
    # The two requests need 2 * 26 blocks of 4 tokens: they fit the 64 blocks, but not the 30 left after the shrink,
    # so one is preempted (recompute) and must still produce exactly the same tokens.
    prompts = [[5, 6, 7], [8, 9, 10]]
    expected = [o.token_ids for o in engine.generate(prompts, greedy(100))]
    assert engine.scheduler.num_preemptions_total == 0

    async def main() -> list[list[int]]:
        ae = AsyncEngine(engine, max_waiting_requests=8)
        ae.start()
        group = ae.add_requests([(f"r-{i}", p, greedy(100)) for i, p in enumerate(prompts)])
        outs: dict[str, list[int]] = {}
        resized = False
        async for out in group:
            if not resized:  # at the first token, long before the requests finish
                resized = True
                await ae.run_in_engine(lambda e: e.scheduler.set_num_blocks(30))
            if out.finished:
                outs[out.request_id] = list(out.token_ids)
        with pytest.raises(ValueError):
            await ae.run_in_engine(lambda e: e.scheduler.set_num_blocks(0))
        await ae.shutdown(1.0)
        return [outs["r-0"], outs["r-1"]]

    assert asyncio.run(main()) == expected
    assert engine.block_manager.num_blocks == 30 and engine.scheduler.num_preemptions_total > 0
