from __future__ import annotations

import asyncio

from edgeagent.kernel.runtime.supervisor import Supervisor, TaskInfo


async def test_restart_with_backoff_then_recovery() -> None:
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise OSError("device busy")
        await asyncio.sleep(10)

    async with asyncio.TaskGroup() as tg:
        sup = Supervisor(tg, intensity=5, window_s=60, backoff_base_s=0.01, backoff_cap_s=0.02)
        sup.start("device:x", flaky)
        for _ in range(100):
            if len(runs) == 3:
                break
            await asyncio.sleep(0.01)
        info = sup.tasks["device:x"]
        assert info.state == "running" and info.restarts == 2 and "device busy" in (info.last_error or "")
        await sup.stop_all()
    assert info.state == "stopped"


async def test_gives_up_after_intensity_and_reports_once() -> None:
    reported: list[TaskInfo] = []

    async def broken() -> None:
        raise ValueError("bad register map")

    async def healthy() -> None:
        await asyncio.sleep(10)

    async def report(info: TaskInfo) -> None:
        reported.append(info)

    async with asyncio.TaskGroup() as tg:
        sup = Supervisor(tg, intensity=3, window_s=60, backoff_base_s=0.001, backoff_cap_s=0.002,
                         on_give_up=report)
        sup.start("device:bad", broken)
        sup.start("device:good", healthy)
        for _ in range(200):
            if reported:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert [r.name for r in reported] == ["device:bad"]
        assert sup.tasks["device:bad"].state == "failed" and sup.tasks["device:bad"].restarts == 3
        assert sup.tasks["device:good"].state == "running"
        await sup.stop_all()


async def test_cancellation_passes_through_and_is_not_a_failure() -> None:
    started = asyncio.Event()

    async def worker() -> None:
        started.set()
        await asyncio.sleep(10)

    async with asyncio.TaskGroup() as tg:
        sup = Supervisor(tg)
        sup.start("uplink", worker)
        await started.wait()
        await sup.stop("uplink")
        assert sup.tasks["uplink"].state == "stopped" and sup.tasks["uplink"].restarts == 0
