# The framing of CBOR messages on a byte stream (SYNC | LEN | payload | CRC16), for the host
# (the gateway, the HIL, the tests, the docs generator). It is defined in
# firmware/cbor_wire.py, which a CBOR board loads with the codec; a board never imports this
# module.
from .cbor_wire import MAX_PAYLOAD, OVERHEAD, SYNC, FrameReader, encode_frame

__all__ = ["MAX_PAYLOAD", "OVERHEAD", "SYNC", "FrameReader", "encode_frame"]
