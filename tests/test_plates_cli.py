"""``edgeagent plates add|remove|list|import``: the residents' plate list in the config's state directory, as
the installer uses it while the daemon reads the same list."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeagent.drivers.camera.rules.plate_list import PLATES_FILE, PlateList
from tests.helpers import cli, starter_config


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    return starter_config(tmp_path)


def _db(config: Path) -> Path:
    return config.parent / "state" / PLATES_FILE


def _list(config: Path, *extra: str) -> list[dict[str, object]]:
    r = cli("plates", "list", "--json", "--config", config, *extra)
    assert r.exit_code == 0, r.output
    rows: list[dict[str, object]] = json.loads(r.stdout)
    return rows


def test_add_list_remove(config: Path) -> None:
    r = cli("plates", "add", "京a·f0236", "--ref", "3-1-502", "--by", "guard-1", "--config", config)
    assert r.exit_code == 0, r.output
    assert "added 京AF0236" in r.output and "3-1-502" in r.output
    assert _db(config).is_file()  # in the state directory the config names, where the daemon reads it
    r = cli("plates", "add", "京AF0236", "--ref", "3-1-503", "--reason", "staff", "--config", config)
    assert r.exit_code == 0 and "updated 京AF0236" in r.output
    (row,) = _list(config)
    assert (row["plate"], row["ref"], row["reason"], row["status"]) == ("京AF0236", "3-1-503", "staff", "valid")
    assert row["added_by"]  # the user running the command
    r = cli("plates", "list", "--config", config)
    assert r.exit_code == 0 and "京AF0236" in r.output and "1 plate(s)" in r.output
    r = cli("plates", "remove", "京A F0236", "--config", config)
    assert r.exit_code == 0 and "removed 京AF0236" in r.output
    r = cli("plates", "remove", "京AF0236", "--config", config)
    assert r.exit_code == 1 and "not on the plate list" in r.output
    assert _list(config) == []


def test_bad_plate_and_dates_are_refused(config: Path) -> None:
    r = cli("plates", "add", "京AO0236", "--config", config)
    assert r.exit_code == 1 and "I and O" in r.output
    r = cli("plates", "add", "京AF0236", "--until", "next week", "--config", config)
    assert r.exit_code == 1 and "not a date" in r.output
    r = cli("plates", "add", "京AF0236", "--tz", "Mars/Olympus", "--config", config)
    assert r.exit_code == 1 and "not a timezone" in r.output
    assert _list(config) == []


def test_validity_dates_in_a_timezone(config: Path) -> None:
    r = cli("plates", "add", "粤BD12345", "--reason", "delivery contract", "--from", "2020-01-01",
            "--until", "2020/06/30", "--tz", "+08:00", "--config", config)
    assert r.exit_code == 0, r.output
    r = cli("plates", "add", "京AF0236", "--from", "2099-01-01 08:00", "--tz", "Asia/Shanghai", "--config", config)
    assert r.exit_code == 0, r.output
    rows = {str(row["plate"]): row for row in _list(config)}
    assert rows["粤BD12345"]["valid_from"] == "2019-12-31T16:00:00+00:00"
    assert rows["粤BD12345"]["valid_until"] == "2020-06-30T16:00:00+00:00"  # the whole of the 30th
    assert rows["粤BD12345"]["status"] == "expired"
    assert rows["京AF0236"]["valid_from"] == "2099-01-01T00:00:00+00:00"
    assert rows["京AF0236"]["status"] == "not_yet_valid"
    assert _list(config, "--valid") == []


def test_import_with_a_bad_row_names_the_line_and_imports_nothing(config: Path, tmp_path: Path) -> None:
    assert cli("plates", "add", "沪KR9035", "--config", config).exit_code == 0
    csv_file = tmp_path / "residents.csv"
    csv_file.write_text("plate,ref,valid_until\n京AF0236,3-1-502,\n粤BD12345,3-2-101,2030-01-01\n"
                        "京AF023,3-3-303,\n", encoding="utf-8")
    r = cli("plates", "import", csv_file, "--config", config)
    assert r.exit_code == 1
    assert "line 4" in r.output and "nothing imported" in r.output
    assert [row["plate"] for row in _list(config)] == ["沪KR9035"]


def test_import_dry_run_update_and_replace(config: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "residents.csv"
    csv_file.write_text("ref,plate,reason\n3-1-502,京AF0236,resident\n3-2-101,粤BD12345,staff\n", encoding="utf-8")
    r = cli("plates", "import", csv_file, "--dry-run", "--config", config)
    assert r.exit_code == 0 and "would import 2 row(s)" in r.output
    assert _list(config) == []
    r = cli("plates", "import", csv_file, "--by", "office", "--config", config)
    assert r.exit_code == 0 and "2 added, 0 updated" in r.output
    assert {(row["plate"], row["added_by"]) for row in _list(config)} == {("京AF0236", "office"),
                                                                          ("粤BD12345", "office")}
    csv_file.write_text("plate,ref\n京AF0236,3-1-999\n苏E5A2B8,4-1-101\n", encoding="utf-8")
    r = cli("plates", "import", csv_file, "--replace", "--config", config)
    assert r.exit_code == 0 and "1 added, 1 updated, 1 removed" in r.output
    assert {(row["plate"], row["ref"]) for row in _list(config)} == {("京AF0236", "3-1-999"), ("苏E5A2B8", "4-1-101")}
    r = cli("plates", "import", tmp_path / "missing.csv", "--config", config)
    assert r.exit_code == 1 and "cannot read" in r.output


def test_the_daemon_sees_changes_while_it_runs(config: Path) -> None:
    at = datetime.now(UTC)
    assert cli("plates", "add", "沪KR9035", "--config", config).exit_code == 0
    with PlateList(_db(config)) as daemon_side:  # the daemon keeps its list open
        assert daemon_side.lookup("京AF0236", at) is None
        assert cli("plates", "add", "京AF0236", "--config", config).exit_code == 0
        assert daemon_side.lookup("京AF0236", at) is not None
        assert cli("plates", "remove", "沪KR9035", "--config", config).exit_code == 0
        assert daemon_side.lookup("沪KR9035", at) is None


def test_a_bad_config_is_reported(tmp_path: Path) -> None:
    r = cli("plates", "list", "--config", tmp_path / "missing.yaml")
    assert r.exit_code == 2
