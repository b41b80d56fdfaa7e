"""Northbound: the DNO control room over MQTT, with an on-disk outbox."""
