# CRC-16/MODBUS (reflected polynomial 0xA001, initial 0xFFFF), shared by the Modbus RTU
# framing, the meter master, the CBOR serial framing and the energy store slots.
# Table-free on purpose: 512 bytes of table would cost more RAM than the bit loop costs time.
const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_POLY = const(0xA001)
_INIT = const(0xFFFF)


def crc16(data, start=0, end=-1, crc=_INIT):
    """CRC of data[start:end] (end -1 = to the end) without slicing, so no allocation."""
    if end < 0:
        end = len(data)
    for i in range(start, end):
        crc ^= data[i]
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ _POLY
            else:
                crc >>= 1
    return crc
