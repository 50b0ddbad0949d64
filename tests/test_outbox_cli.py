"""``edgeagent events dead-letters``: the rows the uplink gave up on, read from the outbox database
while the daemon runs or after it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeagent.capabilities import load_config
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.runtime.clock import Clock
from tests.helpers import cli, starter_config

REASON = "70212 bytes, more than the broker's maximum packet size (65536 bytes)"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return starter_config(tmp_path)


def outbox_for(cfg: Path) -> Outbox:
    return Outbox(OutboxConfig(path=load_config(cfg).state_dir / "outbox.db"))


def dead_letters(cfg: Path, *args: str) -> list[dict[str, Any]]:
    r = cli("events", "dead-letters", "--json", "-c", cfg, *args)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert isinstance(data, list)
    return data


async def test_dead_letters_are_listed_while_the_daemon_runs_and_after(cfg: Path) -> None:
    f = EventFactory(REGISTRY, "s1", "g1", Clock(mode="synced"))
    async with outbox_for(cfg) as ob:  # the "daemon" holds the database open (WAL) throughout
        assert dead_letters(cfg) == []
        r = cli("events", "dead-letters", "-c", cfg)
        assert r.exit_code == 0 and "no dead letters" in r.stdout
        await ob.put_many([
            f.make("contact.changed", "door-1", {"state": "open", "contact": "door"}),
            f.make("device.offline", "charger-7", {"reason": "y" * 70_000}),
            f.make("panic.pressed", "p1", {"location": "lobby"}),
        ])
        alarm = await ob.lease(10, 1 << 30)
        events = await ob.lease(10, 1 << 30)
        assert alarm is not None and events is not None and events.seqs == (1, 2)
        assert await ob.dead_letter([2], REASON) == 1
        assert await ob.dead_letter(alarm.seqs, "refused: payload format invalid") == 1
        ob.ack_nowait(events)
        await ob.flush()
        running = dead_letters(cfg)
        newest = dead_letters(cfg, "--limit", "1")
    assert [(d["seq"], d["priority"], d["type"], d["device_id"]) for d in running] == [
        (2, "event", "device.offline", "charger-7"), (3, "alarm", "panic.pressed", "p1")]
    big = running[0]
    assert big["reason"] == REASON and big["payload_bytes"] > 70_000
    assert big["envelope"]["seq"] == 2 and big["envelope"]["data"]["reason"] == "y" * 70_000
    assert big["dead_at"].endswith("Z") and big["created_at"].endswith("Z")
    assert [d["seq"] for d in newest] == [3]
    # Stopped: the same, read without creating anything next to the database.
    state = load_config(cfg).state_dir
    before = sorted(p.name for p in state.iterdir())
    assert dead_letters(cfg) == running
    r = cli("events", "dead-letters", "-c", cfg)
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # the reason wraps within its column
    assert "device.offline" in text and "panic.pressed" in text and REASON in text
    assert "y" * 100 not in r.stdout, "the table printed a payload"
    assert max(len(line) for line in r.stdout.splitlines()) <= 100
    assert sorted(p.name for p in state.iterdir()) == before


def test_dead_letters_without_an_outbox(cfg: Path) -> None:
    r = cli("events", "dead-letters", "-c", cfg)
    assert r.exit_code == 1
    assert "no outbox yet" in r.stderr
