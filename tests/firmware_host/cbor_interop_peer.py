# Firmware side of the cbor2 interop test, under CPython or the MicroPython unix port.
# Usage: cbor_interop_peer.py IN OUT
# IN is a CBOR sequence written by cbor2. Each item is decoded with firmware.cbor and
# encoded again; OUT gets one line per item: "ok <hex of the re-encoding>" or "err <message>".
import sys

from firmware import cbor

_HEX = "0123456789abcdef"


def hexlify(data):
    return "".join([_HEX[b >> 4] + _HEX[b & 15] for b in data])


def main(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    pos = 0
    with open(dst, "w") as out:
        while pos < len(data):
            try:
                item, pos = cbor.loads_from(data, pos)
                line = "ok " + hexlify(cbor.dumps(item))
            except cbor.CBORError as exc:
                out.write("err %s\n" % exc)
                return
            out.write(line + "\n")


main(sys.argv[1], sys.argv[2])
