# Firmware fuzz harnesses: MicroPython-compatible, run in process by CPython
# (fuzz/targets/modbus_fw.py, cbor_fw.py) and in the MicroPython unix port by mpy_run.py.
