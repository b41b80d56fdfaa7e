"""The fuzz loop: mutate, run one input through a target's harness, judge, count.

A target (fuzz/targets/) gives seeds made by the project's own encoders, a mutator, and a
harness whose `run(value)` feeds one input to the real entry point and checks what came
out. `run` returns the error the code under test reported (the expected outcome for a bad
input: a reason code, a config error; several separated by newlines, each counted per
distinct message) or None when the input was accepted. It raises `Finding` when a
property is broken (a limit changed by an invalid input, a reply that is not the right
Modbus exception, an error of the wrong type). Any other exception escaping a harness is
a crash; an input still running after `hang_s` is a hang. Each finding keeps its input so
that it becomes a regression case (fuzz/regressions/<target>/<sha1>.<ext>).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

REPO = Path(__file__).resolve().parents[1]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
MAX_FINDINGS_PER_SHARD = 20
MAX_CORPUS = 400          # inputs kept per shard (seeds plus mutants that showed a new error)

T = TypeVar("T")


class Finding(Exception):
    """A property of the code under test is broken; the message says which."""


class Hang(KeyboardInterrupt):
    """Raised from a timer signal inside an input that runs too long. A KeyboardInterrupt so
    that asyncio lets it through (it swallows other exceptions raised in callbacks)."""


class Harness(Generic[T]):
    """Runs inputs through the code under test; one per worker process (see Target.harness)."""

    def run(self, value: T) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Target(Generic[T]):
    """One fuzz target. Subclasses set `name`, `ext` ("bin" or "json") and `about`."""

    name = ""
    ext = "bin"
    about = ""
    micropython = False       # its harness also runs in the MicroPython unix port

    def seeds(self) -> list[T]:
        raise NotImplementedError

    def mutate(self, rng: random.Random, value: T, corpus: Sequence[T]) -> T:
        raise NotImplementedError

    def harness(self, workdir: Path) -> Harness[T]:
        raise NotImplementedError

    def encode(self, value: T) -> bytes:
        assert isinstance(value, bytes | bytearray)
        return bytes(value)

    def decode(self, data: bytes) -> T:
        return data  # type: ignore[return-value]


_HEX = re.compile(r"\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{4,}\b")
_DIGITS = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def normalise(message: str) -> str:
    """An error message with its numbers and quoted values blanked, so that messages count
    by kind ('x: 81 is out of range 6..80' and 'x: 99 ...' are one)."""
    text = _QUOTED.sub("'…'", message)
    text = _HEX.sub("X", text)   # frames shown in hex
    text = _DIGITS.sub("N", text)
    return text[:120]


@dataclass
class FindingRecord:
    kind: str             # crash, hang, property
    message: str
    data: bytes           # the encoded input


@dataclass
class ShardResult:
    target: str
    inputs: int = 0
    seconds: float = 0.0          # wall time of the workers
    cpu_s: float = 0.0            # their CPU time (the rate on a shared machine is inputs / cpu_s)
    started_at: float = 0.0       # wall clock (time.time) of the first shard's start ...
    ended_at: float = 0.0         # ... and of the last shard's end
    rejected: int = 0             # inputs the code under test reported an error for
    errors: Counter[str] = field(default_factory=Counter)
    findings: list[FindingRecord] = field(default_factory=list)
    crashes: int = 0
    hangs: int = 0
    properties: int = 0
    max_s: float = 0.0
    max_data: bytes = b""         # the slowest input

    def merge(self, other: ShardResult) -> None:
        self.inputs += other.inputs
        self.seconds += other.seconds
        self.cpu_s += other.cpu_s
        self.started_at = min(self.started_at or other.started_at, other.started_at)
        self.ended_at = max(self.ended_at, other.ended_at)
        self.rejected += other.rejected
        self.errors.update(other.errors)
        seen = {(f.kind, normalise(f.message)) for f in self.findings}
        for f in other.findings:
            if (f.kind, normalise(f.message)) not in seen:
                self.findings.append(f)
                seen.add((f.kind, normalise(f.message)))
        self.crashes += other.crashes
        self.hangs += other.hangs
        self.properties += other.properties
        if other.max_s > self.max_s:
            self.max_s, self.max_data = other.max_s, other.max_data

    @property
    def finding_count(self) -> int:
        return self.crashes + self.hangs + self.properties


class _Clock:
    """What the hang timer looks at: when the current input started (None between inputs)."""

    def __init__(self) -> None:
        self.started: float | None = None


@contextmanager
def hang_timer(clock: _Clock, hang_s: float) -> Iterator[None]:
    """A timer signal that raises Hang inside an input running longer than hang_s. Costs
    nothing per input: the handler only compares the current input's start time."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def tick(_signum: int, _frame: Any) -> None:
        started = clock.started
        if started is not None and time.perf_counter() - started > hang_s:
            clock.started = None
            raise Hang("input still running after %.1f s" % hang_s)

    old = signal.signal(signal.SIGALRM, tick)
    period = max(0.05, min(0.5, hang_s / 4))
    signal.setitimer(signal.ITIMER_REAL, period, period)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Verdict:
    kind: str | None              # None, "crash", "hang", "property"
    message: str | None           # the error label (kind None) or what went wrong
    seconds: float


def judge(harness: Harness[Any], value: Any, clock: _Clock) -> Verdict:
    """Run one input and classify what happened."""
    t0 = time.perf_counter()
    clock.started = t0
    try:
        label = harness.run(value)
        kind, message = None, label
    except Hang as exc:
        kind, message = "hang", str(exc)
    except Finding as exc:
        kind, message = "property", str(exc)
    except Exception as exc:
        kind, message = "crash", "%s: %s" % (type(exc).__name__, str(exc)[:300])
    finally:
        clock.started = None
    return Verdict(kind, message, time.perf_counter() - t0)


def run_shard(target: Target[Any], make_harness: Callable[[], Harness[Any]], *, seed: str, inputs: int,
              hang_s: float, extra_seeds: Sequence[Any] = ()) -> ShardResult:
    """`inputs` mutated inputs (the seeds first, unmutated) through one harness."""
    rng = random.Random(seed)
    result = ShardResult(target.name)
    corpus: list[Any] = list(target.seeds()) + list(extra_seeds)
    plan = list(corpus)
    harness = make_harness()
    clock = _Clock()
    started = time.perf_counter()
    result.started_at = time.time()
    cpu0 = time.process_time()
    try:
        with hang_timer(clock, hang_s):
            for i in range(inputs):
                if i < len(plan):
                    value = plan[i]
                else:
                    value = target.mutate(rng, rng.choice(corpus), corpus)
                verdict = judge(harness, value, clock)
                result.inputs += 1
                if verdict.seconds > result.max_s:
                    result.max_s, result.max_data = verdict.seconds, target.encode(value)
                if verdict.kind is None:
                    if verdict.message is not None:
                        result.rejected += 1
                        for line in verdict.message.split("\n"):   # one input may report several
                            key = normalise(line)
                            if key not in result.errors and len(corpus) < MAX_CORPUS:
                                corpus.append(value)   # a new kind of error: worth mutating further
                            result.errors[key] += 1
                    continue
                if verdict.kind == "crash":
                    result.crashes += 1
                elif verdict.kind == "hang":
                    result.hangs += 1
                else:
                    result.properties += 1
                if len(result.findings) < MAX_FINDINGS_PER_SHARD and not any(
                        f.kind == verdict.kind and normalise(f.message) == normalise(verdict.message or "")
                        for f in result.findings):
                    result.findings.append(FindingRecord(verdict.kind, verdict.message or "",
                                                         target.encode(value)))
                if verdict.kind != "property":   # its state may be broken: start afresh
                    harness.close()
                    harness = make_harness()
    finally:
        harness.close()
    result.seconds = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu0
    result.ended_at = time.time()
    return result


def replay(target: Target[Any], harness: Harness[Any], data: bytes, hang_s: float = 10.0) -> Verdict:
    """One stored input through a harness (regression cases)."""
    clock = _Clock()
    with hang_timer(clock, hang_s):
        return judge(harness, target.decode(data), clock)


def scratch_dir() -> str | None:
    """A RAM-backed folder for the harnesses' files when there is one (a disk shared with
    other jobs makes every file write cost a millisecond)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def regression_path(root: Path, target: Target[Any], data: bytes) -> Path:
    return root / target.name / ("%s.%s" % (hashlib.sha1(data).hexdigest(), target.ext))


def save_findings(root: Path, target: Target[Any], findings: Sequence[FindingRecord]) -> list[Path]:
    paths = []
    for f in findings:
        path = regression_path(root, target, f.data)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)
        paths.append(path)
    return paths


def regression_files(root: Path, name: str) -> list[Path]:
    folder = root / name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".json"))
