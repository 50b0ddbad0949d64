"""PullPoint events against the project's own SOAP fixture (tests/onvif_peer.py): renewals at ~80%,
a fault, a reboot, the subscription limit, clock skew, never Unsubscribe, HTTP 500 backoff, Renew not
supported, online/offline once per transition, normalized events; the notification normalizer property-tested."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type information

from edgeagent.drivers.camera.onvif.client import OnvifCamera, StreamProfile
from edgeagent.drivers.camera.onvif.events import PullPointEvents
from edgeagent.drivers.camera.onvif.normalize import (
    MAX_ITEMS,
    MAX_STR,
    MAX_TOPIC,
    CameraEvent,
    classify,
    normalize_notification,
)
from tests.onvif_peer import OnvifFixture, Switches


async def wait_until(pred: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def camera(fx: OnvifFixture, **kw: object) -> OnvifCamera:
    return OnvifCamera("127.0.0.1", fx.port, username=fx.sw.username, password=fx.sw.password, name="cam1",
                       connect_timeout_s=5, request_timeout_s=5, **kw)  # type: ignore[arg-type]


class Collector:
    def __init__(self) -> None:
        self.events: list[CameraEvent] = []
        self.online: list[tuple[bool, str]] = []
        self.fallback: list[tuple[bool, str]] = []
        self.reboots: list[list[StreamProfile]] = []

    def kinds(self, kind: str) -> list[CameraEvent]:
        return [e for e in self.events if e.kind == kind]

    def manager(self, cam: OnvifCamera, **kw: object) -> PullPointEvents:
        async def rebooted(profiles: list[StreamProfile]) -> None:
            self.reboots.append(profiles)

        kw.setdefault("termination_s", 4.0)
        kw.setdefault("pull_timeout_s", 2.0)
        kw.setdefault("retry_s", (0.2, 0.4))
        kw.setdefault("slow_retry_s", 0.5)
        kw.setdefault("fault_pause_s", 0.1)
        return PullPointEvents(cam, on_event=self.events.append, on_online=lambda o, r: self.online.append((o, r)),
                               on_fallback=lambda a, r: self.fallback.append((a, r)), on_reboot=rebooted,
                               **kw)  # type: ignore[arg-type]


@pytest.fixture
async def fx() -> AsyncIterator[OnvifFixture]:
    async with OnvifFixture() as f:
        yield f


async def test_events_normalized_motion_tamper_line_and_gate_button(fx: OnvifFixture) -> None:
    col = Collector()
    async with camera(fx) as cam, col.manager(cam) as ev:
        await wait_until(lambda: fx.calls["PullMessages"] >= 1, what="first pull")
        sent = time.monotonic()
        fx.push_motion(True)
        await wait_until(lambda: bool(col.kinds("motion")), what="motion on")
        latency = time.monotonic() - sent
        fx.push_motion(False)
        fx.push_tamper(True)
        fx.push_line_crossed(rule="GateLine", object_id="42")
        fx.push_digital_input(True, token="CallButton")
        await wait_until(lambda: len(col.kinds("digital_input")) == 1, what="gate call button")
        status = ev.status()
    first = col.events[0]
    assert first.kind == "other" and first.topic.endswith("Monitoring/OperatingTime/LastReboot")
    assert first.operation == "initialized"
    on, off = col.kinds("motion")
    assert (on.active, off.active) == (True, False)
    assert on.source["VideoSourceConfigurationToken"] == "VideoSourceConfig_1" and on.rule == "MyMotionDetectorRule"
    (tamper,) = col.kinds("tamper")
    assert tamper.active is True and tamper.rule == "MyTamperDetectorRule"
    (line,) = col.kinds("line_crossed")
    assert line.active is None and line.rule == "GateLine" and line.data == {"ObjectId": "42"}
    (button,) = col.kinds("digital_input")
    assert button.active is True and button.source == {"InputToken": "CallButton"}
    assert abs((on.utc_time - dt.datetime.now(dt.UTC)).total_seconds()) < 5
    assert status["online"] is True and status["subscriptions"] == 1 and status["dropped"] == 0
    assert col.online == [(True, "camera answers")]
    print(f"push-to-event latency {latency * 1000:.1f} ms")


async def test_renews_at_80_percent_and_never_unsubscribes(fx: OnvifFixture) -> None:
    col = Collector()
    async with camera(fx) as cam, col.manager(cam, termination_s=4.0):
        await wait_until(lambda: fx.calls["Renew"] >= 2, timeout_s=12, what="two renewals")
        created = fx.call_times["CreatePullPointSubscription"][0]
        renews = fx.call_times["Renew"]
        # Still the first subscription, well past its 4 s lifetime: the renewals kept it alive.
        assert fx.calls["CreatePullPointSubscription"] == 1 and len(fx.subs) == 1
        fx.push_motion(True)
        await wait_until(lambda: bool(col.kinds("motion")), what="motion after renewals")
    # Renewal at ~80% of the 4 s window (3.2 s; up to a second earlier, since pulls wait whole seconds),
    # and always before the window ends.
    assert 2.0 <= renews[0] - created < 4.0, renews[0] - created
    assert 2.0 <= renews[1] - renews[0] < 4.0, renews[1] - renews[0]
    assert fx.calls["Unsubscribe"] == 0
    assert len(fx.subs) == 1  # left to expire on the camera


async def test_shutdown_leaves_other_clients_subscriptions(fx: OnvifFixture) -> None:
    fx.sw.drop_all_on_unsubscribe = True  # a camera that cancels every subscription on any Unsubscribe
    col = Collector()
    async with camera(fx) as other:
        await other.call("events", "CreatePullPointSubscription", {"InitialTerminationTime": "PT60S"})
        async with camera(fx) as cam, col.manager(cam, termination_s=60.0):
            await wait_until(lambda: fx.calls["PullMessages"] >= 1, what="pull")
            assert len(fx.subs) == 2
    assert fx.calls["Unsubscribe"] == 0 and len(fx.subs) == 2


async def test_fault_gives_a_new_subscription_and_events_keep_flowing(fx: OnvifFixture) -> None:
    col = Collector()
    async with camera(fx) as cam, col.manager(cam) as ev:
        await wait_until(lambda: fx.calls["PullMessages"] >= 1, what="first pull")
        fx.sw.fault_next_pull = True
        fx.push_motion(True)  # wakes the pending pull, which answers the fault
        await wait_until(lambda: fx.calls["CreatePullPointSubscription"] == 2, what="resubscription")
        await wait_until(lambda: ev.status()["pulls"] >= 2 and fx.calls["PullMessages"] >= 3, what="pulling again")
        fx.push_motion(False)
        await wait_until(lambda: any(e.active is False for e in col.kinds("motion")), what="motion off")
        assert ev.status()["faults"] == 1
    assert col.reboots == []  # a fault alone is not a reboot
    assert fx.calls["Unsubscribe"] == 0


async def test_reboot_resubscribes_and_refreshes_profiles(fx: OnvifFixture) -> None:
    col = Collector()
    async with camera(fx) as cam, col.manager(cam) as ev:
        await wait_until(lambda: fx.calls["PullMessages"] >= 1, what="first pull")
        assert all("boot=1" in (p.stream_uri or "") for p in cam.profiles)
        fx.sw.down = True  # the camera goes away while rebooting...
        fx.push_motion(True)  # (wake the pending pull so the outage is seen now)
        await wait_until(lambda: bool(col.online) and col.online[-1][0] is False, what="offline")
        fx.reboot()  # ...and comes back with no subscription, its uptime reset
        fx.sw.down = False
        await wait_until(lambda: bool(col.reboots), timeout_s=10, what="reboot callback")
        await wait_until(lambda: col.online[-1][0] is True, what="online again")
        fx.push_motion(True)
        await wait_until(lambda: len(col.kinds("motion")) >= 1, what="motion after reboot")
        status = ev.status()
    (profiles,) = col.reboots
    assert {p.token for p in profiles} == {"main", "sub", "third", "main265"}
    assert all("boot=2" in (p.stream_uri or "") for p in profiles)  # URIs re-fetched, not cached
    assert status["reboots"] == 1 and status["subscriptions"] == 2
    assert [o for o, _ in col.online] == [True, False, True]  # once per transition


async def test_reboot_seen_from_last_reboot_without_an_outage(fx: OnvifFixture) -> None:
    col = Collector()
    async with camera(fx) as cam, col.manager(cam):
        await wait_until(lambda: fx.calls["PullMessages"] >= 1, what="first pull")
        fx.reboot()
        await wait_until(lambda: bool(col.reboots), what="reboot callback")
    assert fx.calls["CreatePullPointSubscription"] == 2 and len(col.reboots) == 1


async def test_subscription_limit_is_a_clear_error_then_retried(fx: OnvifFixture) -> None:
    fx.sw.max_subscriptions = 1  # some Dahua models allow one event listener
    col = Collector()
    async with camera(fx) as other:
        await other.call("events", "CreatePullPointSubscription", {"InitialTerminationTime": "PT2S"})
        async with camera(fx) as cam, col.manager(cam) as ev:
            await wait_until(lambda: ev.status()["limit_refusals"] >= 1, what="limit refusal")
            error = ev.status()["error"] or ""
            assert "subscription limit" in error and "SubscribeCreationFailedFault" in error
            assert ev.status()["online"] is True  # the camera answers; only its events are refused
            # The other client's subscription expires (2 s); ours gets in on a later retry.
            await wait_until(lambda: ev.status()["subscriptions"] == 1, timeout_s=8, what="subscribed")
            await wait_until(lambda: ev.status()["error"] is None, what="error cleared")


async def test_clock_skew_30s_offset_applied_to_auth_and_event_times() -> None:
    async with OnvifFixture(Switches(clock_skew_s=30)) as fx:
        col = Collector()
        async with camera(fx) as cam, col.manager(cam):
            assert 28 <= cam.clock_offset.total_seconds() <= 31
            await wait_until(lambda: fx.calls["PullMessages"] >= 1, what="first pull")
            fx.push_motion(True)
            await wait_until(lambda: bool(col.kinds("motion")), what="motion")
        (motion,) = col.kinds("motion")
        # The camera stamped it 30 s ahead; corrected to our clock.
        assert abs((motion.utc_time - dt.datetime.now(dt.UTC)).total_seconds()) < 3
        assert fx.wsse_failures == 0


async def test_http500_on_create_backs_off_then_subscribes(fx: OnvifFixture) -> None:
    fx.sw.http500_on_create = 2
    col = Collector()
    async with camera(fx) as cam, col.manager(cam, http500_limit=3) as ev:
        await wait_until(lambda: ev.status()["subscriptions"] == 1, what="subscribed")
        times = fx.call_times["CreatePullPointSubscription"]
        assert ev.status()["http500"] == 2 and not col.fallback
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # backoff grows


async def test_http500_repeated_reports_fallback_to_inbox_motion_once(fx: OnvifFixture) -> None:
    fx.sw.http500_on_create = 5
    col = Collector()
    async with camera(fx) as cam, col.manager(cam, http500_limit=3, slow_retry_s=0.3) as ev:
        await wait_until(lambda: bool(col.fallback), what="fallback")
        assert ev.status()["fallback_motion"] is True
        await wait_until(lambda: ev.status()["subscriptions"] == 1, timeout_s=8, what="subscribed at last")
    assert [a for a, _ in col.fallback] == [True, False]
    assert "HTTP 500" in col.fallback[0][1]


async def test_renew_not_supported_resubscribes_before_expiry(fx: OnvifFixture) -> None:
    fx.sw.renew_supported = False  # some Bosch models
    col = Collector()
    async with camera(fx) as cam, col.manager(cam, termination_s=3.0) as ev:
        await wait_until(lambda: fx.calls["CreatePullPointSubscription"] >= 3, timeout_s=12, what="resubscriptions")
        fx.push_motion(True)
        await wait_until(lambda: bool(col.kinds("motion")), what="motion")
        status = ev.status()
    assert fx.calls["Renew"] == 1 and status["renew_supported"] is False
    assert fx.calls["Unsubscribe"] == 0 and col.reboots == []


async def test_renewal_failure_marks_events_stale(fx: OnvifFixture) -> None:
    col = Collector()
    async with camera(fx) as cam, col.manager(cam, termination_s=3.0) as ev:
        await wait_until(lambda: fx.calls["PullMessages"] >= 1, what="first pull")
        fx.sw.down = True
        await wait_until(lambda: ev.status()["renew_failures"] >= 1, timeout_s=10, what="renewal failure")
        assert ev.status()["stale"] is True and ev.status()["online"] is False
        fx.sw.down = False
        await wait_until(lambda: ev.status()["stale"] is False, timeout_s=10, what="fresh again")


# ------------------------------------------------------------------------------------------ normalizer


NOW = dt.datetime(2026, 5, 1, 10, 0, tzinfo=dt.UTC)


def message(topic: str, data: dict[str, str], source: dict[str, str] | None = None,
            utc: str = "2026-05-01T10:00:30Z", op: str = "Changed") -> dict[str, object]:
    def items(d: dict[str, str]) -> dict[str, object]:
        return {"SimpleItem": [{"Name": k, "Value": v} for k, v in d.items()]}

    return {"Topic": {"_value_1": topic}, "Message": {"_value_1": {
        "Source": items(source or {}), "Data": items(data), "UtcTime": utc, "PropertyOperation": op}}}


@pytest.mark.parametrize(("topic", "data", "kind", "active"), [
    ("tns1:RuleEngine/CellMotionDetector/Motion", {"IsMotion": "true"}, "motion", True),
    ("tns1:VideoSource/MotionAlarm", {"State": "false"}, "motion", False),
    ("tns1:VideoSource/tnsaxis:VMD/Camera1Profile1", {"active": "1"}, "motion", True),
    ("tns1:RuleEngine/MyRuleDetector/tnsvendor:FieldMotion", {"State": "true"}, "motion", True),
    ("tns1:VideoSource/GlobalSceneChange/ImagingService", {"State": "true"}, "tamper", True),
    ("tns1:RuleEngine/TamperDetector/Tamper", {"IsTamper": "false"}, "tamper", False),
    ("tns1:VideoSource/ImageTooBlurry/AnalyticsService", {"State": "true"}, "tamper", True),
    ("tns1:RuleEngine/LineDetector/Crossed", {"ObjectId": "5"}, "line_crossed", None),
    ("tns1:RuleEngine/tnshik:LineCrossing", {"State": "true"}, "line_crossed", None),
    ("tns1:Device/Trigger/DigitalInput", {"LogicalState": "true"}, "digital_input", True),
    ("tns1:Device/tnsaxis:IO/Port", {"state": "0"}, "digital_input", False),
    ("tns1:Device/Trigger/Relay", {"LogicalState": "inactive"}, "relay", False),
    ("tns1:Device/tnsaxis:IO/OutputPort", {"state": "1"}, "relay", True),
    ("tns1:Monitoring/ProcessorUsage", {"Value": "0.4"}, "other", None),
])
def test_topics_and_vendor_variants(topic: str, data: dict[str, str], kind: str, active: bool | None) -> None:
    ev = normalize_notification(message(topic, data, {"Rule": "R1"}), clock_offset=dt.timedelta(seconds=30),
                                now=NOW)
    assert ev is not None and (ev.kind, ev.active) == (kind, active)
    assert ev.utc_time == NOW and ev.rule == "R1" and ev.operation == "changed"  # 30 s camera skew removed


def test_lxml_shape_and_missing_fields() -> None:
    xml = (b'<wsnt:NotificationMessage xmlns:wsnt="http://docs.oasis-open.org/wsn/b-2" '
           b'xmlns:tt="http://www.onvif.org/ver10/schema"><wsnt:Topic>tns1:Device/Trigger/DigitalInput</wsnt:Topic>'
           b'<wsnt:Message><tt:Message UtcTime="2026-05-01T10:00:00" PropertyOperation="Initialized"><tt:Source>'
           b'<tt:SimpleItem Name="InputToken" Value="DI1"/></tt:Source><tt:Data>'
           b'<tt:SimpleItem Name="LogicalState" Value="true"/></tt:Data></tt:Message></wsnt:Message>'
           b"</wsnt:NotificationMessage>")
    ev = normalize_notification(etree.fromstring(xml), now=NOW)
    assert ev is not None and ev.kind == "digital_input" and ev.active is True
    assert ev.source == {"InputToken": "DI1"} and ev.operation == "initialized" and ev.utc_time == NOW
    assert normalize_notification({"Message": {}}) is None  # no topic: nothing to say
    bare = normalize_notification({"Topic": "tns1:RuleEngine/CellMotionDetector/Motion"}, now=NOW)
    assert bare is not None and bare.active is None and bare.utc_time == NOW and bare.source == {}
    bad_time = normalize_notification(message("tns1:x", {}, utc="yesterday"), now=NOW)
    assert bad_time is not None and bad_time.utc_time == NOW


leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=2000) | st.binary(max_size=300) \
    | st.datetimes()
trees = st.recursive(leaf, lambda kids: st.lists(kids, max_size=5)
                     | st.dictionaries(st.sampled_from(["Topic", "Message", "_value_1", "Source", "Data", "SimpleItem",
                                                        "Name", "Value", "UtcTime", "PropertyOperation", "@Name",
                                                        "@Value", "#text"]) | st.text(max_size=10), kids, max_size=6),
                     max_leaves=60)


def _check(ev: object) -> None:
    if ev is None:
        return
    assert isinstance(ev, CameraEvent)
    assert len(ev.topic) <= MAX_TOPIC and len(ev.source) <= MAX_ITEMS and len(ev.data) <= MAX_ITEMS
    assert all(len(v) <= MAX_STR for v in (*ev.source.values(), *ev.data.values()))
    assert ev.utc_time.tzinfo is not None and ev.kind in ("motion", "tamper", "line_crossed", "digital_input",
                                                          "relay", "other")


@settings(max_examples=400, deadline=None)
@given(trees, st.integers(-10**6, 10**6))
def test_normalizer_never_raises_on_arbitrary_structures(tree: object, offset_s: int) -> None:
    _check(normalize_notification(tree, clock_offset=dt.timedelta(seconds=offset_s)))
    _check(normalize_notification({"Topic": tree, "Message": {"_value_1": tree}}))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=5000), st.dictionaries(st.text(max_size=400), st.text(max_size=5000), max_size=80),
       st.text(max_size=80), st.integers(0, 200))
def test_normalizer_caps_huge_and_deep_messages(topic: str, data: dict[str, str], utc: str, depth: int) -> None:
    msg: dict[str, object] = message(topic, data, data, utc=utc)
    for _ in range(depth):  # deep nesting around the real message
        msg = {"Topic": {"_value_1": topic}, "Message": {"_value_1": msg}}
    _check(normalize_notification(msg))
    classify(topic)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.integers(0, 300))
def test_normalizer_on_lxml_elements(text: str, depth: int) -> None:
    safe = text.replace("&", "&amp;").replace("<", "&lt;").encode("utf-8", "replace")
    xml = b"<M><Topic>" + safe + b"</Topic><Message>" + b"<Message>" * depth + b"<Data><SimpleItem Name='a' Value='"\
        + safe.replace(b"'", b"&apos;") + b"'/></Data>" + b"</Message>" * depth + b"</Message></M>"
    try:
        el = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, huge_tree=False))
    except etree.XMLSyntaxError:
        return
    _check(normalize_notification(el))
