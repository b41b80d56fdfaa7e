# One end of the CBOR message link, for host code: the gateway's (side=FROM_GATEWAY), test
# peers, the fuzzers. The link is defined in firmware/msg_link.py, which a CBOR board loads
# with the contract; this module adds what only host code uses: reset(), pending_calls()
# and the counters' names. A board never imports it.
from . import msg_link

# The link's counters, in order (msg_link.Link.__init__ names them; a board never lists them).
COUNTERS = tuple(msg_link.Link(None, None, max_payload=1).counters)


class Link(msg_link.Link):
    """msg_link.Link (see there), with the number of calls waiting for an answer and a
    reset for a new connection."""

    def pending_calls(self):
        return len(self._pending) - self._pending.count(None)

    def reset(self):
        """A new connection: forget any partial frame (pending calls run to their timeout)."""
        self.reader.reset()
