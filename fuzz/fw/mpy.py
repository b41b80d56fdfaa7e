"""A firmware target's corpus run in the MicroPython unix port (``--interp micropython``).

The inputs are made here (the same mutation stream as in CPython), written to a corpus file
in batches and run by fuzz/fw/mpy_run.py under MicroPython with hil.rig.firmware_proc's
run_firmware (fixed heap, timeout). Each input is also run through the same harness in this
CPython process: the two must agree on the outcome and on what the column sent (its digest).
An input still running at the batch timeout is a hang; the rest of its batch runs again.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

from fuzz.engine import (
    MAX_CORPUS,
    MAX_FINDINGS_PER_SHARD,
    FindingRecord,
    Harness,
    ShardResult,
    Target,
    normalise,
)
from hil.rig.firmware_proc import run_firmware

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "mpy_run.py"
BATCH = 2000
HEAP = "256K"

Row = tuple[str, int, int, str]   # status, digest, microseconds, label or message


def _write_corpus(path: Path, values: list[bytes]) -> None:
    with open(path, "wb") as f:
        for v in values:
            f.write(len(v).to_bytes(4, "big"))
            f.write(v)


def _parse(stdout: bytes) -> list[Row]:
    rows = []
    for line in stdout.decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[0].isdigit():
            rows.append((parts[1], int(parts[2]), int(parts[3]), parts[4]))
    return rows


def clean(text: str) -> str:
    """A label as mpy_run.py prints it."""
    return text.replace("\t", " ").replace("\n", "|").replace("\r", " ")[:400]


def run_batch(module: str, values: list[bytes], workdir: Path, timeout_s: float) -> tuple[list[Row], str]:
    """Rows for the inputs that finished, and why the run stopped early (a hang, a fatal
    MicroPython error), "" when it did not."""
    corpus = workdir / "corpus.bin"
    _write_corpus(corpus, values)
    try:
        done = run_firmware("micropython", RUNNER, [module, str(corpus), str(workdir)], heap=HEAP,
                            timeout_s=timeout_s, cwd=workdir)
    except subprocess.TimeoutExpired as exc:
        return _parse(exc.stdout or b""), "timeout after %.0f s" % timeout_s
    rows = _parse(done.stdout)
    if done.returncode != 0 or len(rows) < len(values):
        # The unix port prints an uncaught exception's traceback on stdout, after the rows.
        tail = [line for line in done.stdout.decode("utf-8", "replace").splitlines()[-8:]
                if not line[:1].isdigit() and not line.startswith("done")]
        why = (done.stderr.decode("utf-8", "replace") + " | ".join(tail))[-400:]
        return rows, "exit %d: %s" % (done.returncode, why)
    return rows, ""


class _Shard:
    def __init__(self, target: Target[bytes], workdir: Path) -> None:
        self.target = target
        self.workdir = workdir
        self.result = ShardResult(target.name)
        (workdir / "cpython").mkdir(exist_ok=True)
        self.cpython: Harness[bytes] = target.harness(workdir / "cpython")

    def finding(self, kind: str, message: str, value: bytes) -> None:
        r = self.result
        if kind == "crash":
            r.crashes += 1
        elif kind == "hang":
            r.hangs += 1
        else:
            r.properties += 1
        key = (kind, normalise(message))
        if len(r.findings) < MAX_FINDINGS_PER_SHARD and key not in {(f.kind, normalise(f.message))
                                                                    for f in r.findings}:
            r.findings.append(FindingRecord(kind, message, value))

    def judge(self, value: bytes, row: Row, corpus: list[bytes]) -> None:
        status, digest, us, text = row
        r = self.result
        r.inputs += 1
        if us / 1e6 > r.max_s:
            r.max_s, r.max_data = us / 1e6, value
        if status != "ok":
            self.finding("crash" if status == "crash" else "property", "micropython: " + text, value)
            return
        try:   # the same input in this process: the same outcome and the same bytes sent
            label = clean(self.cpython.run(value) or "")
        except Exception as exc:
            self.finding("property", "cpython: %s: %s" % (type(exc).__name__, exc), value)
            return
        mine = getattr(self.cpython, "inner", self.cpython).digest
        if label != text or mine != digest:
            self.finding("property", "CPython and MicroPython differ: %r/%d vs %r/%d"
                         % (label, mine, text, digest), value)
        if text:
            r.rejected += 1
            for line in text.split("|"):
                key = normalise(line)
                if key not in r.errors and len(corpus) < MAX_CORPUS:
                    corpus.append(value)
                r.errors[key] += 1

    def run(self, values: list[bytes], corpus: list[bytes], hang_s: float) -> bool:
        """False when the runner cannot start at all (then every input would fail alike)."""
        module = str(getattr(self.target, "fw_module", ""))
        todo = values
        while todo:
            rows, problem = run_batch(module, todo, self.workdir, timeout_s=30 + len(todo) * hang_s / 50)
            for value, row in zip(todo, rows, strict=False):
                self.judge(value, row, corpus)
            if len(rows) >= len(todo):
                return True
            if not rows and not problem.startswith("timeout") and todo is values:
                self.result.inputs += 1
                self.finding("crash", "micropython runner failed before its first input: " + problem, todo[0])
                return False
            stuck = todo[len(rows)]   # the input it was running when it stopped
            self.result.inputs += 1
            kind = "hang" if problem.startswith("timeout") else "crash"
            self.finding(kind, "micropython: " + problem, stuck)
            todo = todo[len(rows) + 1:]
        return True


def run_shard_mpy(target: Target[bytes], workdir: Path, *, seed: str, inputs: int,
                  hang_s: float) -> ShardResult:
    rng = random.Random(seed)
    corpus: list[bytes] = list(target.seeds())
    plan = list(corpus)
    shard = _Shard(target, workdir)
    started = time.perf_counter()
    shard.result.started_at = time.time()
    made = 0
    while made < inputs:
        batch = []
        while len(batch) < BATCH and made < inputs:
            batch.append(plan[made] if made < len(plan) else target.mutate(rng, rng.choice(corpus), corpus))
            made += 1
        if not shard.run(batch, corpus, hang_s):
            break
    shard.cpython.close()
    shard.result.seconds = time.perf_counter() - started
    shard.result.cpu_s = shard.result.seconds   # two processes: wall time is the honest figure
    shard.result.ended_at = time.time()
    return shard.result
