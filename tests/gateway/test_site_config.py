"""Site config: the example parses, and every broken config names the key path and the problem."""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.core.site import SITE_NODE, CborSerialLink, CborTcpLink, ModbusRtuLink, ModbusTcpLink
from gateway.core.site_config import SiteConfigError, check_site, load_site_file, parse_site

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "site.toml"


def base() -> dict[str, Any]:
    return {
        "site": {"id": "s1", "capacity_a": 63, "dno_failsafe_a": 20},
        "buses": {"rs485-a": {"device": "/dev/ttyUSB0", "baud": 19200}},
        "circuits": {"f1": {"rating_a": 40}, "f1a": {"rating_a": 20, "parent": "f1"}},
        "columns": [
            {"id": "c1", "circuit": "f1", "hardware_a": 32, "link": "modbus-rtu", "bus": "rs485-a",
             "address": 1},
            {"id": "c2", "circuit": "f1a", "phases": 1, "rotation": "L2", "hardware_a": 16,
             "link": "modbus-rtu", "bus": "rs485-a", "address": 2},
            {"id": "c3", "hardware_a": 32, "rotation": "L3L1L2", "link": "modbus-tcp", "host": "10.0.0.3"},
        ],
    }


def with_changes(*changes: tuple[tuple[Any, ...], Any]) -> dict[str, Any]:
    doc = base()
    for path, value in changes:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return doc


_DELETE = object()


def test_example_site_parses_without_errors_or_warnings() -> None:
    with open(EXAMPLE, "rb") as f:
        check = check_site(tomllib.load(f))
    assert check.errors == ()
    assert check.warnings == ()
    site = load_site_file(EXAMPLE)
    assert site.id == "depot-1"
    assert len(site.columns) >= 6
    kinds = {c.link.kind for c in site.columns}
    assert kinds == {"modbus-rtu", "modbus-tcp", "cbor-serial", "cbor-tcp"}
    assert site.node_path("feeder-b-kiosk") == ("feeder-b-kiosk", "feeder-b", SITE_NODE)


def test_base_config_values_and_defaults() -> None:
    site = parse_site(base())
    assert site.capacity_a == (63.0, 63.0, 63.0)
    assert site.voltage_v == 230.0
    assert site.allocation.increase_delay_max_s == 600.0
    c1, c2, c3 = site.columns
    assert c1.rotation == (0, 1, 2) and c1.phases == 3 and c1.max_a == 32.0
    assert c1.link == ModbusRtuLink("rs485-a", 1)
    assert c2.rotation == (1,) and c2.site_phases() == frozenset({1})
    assert c3.circuit == SITE_NODE
    assert c3.link == ModbusTcpLink("10.0.0.3", 502, 1)
    assert c3.rotation == (2, 0, 1)
    # a 1-phase car on c3 draws on the column's L1, which is site L3
    assert c3.site_phases((0,)) == frozenset({2})


def test_per_phase_ratings_and_cbor_links() -> None:
    doc = with_changes((("site", "capacity_a"), [63, 50, 40]),
                       (("columns",), [{"id": "x", "hardware_a": 16, "link": "cbor-serial",
                                        "device": "/dev/ttyS1"},
                                       {"id": "y", "hardware_a": 16, "link": "cbor-tcp",
                                        "host": "h", "port": 7000}]))
    site = parse_site(doc)
    assert site.capacity_a == (63.0, 50.0, 40.0)
    assert site.columns[0].link == CborSerialLink("/dev/ttyS1", 115200)
    assert site.columns[1].link == CborTcpLink("h", 7000)


BAD = [
    ("unknown parent", [(("circuits", "f1a", "parent"), "x")],
     "circuits.f1a.parent: unknown circuit 'x'"),
    ("cycle", [(("circuits", "f1", "parent"), "f1a")],
     "circuits.f1.parent: circuits form a cycle: f1 -> f1a -> f1"),
    ("self parent", [(("circuits", "f1", "parent"), "f1")], "circuits.f1.parent: circuits form a cycle"),
    ("reserved circuit id", [(("circuits", "site"), {"rating_a": 10})], "circuits.site: 'site' is reserved"),
    ("duplicate bus address", [(("columns", 1, "address"), 1)],
     "columns[1].address: duplicate bus address 1 on bus 'rs485-a' (also columns[0])"),
    ("unknown circuit", [(("columns", 0, "circuit"), "nope")], "columns[0].circuit: unknown circuit 'nope'"),
    ("unknown bus", [(("columns", 0, "bus"), "rs485-z")], "columns[0].bus: unknown bus 'rs485-z'"),
    ("address range", [(("columns", 0, "address"), 248)],
     "columns[0].address: must be from 1 to 247, got 248"),
    ("bad rotation", [(("columns", 0, "rotation"), "L1L1L2")],
     "columns[0].rotation: 'L1L1L2' for a 3-phase column: expected three distinct phases"),
    ("1-phase rotation", [(("columns", 1, "rotation"), "L1L2")],
     "columns[1].rotation: 'L1L2' for a 1-phase column: expected one phase"),
    ("phases 2", [(("columns", 0, "phases"), 2)], "columns[0].phases: must be 1 or 3, got 2"),
    ("rating below 6 A", [(("columns", 0, "hardware_a"), 5)], "columns[0].hardware_a: must be from 6 to 80"),
    ("missing id", [(("columns", 2, "id"), _DELETE)], "columns[2].id: missing"),
    ("duplicate id", [(("columns", 2, "id"), "c1")], "columns[2].id: duplicate column id 'c1'"),
    ("bad id", [(("site", "id"), "a/b")], "site.id: 'a/b' is not a valid id"),
    ("missing capacity", [(("site", "capacity_a"), _DELETE)], "site.capacity_a: missing"),
    ("negative capacity", [(("site", "capacity_a"), -5)], "site.capacity_a: must be above 0"),
    ("nan capacity", [(("site", "capacity_a"), math.nan)], "site.capacity_a: must be a finite number"),
    ("capacity list length", [(("site", "capacity_a"), [1, 2])], "site.capacity_a: expected 3 values"),
    ("string capacity", [(("site", "capacity_a"), "63")], "site.capacity_a: expected a number, got str"),
    ("bool capacity", [(("site", "capacity_a"), True)], "site.capacity_a: expected a number, got bool"),
    ("typo key", [(("site", "capacity_A"), 10)], "site.capacity_A: unknown key"),
    ("delay above 1800", [(("allocation",), {"increase_delay_max_s": 2000})],
     "allocation.increase_delay_max_s: must be from 0 to 1800, got 2000"),
    ("bad bool", [(("allocation",), {"dno_restore_without_delay": "yes"})],
     "allocation.dno_restore_without_delay: expected true or false"),
    ("unknown link", [(("columns", 2, "link"), "zigbee")], "columns[2].link: must be one of modbus-rtu"),
    ("key of another link", [(("columns", 0, "host"), "h")],
     "columns[0].host: not used by link 'modbus-rtu'"),
    ("missing host", [(("columns", 2, "host"), _DELETE)], "columns[2].host: missing"),
    ("duplicate tcp endpoint", [(("columns", 1), {"id": "c9", "hardware_a": 16, "link": "modbus-tcp",
                                                  "host": "10.0.0.3"})],
     "columns[2].unit: duplicate Modbus TCP endpoint 10.0.0.3:502 unit 1 (also columns[1])"),
    ("meter clashes with column", [(("meter",), {"link": "modbus-rtu", "bus": "rs485-a", "address": 2})],
     "columns[1].address: duplicate bus address 2 on bus 'rs485-a' (also meter)"),
    ("meter on cbor", [(("meter",), {"link": "cbor-tcp", "host": "h", "port": 1})],
     "meter.link: must be one of modbus-rtu, modbus-tcp"),
    ("columns not a list", [(("columns",), {"id": "x"})], "columns: expected an array of tables"),
    ("missing site", [(("site",), _DELETE)], "site: missing table [site]"),
    ("bad parity", [(("buses", "rs485-a", "parity"), "X")], "buses.rs485-a.parity: must be one of N, E, O"),
]


@pytest.mark.parametrize(("name", "changes", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_key_and_problem(name: str, changes: list[tuple[tuple[Any, ...], Any]],
                                          expected: str) -> None:
    check = check_site(with_changes(*changes))
    assert check.site is None
    messages = [str(e) for e in check.errors]
    assert any(m.startswith(expected) for m in messages), messages
    with pytest.raises(SiteConfigError) as info:
        parse_site(with_changes(*changes))
    assert [str(e) for e in info.value.errors] == messages


def test_all_errors_are_collected_not_just_the_first() -> None:
    doc = with_changes((("site", "voltage_v"), 1000), (("circuits", "f1a", "parent"), "x"),
                       (("columns", 1, "address"), 1), (("columns", 2, "rotation"), "L4"))
    paths = sorted(e.path for e in check_site(doc).errors)
    assert paths == ["circuits.f1a.parent", "columns[1].address", "columns[2].rotation", "site.voltage_v"]


def test_garbage_documents_give_errors_not_exceptions() -> None:
    for doc in ({}, {"site": 5}, {"site": {"id": 7, "capacity_a": {}}, "circuits": [1], "columns": [5, None]},
                {"site": {"id": "x", "capacity_a": 10}, "buses": {"b": 3}, "meter": "yes",
                 "allocation": []}):
        check = check_site(doc)
        assert check.site is None
        assert check.errors


WARN = [
    ("child above parent", [(("circuits", "f1a", "rating_a"), 50)],
     "circuits.f1a.rating_a: above its parent 'f1'"),
    ("installation above hardware", [(("columns", 0, "installation_a"), 40)],
     "columns[0].installation_a: above hardware_a"),
    ("column above circuit", [(("columns", 1, "hardware_a"), 32)],
     "columns[1].hardware_a: column rating above its circuit 'f1a'"),
    ("no dno failsafe", [(("site", "dno_failsafe_a"), _DELETE)], "site.dno_failsafe_a: not set"),
    ("unused bus", [(("buses", "spare"), {"device": "/dev/ttyUSB9"})], "buses.spare: no column or meter"),
]


@pytest.mark.parametrize(("name", "changes", "expected"), WARN, ids=[w[0] for w in WARN])
def test_questionable_config_is_accepted_with_a_warning(name: str, changes: list[tuple[tuple[Any, ...], Any]],
                                                        expected: str) -> None:
    check = check_site(with_changes(*changes))
    assert check.errors == ()
    assert check.site is not None
    assert any(str(w).startswith(expected) for w in check.warnings), check.warnings


def test_installation_rating_above_hardware_uses_the_lower() -> None:
    site = parse_site(with_changes((("columns", 0, "installation_a"), 40)))
    assert site.columns[0].max_a == 32.0


def test_other_top_level_tables_are_left_to_their_loaders() -> None:
    doc = copy.deepcopy(base())
    doc["mqtt"] = {"host": "broker"}
    doc["dno"] = {"keys": {}}
    assert check_site(doc).errors == ()


def test_load_site_file_reports_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError) as info:
        load_site_file(tmp_path / "missing.toml")
    assert "cannot read" in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nid = 1\n")
    with pytest.raises(SiteConfigError) as info:
        load_site_file(bad)
    assert info.value.errors[0].path == str(bad)
    assert "not valid TOML" in info.value.errors[0].message


def test_a_broken_bus_or_circuit_is_reported_once_not_again_on_its_columns() -> None:
    doc = with_changes((("buses", "rs485-a", "baud"), 7), (("circuits", "f1", "rating_a"), -5))
    check = check_site(doc)
    messages = [f"{e.path}: {e.message}" for e in check.errors]
    assert any(m.startswith("buses.rs485-a.baud") for m in messages), messages
    assert any(m.startswith("circuits.f1.rating_a") for m in messages), messages
    assert not any("unknown bus" in m or "unknown circuit 'f1'" in m for m in messages), messages
    # A name that is truly absent is still reported.
    check = check_site(with_changes((("columns", 0, "bus"), "rs485-z")))
    assert any("unknown bus 'rs485-z'" in e.message for e in check.errors)
