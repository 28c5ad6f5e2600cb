"""Overload control: bounded running and waiting calls, fast rejection, deadlines, no lost slots."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import CollectorRegistry

from service.core import errors
from service.edge.admission import Admission
from service.edge.deadline import DeadlineBoundBackend, backend_timeout, bounded, remaining


def run(coro):
    return asyncio.run(coro)


def test_calls_beyond_inflight_and_queue_are_rejected_at_once():
    async def main():
        admission = Admission(2, 3)
        release = asyncio.Event()
        started = 0

        async def call():
            nonlocal started
            async with admission.slot(None):
                started += 1
                await release.wait()

        tasks = [asyncio.create_task(call()) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert (admission.running, admission.queued, started) == (2, 3, 2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(errors.Overloaded):
            await call()
        assert loop.time() - t0 < 0.05
        release.set()
        await asyncio.gather(*tasks)
        assert (admission.running, admission.queued, started) == (0, 0, 5)

    run(main())


def test_waiters_are_served_first_in_first_out():
    async def main():
        admission = Admission(1, 10)
        order: list[int] = []
        gate = asyncio.Event()

        async def call(i: int):
            async with admission.slot(None):
                order.append(i)
                await gate.wait()

        tasks = [asyncio.create_task(call(i)) for i in range(6)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)
        assert order == list(range(6))

    run(main())


def test_a_waiter_gives_up_at_its_deadline_and_frees_its_place():
    async def main():
        admission = Admission(1, 1)
        hold = asyncio.Event()

        async def holder():
            async with admission.slot(None):
                await hold.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        with pytest.raises(errors.DeadlineExceeded):
            async with admission.slot(0.05):
                pass
        assert admission.queued == 0
        hold.set()
        await task
        async with admission.slot(0.05):
            assert admission.running == 1

    run(main())


def test_no_slot_is_lost_under_random_cancellations_and_timeouts():
    async def main():
        rng = random.Random(5)
        admission = Admission(3, 6, CollectorRegistry())
        outcomes = {"ok": 0, "overloaded": 0, "deadline": 0, "cancelled": 0}

        async def call():
            try:
                async with admission.slot(rng.choice([None, 0.001, 0.01, 0.05])):
                    await asyncio.sleep(rng.random() * 0.01)
                outcomes["ok"] += 1
            except errors.Overloaded:
                outcomes["overloaded"] += 1
            except errors.DeadlineExceeded:
                outcomes["deadline"] += 1

        tasks = []
        for _ in range(600):
            tasks.append(asyncio.create_task(call()))
            if rng.random() < 0.2:
                rng.choice(tasks).cancel()
            await asyncio.sleep(rng.random() * 0.001)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        outcomes["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
        assert (admission.running, admission.queued) == (0, 0), outcomes
        assert outcomes["ok"] > 0 and outcomes["overloaded"] > 0, outcomes
        # all slots still usable
        async with admission.slot(None), admission.slot(None), admission.slot(None):
            assert admission.running == 3

    run(main())


def test_zero_queue_rejects_everything_beyond_inflight():
    async def main():
        admission = Admission(1, 0)
        async with admission.slot(None):
            with pytest.raises(errors.Overloaded):
                async with admission.slot(None):
                    pass

    run(main())


# --------------------------------------------------------------------------- deadlines
class RecordingBackend:
    name = "fake"
    retry_start = True

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def infer(self, model, inputs, outputs, timeout=None):
        self.timeouts.append(timeout)
        return {}


def test_backend_timeout_is_the_smaller_of_configured_and_remaining():
    async def main():
        backend = DeadlineBoundBackend(RecordingBackend())
        assert backend.name == "fake" and backend.retry_start  # everything else is delegated
        await backend.infer("m", {}, [], 30.0)                  # outside a call: unchanged
        with bounded(2.0):
            await backend.infer("m", {}, [], 30.0)
            await backend.infer("m", {}, [], 0.5)
            await asyncio.to_thread(lambda: None)
            assert 1.5 < remaining() <= 2.0
        with bounded(None):
            await backend.infer("m", {}, [], 30.0)
        t = backend.inner.timeouts
        assert t[0] == 30.0 and 1.9 < t[1] <= 2.0 and t[2] == 0.5 and t[3] == 30.0
        assert remaining() is None

    run(main())


def test_a_passed_deadline_stops_backend_work_before_it_starts():
    with bounded(-0.1), pytest.raises(errors.DeadlineExceeded):
        backend_timeout(30.0)


def test_deadlines_do_not_leak_between_concurrent_calls():
    async def main():
        async def call(seconds):
            with bounded(seconds):
                await asyncio.sleep(0.01)
                return remaining()

        short, none, long = await asyncio.gather(call(1.0), call(None), call(100.0))
        assert short < 1.0 and none is None and long > 99.0

    run(main())
