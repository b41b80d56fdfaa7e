# The framing of CBOR messages on a byte stream (SYNC | LEN | payload | CRC16), for the host
# (the gateway, the HIL, the tests, the docs generator). It is defined in firmware/cbor_link.py,
# next to the link that uses it: a board loads one module for both (each module costs a board
# RAM of its own), and never imports this one.
from .cbor_link import MAX_PAYLOAD, OVERHEAD, SYNC, FrameReader, encode_frame

__all__ = ["MAX_PAYLOAD", "OVERHEAD", "SYNC", "FrameReader", "encode_frame"]
