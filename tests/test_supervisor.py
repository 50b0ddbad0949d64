from __future__ import annotations

import asyncio

from edgeagent.kernel.runtime.supervisor import SupervisionPolicy, Supervisor, TaskInfo
from tests.helpers import wait_until


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


def _fast(**kw: float) -> SupervisionPolicy:
    base: dict[str, float] = {"intensity": 2, "window_s": 60, "backoff_base_s": 0.01, "backoff_cap_s": 0.02,
                              "critical_backoff_cap_s": 0.02, "retry_failed_after_s": 0.3, "stable_after_s": 5,
                              "critical_unhealthy_after_s": 0.3, "critical_give_up_after_s": 1.0,
                              "report_retry_s": 0.05}
    base.update(kw)
    return SupervisionPolicy(**base)  # type: ignore[arg-type]  # the float dict carries the int intensity too


async def test_critical_task_failing_turns_health_false_then_ends_the_daemon() -> None:
    ended: list[TaskInfo] = []

    async def alarm_ticker() -> None:
        raise OSError("disk I/O error")

    async with asyncio.TaskGroup() as tg:
        sup = Supervisor(tg, policy=_fast(), on_critical_failure=ended.append)
        sup.start("alarms", alarm_ticker, critical=True)
        await asyncio.sleep(0.1)
        # Restarting, but not yet long enough to call it unhealthy.
        assert sup.problem() is None and sup.tasks["alarms"].state in ("backoff", "running")
        assert await wait_until(lambda: sup.problem() is not None, 2)
        assert "alarms" in (sup.problem() or "") and "disk I/O error" in (sup.problem() or "")
        assert not ended
        # Never given up like a device task after `intensity` failures: it keeps trying until the bound.
        assert sup.tasks["alarms"].restarts > 2
        assert await wait_until(lambda: bool(ended), 3)
        assert ended[0].name == "alarms" and sup.tasks["alarms"].state == "failed"
        assert "failed" in (sup.problem() or "")
        await sup.stop_all()


async def test_critical_task_that_recovers_is_healthy_again() -> None:
    fail_until = asyncio.get_running_loop().time() + 0.6
    ended: list[TaskInfo] = []

    async def uplink() -> None:
        if asyncio.get_running_loop().time() < fail_until:
            raise ConnectionError("broker refused")
        await asyncio.sleep(10)

    async with asyncio.TaskGroup() as tg:
        sup = Supervisor(tg, policy=_fast(critical_give_up_after_s=5, stable_after_s=0.2),
                         on_critical_failure=ended.append)
        sup.start("uplink", uplink, critical=True)
        assert await wait_until(lambda: sup.problem() is not None, 2)
        assert await wait_until(lambda: sup.tasks["uplink"].state == "running" and sup.problem() is None, 3)
        assert not ended
        await sup.stop_all()


async def test_given_up_device_task_runs_again_later_and_its_report_waits_for_the_outbox() -> None:
    runs: list[float] = []
    disk_full = [True]
    stored: list[str] = []

    async def poller() -> None:
        runs.append(asyncio.get_running_loop().time())
        if disk_full[0]:
            raise OSError("No space left on device")
        await asyncio.sleep(10)

    async def report(info: TaskInfo) -> None:
        if disk_full[0]:
            raise RuntimeError("outbox full")  # the device.fault event is refused
        stored.append(info.name)

    async with asyncio.TaskGroup() as tg:
        sup = Supervisor(tg, policy=_fast(), on_give_up=report)
        sup.start("device:gate-1", poller)
        assert await wait_until(lambda: sup.tasks["device:gate-1"].state == "failed", 2)
        first_round = len(runs)
        assert first_round == 3 and sup.pending_reports == 1 and not stored
        # Given up, but not for good: it is started again after retry_failed_after_s (and given up again,
        # still failing: one fault episode, one report).
        assert await wait_until(lambda: len(runs) >= 2 * first_round, 3)
        disk_full[0] = False
        assert await wait_until(lambda: sup.tasks["device:gate-1"].state == "running", 3)
        assert await wait_until(lambda: stored == ["device:gate-1"], 2)
        assert sup.pending_reports == 0
        await sup.stop_all()


async def test_the_error_inside_a_task_group_is_what_gets_reported() -> None:
    reported: list[TaskInfo] = []

    async def pump() -> None:
        async def reader() -> None:
            raise ConnectionResetError("broker closed the connection")

        async with asyncio.TaskGroup() as inner:
            inner.create_task(reader())

    async def report(info: TaskInfo) -> None:
        reported.append(info)

    async with asyncio.TaskGroup() as tg:
        sup = Supervisor(tg, policy=_fast(intensity=0), on_give_up=report)
        sup.start("device:x", pump)
        assert await wait_until(lambda: bool(reported), 2)
        await sup.stop_all()
    assert reported[0].last_error == "ConnectionResetError: broker closed the connection"
