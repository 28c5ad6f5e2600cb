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


# --------------------------------------------------------------------------- memory budget
GIB = 1 << 30


def test_calls_wait_until_their_memory_fits_and_nothing_overtakes_a_big_one():
    async def main():
        admission = Admission(4, 8, memory_budget=10 * GIB)
        order: list[str] = []
        gates = {name: asyncio.Event() for name in ("a", "big", "small")}

        async def call(name, memory):
            async with admission.slot(None, memory=memory):
                order.append(name)
                await gates[name].wait()

        a = asyncio.create_task(call("a", 6 * GIB))
        await asyncio.sleep(0)
        big = asyncio.create_task(call("big", 8 * GIB))      # does not fit next to a: waits
        await asyncio.sleep(0)
        small = asyncio.create_task(call("small", 1 * GIB))  # would fit, but is behind big
        await asyncio.sleep(0.01)
        assert order == ["a"] and admission.queued == 2 and admission.memory_used == 6 * GIB
        gates["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "big", "small"] and admission.memory_used == 9 * GIB
        gates["big"].set(), gates["small"].set()
        await asyncio.gather(a, big, small)
        assert (admission.running, admission.queued, admission.memory_used) == (0, 0, 0)

    run(main())


def test_a_call_that_alone_needs_more_than_the_budget_is_refused_with_the_figure():
    async def main():
        registry = CollectorRegistry()
        admission = Admission(2, 2, registry, memory_budget=2 * GIB)
        with pytest.raises(errors.ResourceExhausted) as info:
            async with admission.slot(None, memory=3 * GIB):
                pass
        assert "3072 MiB" in info.value.message and "2048 MiB" in info.value.message
        assert info.value.reason == "request_memory" and info.value.retry_after_s is None
        assert registry.get_sample_value("medseg_admission_rejected_total", {"reason": "request_memory"}) == 1
        per_call = Admission(2, 2, memory_budget=8 * GIB, max_request_memory=GIB)
        with pytest.raises(errors.ResourceExhausted, match="--max-request-memory-bytes"):
            async with per_call.slot(None, memory=2 * GIB):
                pass
        # a worst-case guess (header unreadable) is charged up to what one call may have, not refused
        async with per_call.slot(None, memory=5 * GIB, exact=False):
            assert per_call.memory_used == GIB

    run(main())


def test_a_running_call_grows_its_charge_ahead_of_new_calls():
    async def main():
        admission = Admission(4, 4, memory_budget=4 * GIB)
        release_other = asyncio.Event()
        grown = asyncio.Event()
        grants = []

        async def other():
            async with admission.slot(None, memory=3 * GIB):
                await release_other.wait()

        async def follow_up():
            async with admission.slot(None, memory=GIB // 4) as grant:
                grants.append(grant)
                await grant.grow(2 * GIB)  # its image size became known: needs more
                grown.set()
                assert admission.memory_used >= 2 * GIB

        async def newcomer():
            async with admission.slot(None, memory=GIB):
                assert grown.is_set()  # did not overtake the waiting grower

        o = asyncio.create_task(other())
        await asyncio.sleep(0)
        f = asyncio.create_task(follow_up())
        await asyncio.sleep(0.01)
        n = asyncio.create_task(newcomer())
        await asyncio.sleep(0.01)
        assert not grown.is_set()
        release_other.set()
        await asyncio.gather(o, f, n)
        assert admission.memory_used == 0 and admission.running == 0

    run(main())


# --------------------------------------------------------------------------- abandoned work
class FakeWork:
    """What admission needs of service.inference.work.CallWork."""

    def __init__(self, running: int = 0) -> None:
        self.running, self.abandoned = running, False
        self._idle = []

    def abandon(self):
        self.abandoned = True

    def when_idle(self, callback):
        if self.running == 0:
            callback()
        else:
            self._idle.append(callback)

    def finish(self):
        self.running = 0
        for callback in self._idle:
            callback()


def test_an_abandoned_call_keeps_its_slot_until_its_thread_ends_and_caps_new_work():
    async def main():
        registry = CollectorRegistry()
        admission = Admission(2, 4, registry, memory_budget=4 * GIB, max_abandoned=1)
        stuck = FakeWork(running=1)

        async def gives_up():
            async with admission.slot(None, memory=GIB, work=stuck):
                raise TimeoutError  # the deadline passed while its thread still runs

        with pytest.raises(TimeoutError):
            await gives_up()
        assert stuck.abandoned  # told to stop at its next check
        assert (admission.running, admission.abandoned, admission.memory_used) == (1, 1, GIB)
        with pytest.raises(errors.Overloaded) as info:  # the cap on abandoned work: refused at once
            async with admission.slot(None):
                pass
        assert info.value.reason == "abandoned" and info.value.retry_after_s > 0
        assert registry.get_sample_value("medseg_admission_abandoned") == 1
        stuck.finish()  # the thread really ended
        assert (admission.running, admission.abandoned, admission.memory_used) == (0, 0, 0)
        async with admission.slot(None):
            assert admission.running == 1

    run(main())


def test_with_real_call_work_the_slot_comes_back_when_the_thread_stops_at_its_check():
    import threading

    from service.inference import work

    async def main():
        admission = Admission(1, 1, max_abandoned=4)
        calls = work.CallWork()
        started, stopped = threading.Event(), threading.Event()

        def busy():
            started.set()
            try:
                while True:  # a long step checking between its parts
                    calls.check("the next part")
                    threading.Event().wait(0.005)
            finally:
                stopped.set()

        async def call():
            async with admission.slot(None, work=calls):
                with work.bound(calls):
                    await work.run_in_thread(busy)

        task = asyncio.create_task(call())
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(stopped.wait, 5)  # stopped at its next check
        for _ in range(100):
            if admission.running == 0:
                break
            await asyncio.sleep(0.01)
        assert (admission.running, admission.abandoned, calls.running) == (0, 0, 0)

    run(main())


# --------------------------------------------------------------------------- per caller
def test_per_caller_concurrency_is_bounded_and_other_callers_are_not_affected():
    async def main():
        registry = CollectorRegistry()
        admission = Admission(4, 8, registry, max_inflight_per_caller=2)
        hold = asyncio.Event()

        async def call(caller):
            async with admission.slot(None, caller=caller):
                await hold.wait()

        tasks = [asyncio.create_task(call("pacs")) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(errors.Overloaded) as info:
            await call("pacs")
        assert info.value.reason == "caller_inflight" and info.value.retry_after_s > 0
        assert "'pacs'" in info.value.message and "--max-inflight-per-caller" in info.value.message
        tasks.append(asyncio.create_task(call("research")))  # another caller still gets in
        await asyncio.sleep(0.01)
        assert admission.running == 3 and admission.caller_calls("research") == 1
        hold.set()
        await asyncio.gather(*tasks)
        assert admission.caller_calls("pacs") == 0
        assert registry.get_sample_value("medseg_admission_rejected_total", {"reason": "caller_inflight"}) == 1
        assert registry.get_sample_value("medseg_admission_rejected_total", {"reason": "queue_full"}) == 0

    run(main())


def test_waiting_calls_count_against_their_caller_too():
    async def main():
        admission = Admission(1, 8, max_inflight_per_caller=2)
        hold = asyncio.Event()

        async def call(caller):
            async with admission.slot(None, caller=caller):
                await hold.wait()

        running = asyncio.create_task(call("a"))
        waiting = asyncio.create_task(call("a"))
        await asyncio.sleep(0.01)
        assert (admission.running, admission.queued, admission.caller_calls("a")) == (1, 1, 2)
        with pytest.raises(errors.Overloaded, match="already has 2 calls"):
            await call("a")
        hold.set()
        await asyncio.gather(running, waiting)
        assert admission.caller_calls("a") == 0

    run(main())


def test_per_caller_rate_is_a_token_bucket_with_a_retry_hint():
    async def main():
        now = [100.0]
        admission = Admission(8, 8, rate_per_caller=2.0, burst_per_caller=3, clock=lambda: now[0])

        async def call(caller="pacs"):
            async with admission.slot(None, caller=caller):
                pass

        for _ in range(3):  # the burst
            await call()
        with pytest.raises(errors.Overloaded) as info:
            await call()
        assert info.value.reason == "caller_rate" and info.value.retry_after_s == pytest.approx(0.5)
        await call("research")  # its own bucket
        now[0] += 0.5           # one token back after 1 / rate seconds
        await call()
        with pytest.raises(errors.Overloaded):
            await call()

    run(main())
