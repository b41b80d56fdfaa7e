"""The service's telemetry round for a large site: every online column once, the site message
last, queued in slices with the event loop free between them (a round for thousands of columns
in one go would hold up every poll)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path

from firmware import regmap
from gateway.config import load_config
from gateway.north import topics
from gateway.north.outbox import MessageKind, Outbox, Outgoing
from gateway.service import TELEMETRY_SLICE, GatewayService
from gateway.south.types import decode_inputs
from hil.rig.site_files import new_key, toml_text, write_secrets

N = 2 * TELEMETRY_SLICE + 7


def service(tmp_path: Path) -> GatewayService:
    write_secrets(tmp_path, new_key())
    doc = {
        "site": {"id": "big", "capacity_a": 10000},
        "columns": [{"id": "c%04d" % i, "hardware_a": 32, "link": "modbus-tcp", "host": "127.0.0.1",
                     "port": 1502 + i // 247, "unit": 1 + i % 247} for i in range(N)],
        "mqtt": {"host": "127.0.0.1", "port": 1883, "outbox": {"path": str(tmp_path / "outbox.sqlite3")}},
        "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp_path / "audit.jsonl")},
    }
    site = tmp_path / "site.toml"
    site.write_text(toml_text(doc))
    return GatewayService(load_config(site))


class Recorder(Outbox):
    """The real outbox, remembering each transaction's messages and what else ran in between."""

    def __init__(self, path: Path, between: list[str]) -> None:
        super().__init__(path)
        self.batches: list[list[Outgoing]] = []
        self.between = between

    def enqueue_many(self, messages: Sequence[Outgoing]) -> list[int]:
        self.batches.append(list(messages))
        self.between.append("slice")
        return super().enqueue_many(messages)


def test_a_round_queues_every_online_column_once_in_slices_with_the_loop_free_between(tmp_path: Path) -> None:
    svc = service(tmp_path)
    image = [0] * regmap.POLL_COUNT
    image[regmap.IR_OFFERED_CURRENT] = 160
    offline = {"c0003", "c0300"}
    for cid, view in svc.views.items():
        view.online = cid not in offline
        view.reading = decode_inputs(cid, image, 1)
    between: list[str] = []
    outbox = Recorder(tmp_path / "outbox.sqlite3", between)
    svc.outbox = outbox

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def poll() -> None:   # stands for a poll falling due during the round
            between.append("poll")
            if between.count("poll") < 10:
                loop.call_soon(poll)

        loop.call_soon(poll)
        await svc.telemetry_round()

    asyncio.run(main())
    sent = [m for batch in outbox.batches for m in batch]
    columns = [m for m in sent if m.topic != topics.site_telemetry("big")]
    assert sorted(m.payload["column_id"] for m in columns) == sorted(set(svc.views) - offline)
    assert sent[-1].topic == topics.site_telemetry("big") and len(sent) == len(columns) + 1
    assert all(m.kind is MessageKind.TELEMETRY for m in sent)
    assert len(outbox.batches) == math.ceil(N / TELEMETRY_SLICE)
    assert all(len(b) <= TELEMETRY_SLICE + 1 for b in outbox.batches)
    assert len({m.payload["ts_ms"] for m in sent}) == 1            # one round, one timestamp
    # Other work ran between the slices, not only before or after the round.
    first, last = between.index("slice"), len(between) - 1 - between[::-1].index("slice")
    assert "poll" in between[first:last]
    rows = outbox.peek(0, 10_000)
    assert [r.seq for r in rows] == list(range(1, len(sent) + 1))
    assert json.loads(rows[0].payload)["offered_a"] == 16.0
    outbox.close()
