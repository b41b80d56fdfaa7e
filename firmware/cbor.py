# The CBOR (RFC 8949) codec of the gateway link, for the host (the gateway, the HIL, the
# tests, the fuzzers). It is defined in firmware/cbor_link.py, next to the framing and the
# link that use it: a board loads one module for the three (each module costs a board RAM of
# its own), and never imports this one.
from .cbor_link import MAX_DEPTH, MAX_ITEMS, CBORError, dumps, loads, loads_from

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "CBORError", "dumps", "loads", "loads_from"]
