""":class:`NotifierHub` is what the alarm runtime calls. ``hub.notify(targets, message)`` returns at once: every
(notifier, target) pair becomes a *delivery*, a task of its own, so a modem that takes 20 s to time out never
delays the alarm path::

    notify(targets, message) ──► one delivery per notifier serving each target (its own task)
                                   │ waits for a slot of its notifier (SMS: 1 at a time, webhook: 4, mqtt: 8)
                                   ▼
                                 send ──► ok: delivered
                                   │ transient NotifyError: wait retry_base_s * 2**(n-1) * [0.5, 1], try again,
                                   │   at most ``attempts`` tries, none started after ``retry_window_s``
                                   ▼ permanent NotifyError, or tries used up: failed (logged, counted)

Overflow policy: at most ``max_pending`` deliveries are in the hub (waiting, backing off or sending). A delivery
that arrives when it is full evicts the oldest *repeat* that is not sending at that moment (cancelled, counted
in ``stats.dropped_repeats``); if there is none, an arriving repeat is itself dropped and counted. A "new" or
"escalated" message is never dropped: it is admitted beyond the bound (counted in ``stats.over_bound``), since
the number of alarms bounds it and a repeat will follow an unacknowledged alarm anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from edgeagent.drivers.notifiers.mqtt import Publish
from edgeagent.drivers.notifiers.registry import NOTIFIER_TYPES, AnyNotifierConfig
from edgeagent.kernel.alarms.engine import MessageKind
from edgeagent.kernel.alarms.notify import Message, Notifier, NotifyError

log = logging.getLogger(__name__)


@runtime_checkable
class _Closeable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery (one notifier, one target, one message) ended."""

    notifier: str
    target: str
    alarm_id: str
    kind: MessageKind
    result: Literal["delivered", "failed", "dropped"]
    attempts: int
    error: NotifyError | None = None


@dataclass(slots=True)
class HubStats:
    deliveries: int = 0       # (notifier, target) pairs handed to the hub
    delivered: int = 0
    failed: int = 0           # gave up: a permanent error, or the tries used up
    retries: int = 0
    dropped_repeats: int = 0  # overflow policy
    over_bound: int = 0       # new/escalated admitted beyond max_pending
    unrouted: int = 0         # targets no notifier serves
    served_elsewhere: int = 0  # targets told outside the hub (the guard-room topic), see serve_elsewhere()


@dataclass(slots=True)
class _Lane:
    notifier: Notifier
    slots: asyncio.Semaphore


@dataclass(eq=False, slots=True)
class _Delivery:
    notifier: str
    target: str
    message: Message
    attempts: int = 0
    sending: bool = False
    finished: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class NotifierHub:
    """Routes messages to the notifiers serving each target, each delivery in its own task, with retries
    and a bounded number of pending deliveries (see the module docstring for the policy).

    ``async with NotifierHub.from_config(section, publish=...) as hub: hub.notify(targets, message)``.
    On leaving, deliveries get ``drain_s`` to finish, the rest are cancelled, then notifiers are closed.
    ``on_outcome`` is called on the event loop for every delivery that ends (delivered, failed, dropped).
    """

    def __init__(self, *, max_pending: int = 64, attempts: int = 3, retry_base_s: float = 5.0,
                 retry_window_s: float = 60.0, drain_s: float = 5.0,
                 on_outcome: Callable[[Outcome], None] | None = None, rng: random.Random | None = None) -> None:
        if max_pending < 1 or attempts < 1:
            raise ValueError("max_pending and attempts must be at least 1")
        self._max_pending = max_pending
        self._attempts = attempts
        self._retry_base_s = retry_base_s
        self._retry_window_s = retry_window_s
        self._drain_s = drain_s
        self._on_outcome = on_outcome
        self._rng = rng or random.Random()
        self._lanes: dict[str, _Lane] = {}
        self._routes: dict[str, list[str]] = {}
        self._pending: dict[_Delivery, None] = {}  # insertion-ordered: oldest first
        self._elsewhere: dict[str, str] = {}
        self._unrouted_logged: set[str] = set()
        self._closed = False
        self.stats = HubStats()

    @classmethod
    def from_config(cls, section: Mapping[str, AnyNotifierConfig], *, publish: Publish | None = None,
                    environ: Mapping[str, str] | None = None, **hub_options: Any) -> NotifierHub:
        """Build every notifier of the ``notifiers`` section (:data:`NOTIFIER_TYPES`) and route its targets.
        ``publish`` reaches the local broker (needed only with an mqtt notifier); secrets are resolved now,
        so a missing one raises :class:`~edgeagent.kernel.errors.SecretError` before anything runs."""
        hub = cls(**hub_options)
        for name, cfg in section.items():
            build = NOTIFIER_TYPES[cfg.type]
            notifier, concurrency = build(name, cfg, publish, environ)
            hub.add(name, notifier, cfg.served_targets, concurrency=concurrency)
        return hub

    def add(self, name: str, notifier: Notifier, targets: Iterable[str], *, concurrency: int = 1) -> None:
        """Register ``notifier`` for ``targets``; at most ``concurrency`` of its sends run at once."""
        if name in self._lanes:
            raise ValueError(f"notifier {name!r} is added twice")
        self._lanes[name] = _Lane(notifier, asyncio.Semaphore(concurrency))
        for target in targets:
            self._routes.setdefault(target, []).append(name)

    def serve_elsewhere(self, target: str, by: str) -> None:
        """``target`` is told by something outside the hub (``by``, e.g. the wristband input's guard-room
        topic, which gets every alarm change): a message for it that no notifier serves is not an error."""
        self._elsewhere[target] = by

    @property
    def targets(self) -> dict[str, tuple[str, ...]]:
        return {t: tuple(n) for t, n in self._routes.items()}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def notify(self, targets: Iterable[str], message: Message) -> int:
        """Start delivering ``message`` to every notifier serving each target; returns at once with the number
        of deliveries started. Call on the event loop. Raises NotifyError once the hub is closed."""
        if self._closed:
            raise NotifyError(",".join(targets), "the notifier hub is closed")
        loop = asyncio.get_running_loop()
        started = 0
        for target in dict.fromkeys(targets):
            names = self._routes.get(target)
            if not names:
                if target in self._elsewhere:
                    self.stats.served_elsewhere += 1
                    log.debug("notify: target %r is told by %s (alarm %s)", target, self._elsewhere[target],
                              message.alarm_id)
                    continue
                self.stats.unrouted += 1
                # Once per target: every repeat of every alarm would otherwise log the same config mistake.
                if target not in self._unrouted_logged:
                    self._unrouted_logged.add(target)
                    log.error("notify: no notifier serves target %r (alarm %s); check the notifiers section "
                              "(logged once; counted in stats.unrouted)", target, message.alarm_id)
                continue
            for name in names:
                d = _Delivery(name, target, message)
                self.stats.deliveries += 1
                if not self._admit(d):
                    continue
                d.task = loop.create_task(self._run(d), name=f"notify:{name}:{target}:{message.alarm_id}")
                started += 1
        return started

    def _admit(self, d: _Delivery) -> bool:
        if len(self._pending) < self._max_pending:
            self._pending[d] = None
            return True
        victim = next((x for x in self._pending if x.message.kind == "repeat" and not x.sending), None)
        if victim is not None:
            self._drop(victim)
            self._pending[d] = None
            return True
        if d.message.kind == "repeat":
            self._drop(d)
            return False
        self.stats.over_bound += 1
        log.warning("notify %s → %s: %d deliveries pending; admitting %s alarm %s beyond the bound",
                    d.notifier, d.target, len(self._pending), d.message.kind, d.message.alarm_id)
        self._pending[d] = None
        return True

    def _drop(self, d: _Delivery) -> None:
        self._pending.pop(d, None)
        d.finished = True
        if d.task is not None:
            d.task.cancel()
        self.stats.dropped_repeats += 1
        log.info("notify %s → %s: repeat for alarm %s dropped (%d deliveries pending)",
                 d.notifier, d.target, d.message.alarm_id, len(self._pending))
        self._report(d, "dropped", None)

    async def _run(self, d: _Delivery) -> None:
        lane = self._lanes[d.notifier]
        loop = asyncio.get_running_loop()
        first = loop.time()
        try:
            while True:
                error: NotifyError | None = None
                async with lane.slots:
                    d.sending = True
                    d.attempts += 1
                    try:
                        await lane.notifier.send(d.target, d.message)
                    except NotifyError as exc:
                        error = exc
                    except Exception as exc:  # a faulty notifier must not take the alarm path down
                        log.exception("notify %s → %s: unexpected error", d.notifier, d.target)
                        error = NotifyError(d.target, f"{d.notifier}: unexpected {exc.__class__.__name__}: {exc}")
                        error.__cause__ = exc
                    finally:
                        d.sending = False
                if error is None:
                    self.stats.delivered += 1
                    log.info("notify %s → %s: alarm %s (%s) delivered%s", d.notifier, d.target, d.message.alarm_id,
                             d.message.kind, f" on try {d.attempts}" if d.attempts > 1 else "")
                    self._finish(d, "delivered", None)
                    return
                delay = self._retry_base_s * 2 ** (d.attempts - 1) * self._rng.uniform(0.5, 1.0)
                give_up = (error.permanent or d.attempts >= self._attempts
                           or loop.time() + delay - first > self._retry_window_s)
                if give_up:
                    self.stats.failed += 1
                    why = "permanent" if error.permanent else f"gave up after {d.attempts} tries"
                    log.error("notify %s → %s: alarm %s (%s) not delivered (%s): %s", d.notifier, d.target,
                              d.message.alarm_id, d.message.kind, why, error.reason)
                    self._finish(d, "failed", error)
                    return
                self.stats.retries += 1
                log.warning("notify %s → %s: try %d failed, again in %.1f s: %s", d.notifier, d.target,
                            d.attempts, delay, error.reason)
                await asyncio.sleep(delay)
        finally:
            self._pending.pop(d, None)

    def _finish(self, d: _Delivery, result: Literal["delivered", "failed"], error: NotifyError | None) -> None:
        if d.finished:
            return
        d.finished = True
        self._pending.pop(d, None)
        self._report(d, result, error)

    def _report(self, d: _Delivery, result: Literal["delivered", "failed", "dropped"],
                error: NotifyError | None) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(Outcome(d.notifier, d.target, d.message.alarm_id, d.message.kind, result,
                                     d.attempts, error))
        except Exception:  # an observer's bug must not stop deliveries
            log.exception("notify: on_outcome callback failed")

    def snapshot(self) -> dict[str, Any]:
        """Counters and queue depths for ``diagnose`` and metrics (no message content)."""
        per_notifier: dict[str, int] = dict.fromkeys(self._lanes, 0)
        for d in self._pending:
            per_notifier[d.notifier] += 1
        return {"stats": asdict(self.stats), "pending": len(self._pending), "pending_by_notifier": per_notifier,
                "targets": self.targets}

    async def __aenter__(self) -> NotifierHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop intake, give pending deliveries ``drain_s`` to finish, cancel the rest, close the notifiers."""
        if self._closed:
            return
        self._closed = True
        tasks = [d.task for d in self._pending if d.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._drain_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("notify: %d deliveries still pending at shutdown were cancelled", len(late))
                await asyncio.gather(*late, return_exceptions=True)
        for lane in self._lanes.values():
            if isinstance(lane.notifier, _Closeable):
                await lane.notifier.aclose()

