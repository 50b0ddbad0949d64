"""ONVIF PullPoint events of one camera, kept alive the way Home Assistant learned to.

One owner task runs the whole conversation in sequence (subscribe, renew, pull), so there is never a
Renew racing a PullMessages on the same subscription:

- Durations go out in seconds (``PT600S``); some firmwares mis-parse ``PT10M``. When a camera grants far
  less than asked (it ignored the relative duration), renewals switch to absolute times on its clock.
- Renew at ``renew_ratio`` (0.8) of the window the camera granted (TerminationTime - CurrentTime, both on
  its clock). A pull never long-polls past the renewal time.
- PullMessages long-polls (``pull_timeout_s``, at most 60 s) with a message limit; an empty answer after the
  timeout is a normal, healthy pull.
- A new subscription after an explicit SOAP fault on a pull or a renewal (a second or more apart: a camera
  that faults every pull is not hammered). A camera whose Renew answers ActionNotSupported (some Bosch)
  gets a fresh subscription at each renewal time instead.
- A camera reboot is recognised by ``tns1:Monitoring/OperatingTime/LastReboot`` changing (cameras report it
  as an Initialized property on each new subscription), or by the old subscription being unknown once the
  camera answers again after being unreachable. Then the camera is refreshed (clock offset, profiles,
  stream URIs) and ``on_reboot(profiles)`` is called.
- NEVER Unsubscribe, not even on shutdown: some cameras then drop every subscription, other clients'
  included. The subscription simply expires on the camera.
- When a renewal fails, the state derived from events is marked stale (``status()['stale']``) until a
  renewal or a new subscription succeeds.
- The pull loop is the camera's heartbeat: every answered exchange is a sign of life
  (``last_answer_age_s``); ``on_online(online, reason)`` is called on the loop once per transition.
- HTTP 500 on CreatePullPointSubscription (Dahua) is retried with backoff; after ``http500_limit`` in a row
  the camera is reported as "fallback to in-box motion" (``on_fallback(True, reason)``, once) and retried
  every ``slow_retry_s``; a later success reports ``on_fallback(False, ...)``.
- A refused subscription that names a limit (SubscribeCreationFailed, too many, maximum) is a clear error
  (``status()['error']``), retried every ``slow_retry_s``.
- Event times are the camera's UtcTime corrected by the camera's measured clock offset.

Output: ``async for event in events.events()`` (inside ``async with``, or alone: then the iteration runs
the subscription; a bounded queue: when full the oldest event is dropped
and counted) and/or an ``on_event`` callback called on the loop for every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

from edgeagent.drivers.camera.onvif.client import (
    CameraAuthError,
    CameraError,
    CameraProtocolError,
    CameraUnavailable,
    OnvifCamera,
    StreamProfile,
)
from edgeagent.drivers.camera.onvif.normalize import CameraEvent, normalize_notification, parse_utc

log = logging.getLogger(__name__)

LAST_REBOOT_TOPIC = "Monitoring/OperatingTime/LastReboot"
MAX_PULL_TIMEOUT_S = 60.0
_LIMIT_WORDS = ("subscribecreationfailed", "unabletocreatepullpoint", "toomany", "too many", "maximum", "limit",
                "maxpullpoints", "resourcelimit")
_NOT_SUPPORTED_WORDS = ("actionnotsupported", "not supported", "notsupported", "unsupported")

OnlineCallback = Callable[[bool, str], None]
RebootCallback = Callable[[list[StreamProfile]], Awaitable[None] | None]


class SubscriptionLimitError(CameraProtocolError):
    """The camera refused a new event subscription because its limit is reached."""


class _Http500(CameraProtocolError):
    """CreatePullPointSubscription answered a bare HTTP 500 (Dahua)."""


def _seconds(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    if isinstance(value, str):
        return parse_utc(value)
    return None


def _window_s(answer: Any, fallback_s: float) -> float:
    """TerminationTime - CurrentTime of a Create/Renew answer (both on the camera's clock)."""
    current = _seconds(getattr(answer, "CurrentTime", None))
    termination = _seconds(getattr(answer, "TerminationTime", None))
    if current is None or termination is None:
        return fallback_s
    window = (termination - current).total_seconds()
    return window if window > 0 else fallback_s


class PullPointEvents:
    """PullPoint subscription manager for one connected :class:`OnvifCamera`.

    ``async with PullPointEvents(cam, ...) as events: async for ev in events.events(): ...``
    """

    def __init__(self, camera: OnvifCamera, *, termination_s: float = 600.0, renew_ratio: float = 0.8,
                 pull_timeout_s: float = 60.0, message_limit: int = 100, queue_size: int = 256,
                 on_event: Callable[[CameraEvent], None] | None = None, on_online: OnlineCallback | None = None,
                 on_reboot: RebootCallback | None = None, on_fallback: OnlineCallback | None = None,
                 retry_s: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0), http500_limit: int = 3,
                 slow_retry_s: float = 60.0, fault_pause_s: float = 1.0) -> None:
        if not 0.1 <= renew_ratio < 1.0:
            raise ValueError("renew_ratio must be in [0.1, 1)")
        self.camera = camera
        self.termination_s = max(1.0, termination_s)
        self.renew_ratio = renew_ratio
        self.pull_timeout_s = min(max(1.0, pull_timeout_s), MAX_PULL_TIMEOUT_S)
        self.message_limit = message_limit
        self.retry_s = tuple(retry_s) or (1.0,)
        self.http500_limit = http500_limit
        self.slow_retry_s = slow_retry_s
        self.fault_pause_s = fault_pause_s
        self._on_event, self._on_online = on_event, on_online
        self._on_reboot, self._on_fallback = on_reboot, on_fallback
        # Overflow policy: drop the oldest event and count it (a consumer that stalls must not grow memory).
        self._queue: asyncio.Queue[CameraEvent | None] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        # subscription
        self._address: str | None = None
        self._pull: Any = None
        self._manager: Any = None
        self._renew_at = 0.0
        self._absolute_times = False
        self._renew_supported = True
        # health
        self.online: bool | None = None
        self.stale = False
        self.fallback_motion = False
        self.error: str | None = None
        self._last_answer: float | None = None
        self._last_pull: float | None = None
        self._last_reboot: str | None = None
        self._suspect_reboot = False
        self._refreshed_sub: int | None = None  # subscription count at the last reboot refresh
        self._http500_run = 0
        self.counters = {"subscriptions": 0, "renewals": 0, "renew_failures": 0, "faults": 0, "pulls": 0,
                         "events": 0, "dropped": 0, "reboots": 0, "http500": 0, "limit_refusals": 0,
                         "unavailable": 0}
        self.pull_latency_s: float | None = None

    # ---- lifecycle
    async def __aenter__(self) -> PullPointEvents:
        self._task = asyncio.create_task(self._run(), name=f"onvif-events-{self.camera.name}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop pulling. Deliberately no Unsubscribe: the subscription expires on the camera by itself."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[CameraEvent]:
        """Normalized events until :meth:`stop`. Used without ``async with``, the iteration itself runs the
        subscription and stops it (no Unsubscribe) when the iterator is closed."""
        owner = self._task is None
        if owner:
            await self.__aenter__()
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                yield item
        finally:
            if owner:
                await self.stop()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "online": self.online, "stale": self.stale, "fallback_motion": self.fallback_motion,
            "error": self.error, "subscribed": self._address is not None,
            "renew_supported": self._renew_supported,
            "last_answer_age_s": None if self._last_answer is None else round(now - self._last_answer, 3),
            "last_pull_age_s": None if self._last_pull is None else round(now - self._last_pull, 3),
            "clock_offset_s": self.camera.clock_offset.total_seconds(), "queue": self._queue.qsize(),
            **self.counters,
        }

    @property
    def last_pull_monotonic(self) -> float | None:
        """time.monotonic() of the last successful PullMessages (the heartbeat)."""
        return self._last_pull

    # ---- health transitions
    def _alive(self) -> None:
        self._last_answer = time.monotonic()
        self._set_online(True, "camera answers")

    def _set_online(self, online: bool, reason: str) -> None:
        if self.online is online:
            return
        self.online = online
        if online:
            log.info("%s: camera online (%s)", self.camera.name, reason)
        else:
            log.warning("%s: camera offline: %s", self.camera.name, reason)
        if self._on_online is not None:
            self._on_online(online, reason)

    def _set_fallback(self, active: bool, reason: str) -> None:
        if self.fallback_motion is active:
            return
        self.fallback_motion = active
        if active:
            log.warning("%s: ONVIF events unavailable (%s): fall back to in-box motion", self.camera.name, reason)
        else:
            log.info("%s: ONVIF events back (%s)", self.camera.name, reason)
        if self._on_fallback is not None:
            self._on_fallback(active, reason)

    def _set_error(self, error: str | None) -> None:
        if error != self.error and error is not None:
            log.warning("%s", error)  # our errors' messages start with the camera's name
        self.error = error

    # ---- the owner task
    async def _run(self) -> None:
        attempt = 0
        while True:
            delay: float | None = None
            try:
                if not self.camera.connected:
                    await self.camera.connect()
                    self._alive()
                if self._address is None:
                    await self._subscribe()
                await self._pull_once()
                attempt = 0
            except CameraUnavailable as exc:
                self.counters["unavailable"] += 1
                self._set_online(False, str(exc))
                if self._address is not None:
                    self._suspect_reboot = True
                delay = self._backoff(attempt)
                attempt += 1
            except CameraAuthError as exc:
                self._alive()
                self._set_error(str(exc))
                delay = self.slow_retry_s
            except SubscriptionLimitError as exc:
                self._alive()
                self.counters["limit_refusals"] += 1
                self._set_error(f"{exc} (the camera's event subscription limit is reached, e.g. another client "
                                f"holds it; retrying every {self.slow_retry_s:g} s)")
                delay = self.slow_retry_s
            except _Http500 as exc:
                self._alive()
                self.counters["http500"] += 1
                self._http500_run += 1
                if self._http500_run >= self.http500_limit:
                    self._set_fallback(True, f"CreatePullPointSubscription answered HTTP 500 "
                                             f"{self._http500_run} times")
                    delay = self.slow_retry_s
                else:
                    delay = self._backoff(self._http500_run - 1)
                self._set_error(str(exc))
            except CameraProtocolError as exc:
                self._alive()
                self.counters["faults"] += 1
                self._set_error(str(exc))
                if self._address is not None:
                    log.info("%s: dropping the subscription after %s", self.camera.name, exc)
                    self._drop_subscription()
                delay = self.fault_pause_s
            if delay is not None:
                await asyncio.sleep(delay * random.uniform(1.0, 1.1))

    def _backoff(self, attempt: int) -> float:
        return self.retry_s[min(attempt, len(self.retry_s) - 1)]

    def _drop_subscription(self) -> None:
        """Forget the subscription (never Unsubscribe: it expires on the camera)."""
        self._address = self._pull = self._manager = None

    def _termination(self) -> str:
        if self._absolute_times:
            t = dt.datetime.now(dt.UTC) + self.camera.clock_offset + dt.timedelta(seconds=self.termination_s)
            return t.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"PT{int(self.termination_s)}S"

    async def _subscribe(self) -> None:
        await self.camera.events_service()
        try:
            answer = await self.camera.call("events", "CreatePullPointSubscription",
                                            {"InitialTerminationTime": self._termination()})
        except CameraProtocolError as exc:
            raise self._classify_create_error(exc) from exc
        address = getattr(getattr(getattr(answer, "SubscriptionReference", None), "Address", None), "_value_1", None)
        if not isinstance(address, str) or not address.startswith(("http://", "https://")):
            raise CameraProtocolError(f"{self.camera.name}: CreatePullPointSubscription gave no usable address")
        self._pull, self._manager = await self.camera.subscription_services(address)
        self._address = address
        window = _window_s(answer, self.termination_s)
        if not self._absolute_times and window < self.termination_s / 2 and window < 55:
            # The camera ignored the relative duration: renew with absolute times on its clock from now on.
            self._absolute_times = True
        self._renew_at = time.monotonic() + self.renew_ratio * window
        self.counters["subscriptions"] += 1
        self.stale = False
        self._http500_run = 0
        self._set_error(None)
        self._set_fallback(False, "subscription created")
        log.info("%s: PullPoint subscription created (window %.0f s)", self.camera.name, window)
        if self._suspect_reboot:
            # The camera was unreachable and forgot our subscription: it most likely rebooted.
            await self._rebooted("the camera came back without our subscription")

    def _classify_create_error(self, exc: CameraProtocolError) -> CameraProtocolError:
        if exc.fault is None and exc.http_status == 500:
            return _Http500(str(exc), http_status=500)
        names = exc.fault.names() if exc.fault is not None else str(exc).lower()
        if any(w in names for w in _LIMIT_WORDS):
            return SubscriptionLimitError(str(exc), fault=exc.fault, http_status=exc.http_status)
        return exc

    async def _renew(self) -> None:
        if not self._renew_supported:
            # Renew is refused by this camera: take a fresh subscription before this one expires.
            self._drop_subscription()
            await self._subscribe()
            return
        try:
            answer = await self.camera.call_on(self._manager, "Renew", {"TerminationTime": self._termination()})
        except CameraProtocolError as exc:
            self.counters["renew_failures"] += 1
            self.stale = True
            if exc.fault is not None and any(w in exc.fault.names() for w in _NOT_SUPPORTED_WORDS):
                log.info("%s: the camera does not support Renew; resubscribing at each renewal instead",
                         self.camera.name)
                self._renew_supported = False
                self._drop_subscription()
                await self._subscribe()
                return
            raise
        except CameraError:
            self.counters["renew_failures"] += 1
            self.stale = True
            raise
        self._renew_at = time.monotonic() + self.renew_ratio * _window_s(answer, self.termination_s)
        self.counters["renewals"] += 1
        self.stale = False

    async def _pull_once(self) -> None:
        # Pull timeouts are whole seconds (not every camera parses PT0.5S): with less than one second
        # left before the renewal time, renew now rather than overshoot the subscription's lifetime.
        if time.monotonic() >= self._renew_at - 1.0:
            await self._renew()
        wait_s = min(self.pull_timeout_s, max(1.0, self._renew_at - time.monotonic()))
        started = time.monotonic()
        answer = await self.camera.call_on(self._pull, "PullMessages",
                                           {"Timeout": f"PT{int(wait_s)}S", "MessageLimit": self.message_limit},
                                           timeout_s=wait_s + 10.0)
        now = time.monotonic()
        self._last_pull = now
        self.pull_latency_s = now - started
        self.counters["pulls"] += 1
        self._alive()
        self._suspect_reboot = False
        self._set_error(None)
        for msg in getattr(answer, "NotificationMessage", None) or []:
            event = normalize_notification(msg, clock_offset=self._event_offset())
            if event is None:
                continue
            if event.topic.endswith(LAST_REBOOT_TOPIC) or LAST_REBOOT_TOPIC in event.topic:
                await self._check_last_reboot(event)
            self._emit(event)

    def _event_offset(self) -> dt.timedelta:
        # Event times are corrected even when the offset is not applied to WS-Security (then only measured).
        measured = self.camera.clock_offset_measured
        return measured if measured is not None else self.camera.clock_offset

    async def _check_last_reboot(self, event: CameraEvent) -> None:
        value = next(iter(event.data.values()), None)
        if value is None:
            return
        previous, self._last_reboot = self._last_reboot, value
        if previous is not None and previous != value and self._refreshed_sub != self.counters["subscriptions"]:
            await self._rebooted(f"LastReboot changed from {previous} to {value}")

    async def _rebooted(self, reason: str) -> None:
        """Re-read what a reboot may have changed (clock, profiles, URIs), keep pulling on our subscription."""
        self._suspect_reboot = False
        self._refreshed_sub = self.counters["subscriptions"]
        self.counters["reboots"] += 1
        log.warning("%s: camera rebooted (%s): refreshing its profiles and stream URIs", self.camera.name, reason)
        address = self._address
        profiles = await self.camera.refresh()
        if address is not None:
            self._pull, self._manager = await self.camera.subscription_services(address)
        if self._on_reboot is not None:
            result = self._on_reboot(profiles)
            if inspect.isawaitable(result):
                await result

    def _emit(self, event: CameraEvent) -> None:
        self.counters["events"] += 1
        if self._on_event is not None:
            self._on_event(event)
        if self._queue.full():
            self._queue.get_nowait()
            self.counters["dropped"] += 1
            if self.counters["dropped"] == 1 or self.counters["dropped"] % 1000 == 0:
                log.warning("%s: event queue full, %d oldest events dropped so far", self.camera.name,
                            self.counters["dropped"])
        self._queue.put_nowait(event)
