"""Southbound adapters: Modbus RTU bus master, Modbus TCP, CBOR message link, site meter."""
