# The CBOR (RFC 8949) codec of the gateway link, for the host (the gateway, the HIL, the
# tests, the fuzzers). It is defined in firmware/cbor_wire.py, which a CBOR board loads
# with the framing; a board never imports this module.
from .cbor_wire import MAX_DEPTH, MAX_ITEMS, CBORError, dumps, loads

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "CBORError", "dumps", "loads", "loads_from"]


def loads_from(data, offset=0, max_items=MAX_ITEMS):
    """Decode one item starting at offset; return (item, offset after it)."""
    return loads(data, max_items, offset)
