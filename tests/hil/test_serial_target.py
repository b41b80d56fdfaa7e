"""The `serial:PORT` replay target, proven over a pty with the firmware running in the
MicroPython unix port on the other end.

The stand-in board is a VirtualColumn: the target opens its link line by path, exactly
as it opens /dev/ttyUSB0 on a bench, and speaks Modbus RTU to it. The board's analogue
world and its meter come from the stand-in's own I/O line and meter model, and the
power switch restarts its process (ColumnPower).
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.replay.board_io import JsonLinesBoard
from hil.replay.column_link import ModbusBus, TargetError
from hil.replay.mpy import ColumnPower
from hil.replay.realtime import Column, RealtimeColumns
from hil.replay.serial_target import SerialTarget
from hil.replay.target import ColumnInputs
from hil.rig.serial_pair import SerialPair
from hil.rig.vcolumn import VirtualColumn
from tests.hil.test_mpy_target import CONFIG, run_session
from tools.firmware_build import build


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(out=tmp_path_factory.mktemp("bundle")).root


@pytest.fixture
def board(tmp_path: Path, bundle: Path) -> Iterator[VirtualColumn]:
    with VirtualColumn("micropython", tmp_path / "board", CONFIG, bundle=bundle) as vcol:
        yield vcol


def test_a_session_over_a_pty_to_the_micropython_firmware(board: VirtualColumn) -> None:
    switch = ColumnPower(board)
    assert board.link_path is not None
    target = SerialTarget(board.link_path, io_port=board, meter=board.meter,
                          power=lambda column_id, on: switch(on))
    try:
        target.start({"col-1": CONFIG})
        run_session(target, "col-1")
    finally:
        target.close()
    assert switch.cuts == 1


def test_the_board_io_line_speaks_json_lines() -> None:
    with SerialPair() as line:
        io = JsonLinesBoard(line.a_path)
        far = os.open(line.b_path, os.O_RDWR | os.O_NOCTTY)
        try:
            io.board(cp_mv=6000, diode=1)
            assert select.select([far], [], [], 2)[0]
            got = b""
            while not got.endswith(b"\n") and select.select([far], [], [], 2)[0]:
                got += os.read(far, 256)
            assert json.loads(got) == {"cp_mv": 6000, "diode": 1}
            os.write(far, b'{"t": 5, "duty": 2666, "contactor": 1, "offered_da": 160, "status": 2}\n'
                          b"not json\n")
            deadline = time.monotonic() + 2
            while io.outputs().get("duty") != 2666 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert io.outputs() == {"t": 5, "duty": 2666, "contactor": 1, "offered_da": 160, "status": 2}
            assert io.bad_lines == 1
        finally:
            os.close(far)
            io.close()


def test_a_port_where_nobody_answers_is_a_clear_error() -> None:
    with SerialPair() as line:
        target = SerialTarget(line.a_path, boot_timeout_s=0.5, timeout_s=0.05, retries=0)
        with pytest.raises(TargetError) as err:
            target.start({"col-7": dict(CONFIG, bus_address=7)})
        target.close()
    assert "col-7" in str(err.value) and line.a_path in str(err.value) and "bus address 7" in str(err.value)


def test_a_power_cut_without_a_power_switch_is_refused() -> None:
    target = RealtimeColumns()
    target.columns["col-1"] = Column("col-1", CONFIG, ModbusBus("/dev/null"))
    with pytest.raises(TargetError, match="power switch"):
        target.power_cut("col-1", 0, 1000)
    with pytest.raises(TargetError, match="unknown column 'col-2'"):
        target.set_inputs("col-2", 0, ColumnInputs(12000, True, -1, (0, 0, 0), (230, 230, 230), 0))
