"""Site gateway: columns southbound (Modbus RTU/TCP, CBOR link), the DNO northbound (MQTT)."""
