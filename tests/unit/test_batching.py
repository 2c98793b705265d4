"""`Coalescer`: concurrent callers share batches, and each still gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from command_api.batching import Coalescer


class Recorder:
    """A batch function that doubles numbers, slowly, and remembers what it saw."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.fail_next = False

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("batch failed")
            return [2 * i for i in items]
        finally:
            self.running -= 1


async def test_concurrent_callers_share_round_trips_and_get_their_own_results() -> None:
    run = Recorder()
    sizes: list[int] = []
    coalescer = Coalescer(run, max_in_flight=2, on_batch=sizes.append)
    results = await asyncio.gather(*(coalescer(i) for i in range(100)))
    assert results == [2 * i for i in range(100)]
    assert sorted(i for batch in run.batches for i in batch) == list(range(100))
    assert len(run.batches) <= 3  # the first item goes alone, the rest wait for it
    assert run.most_running <= 2
    assert sizes == [len(b) for b in run.batches] and sum(sizes) == 100


async def test_a_lone_call_is_not_delayed_by_waiting_for_company() -> None:
    run = Recorder(delay=0)
    coalescer = Coalescer(run)
    assert await asyncio.wait_for(coalescer(21), 1) == 42
    assert run.batches == [[21]]


async def test_batches_stay_within_max_batch_and_max_in_flight() -> None:
    run = Recorder()
    coalescer = Coalescer(run, max_batch=3, max_in_flight=1)
    assert await asyncio.gather(*(coalescer(i) for i in range(10))) == [2 * i for i in range(10)]
    assert max(len(b) for b in run.batches) <= 3
    assert run.most_running == 1


async def test_a_failed_batch_fails_its_callers_only() -> None:
    run = Recorder()
    coalescer = Coalescer(run, max_in_flight=1)
    run.fail_next = True
    first = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0)  # the first batch is under way; these two wait for the next
    rest = [asyncio.ensure_future(coalescer(i)) for i in (2, 3)]
    with pytest.raises(RuntimeError, match="batch failed"):
        await first
    assert await asyncio.gather(*rest) == [4, 6]


async def test_a_cancelled_caller_leaves_the_rest_of_its_batch_alone() -> None:
    run = Recorder(delay=0.05)
    coalescer = Coalescer(run)
    calls = [asyncio.ensure_future(coalescer(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    calls[2].cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert [d for i, d in enumerate(done) if i != 2] == [0, 2, 6, 8]
