"""The fuzz loop itself: what counts as an error, a crash, a broken property and a hang, and
that a finding is kept as a regression case. A toy target whose harness misbehaves on cue."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

from fuzz.engine import (
    Finding,
    Harness,
    Target,
    normalise,
    regression_files,
    replay,
    run_shard,
    save_findings,
)


class _Toy(Harness[bytes]):
    def run(self, value: bytes) -> str | None:
        if value.startswith(b"hang"):
            while True:   # a CPU spin: only the timer signal gets out of it
                time.sleep(0)
        if value.startswith(b"crash"):
            raise KeyError(value)
        if value.startswith(b"limit"):
            raise Finding("limit changed by " + value.decode())
        if value.startswith(b"bad"):
            return "bad input: %d bytes\nsecond error" % len(value)
        return None


class ToyTarget(Target[bytes]):
    name = "toy"

    def __init__(self, plan: list[bytes]) -> None:
        self.plan = plan

    def seeds(self) -> list[bytes]:
        return list(self.plan)

    def mutate(self, rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
        return b"ok"

    def harness(self, workdir: Path) -> Harness[bytes]:
        return _Toy()


def test_outcomes_are_counted_by_kind(tmp_path: Path) -> None:
    target = ToyTarget([b"ok", b"bad 1", b"bad 22", b"crash!", b"limit 1", b"limit 2", b"hang", b"ok"])
    made = []

    def make() -> Harness[bytes]:
        made.append(1)
        return target.harness(tmp_path)

    result = run_shard(target, make, seed="t", inputs=20, hang_s=0.3)
    assert result.inputs == 20
    assert (result.crashes, result.hangs, result.properties) == (1, 1, 2)
    assert result.rejected == 2 and result.errors == {"bad input: N bytes": 2, "second error": 2}
    assert [f.kind for f in result.findings] == ["crash", "property", "hang"]   # one per distinct message
    assert len(made) == 3   # a fresh harness after the crash and after the hang
    assert 0.3 <= result.max_s < 5 and result.max_data == b"hang"
    saved = save_findings(tmp_path / "regressions", target, result.findings)
    assert [p.parent.name for p in saved] == ["toy"] * 3
    assert sorted(regression_files(tmp_path / "regressions", "toy")) == sorted(saved)
    verdicts = [replay(target, _Toy(), p.read_bytes(), hang_s=0.3).kind for p in saved]
    assert sorted(v for v in verdicts if v) == ["crash", "hang", "property"]


def test_messages_count_by_kind_not_by_value() -> None:
    assert normalise("x: 81 is out of range 6..80") == normalise("x: 99.5 is out of range 6..80")
    assert normalise("request 070400000020f1b4: reply") == normalise("request 0a0b0c0d0e: reply")
    assert normalise("columnId 'a' is not 'b'") == normalise("columnId 'zz' is not 'c01'")
    assert normalise("bad_crc") != normalise("bad_json")
