"""What the topic tree costs per site: the figures quoted in docs/deployment.md, computed from
the real payload builders and topic builders (test_asyncapi checks the doc quotes this table).

Run `python -m tests.gateway.api_cost` to print the table.

Model: every telemetry interval a site publishes one site telemetry message and one column
telemetry message per column (events, status changes and acks add well under 1 %). Sizes are
the encoded JSON of realistic, full-width values (a 12-character site id, 4-character column
ids, an 8-digit seq, 13-digit timestamps). MQTT bytes are PUBLISH packets (MQTT 5, QoS 1:
fixed header, topic, packet id, empty properties, payload) plus the 4-byte PUBACK. Wire bytes
add, per message and per PUBACK, a TLS 1.3 record (22 bytes) and TCP/IPv4 headers (40 bytes),
as when the gateway sends each message in its own segment (TCP_NODELAY, low rate); batching
at higher rates only lowers it.
"""

from __future__ import annotations

from gateway.north import payloads, topics
from gateway.north.payloads import encode

SITE_ID = "depot-000001"
COLUMN_ID = "c001"
SEQ = 12_345_678
TS_MS = 1_767_225_600_000
TLS_RECORD = 22
TCP_IP = 40
PUBACK = 4
SCENARIOS = ((6, 10), (20, 10), (100, 10), (20, 60))


def _publish_bytes(topic: str, payload: bytes) -> int:
    remaining = 2 + len(topic.encode()) + 2 + 1 + len(payload)   # topic len, topic, packet id, props len
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3
    return 1 + length_bytes + remaining


def column_message() -> tuple[str, bytes]:
    body = payloads.column_telemetry(
        ts_ms=TS_MS, column_id=COLUMN_ID, current_a=[15.8, 15.9, 15.7], voltage_v=[230.1, 229.8, 231.0],
        power_w=10905.0, energy_wh=1523440.0, offered_a=16.0, applied_limit_a=16.0, limit_source="gateway",
        state="C", status="Charging")
    return topics.column_telemetry(SITE_ID, COLUMN_ID), encode({**body, "seq": SEQ})


def site_message() -> tuple[str, bytes]:
    body = payloads.site_telemetry(ts_ms=TS_MS, power_w=43620.0, current_a=[63.2, 62.9, 63.0], limit_a=63.0,
                                   limit_source="dno", limit_valid_until_ms=TS_MS + 900_000,
                                   active_sessions=4)
    return topics.site_telemetry(SITE_ID), encode({**body, "seq": SEQ})


def per_message() -> dict[str, tuple[int, int, int]]:
    """kind -> (JSON payload bytes, MQTT bytes incl. PUBACK, wire bytes incl. PUBACK)."""
    out = {}
    for kind, (topic, payload) in (("column", column_message()), ("site", site_message())):
        mqtt_bytes = _publish_bytes(topic, payload) + PUBACK
        out[kind] = (len(payload), mqtt_bytes, mqtt_bytes + 2 * (TLS_RECORD + TCP_IP))
    return out


def cost_table() -> str:
    sizes = per_message()
    lines = ["| columns | telemetry interval | messages/s | MQTT kB/s | MQTT MB/day | on the wire MB/day "
             "| retained topics |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for columns, interval_s in SCENARIOS:
        per_tick_mqtt = columns * sizes["column"][1] + sizes["site"][1]
        per_tick_wire = columns * sizes["column"][2] + sizes["site"][2]
        rate = (columns + 1) / interval_s
        day = 86_400 / interval_s
        lines.append(f"| {columns} | {interval_s} s | {rate:.1f} | {per_tick_mqtt / interval_s / 1000:.2f} "
                     f"| {per_tick_mqtt * day / 1e6:.1f} | {per_tick_wire * day / 1e6:.1f} | {columns + 2} |")
    return "\n".join(lines)


def size_line() -> str:
    sizes = per_message()
    column, site = sizes["column"], sizes["site"]
    return (f"A column telemetry message is {column[0]} bytes of JSON ({column[1]} bytes of "
            f"MQTT with its PUBACK, about {column[2]} on the wire); a site telemetry message "
            f"{site[0]} bytes ({site[1]}, about {site[2]}).")


if __name__ == "__main__":
    print(size_line())
    print()
    print(cost_table())
