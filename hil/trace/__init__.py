"""HIL traces: the recorded or generated input a replay drives the firmware and gateway with.

- `hil.trace.format`: the file format (a CBOR sequence), `TraceWriter`, `TraceReader`,
  `Record`, `TraceError`, `make_header`, `summarise`.
- `hil.trace.channels`: the channel vocabulary (names, units, kinds) and `declare`.
- `hil.trace.csv_import`, `hil.trace.sessions_import`: importers, loaded on use.
- `hil.trace.mappings`: the ready import mappings (`openevse-shaper`, `acn-sessions`).
"""

from hil.trace.channels import VOCABULARY, channel_name, declare, split_name
from hil.trace.format import (
    FORMAT,
    VERSION,
    Record,
    TraceError,
    TraceImportError,
    TraceReader,
    TraceWriter,
    make_header,
    summarise,
)

__all__ = [
    "FORMAT", "VERSION", "VOCABULARY", "Record", "TraceError", "TraceImportError", "TraceReader",
    "TraceWriter", "channel_name", "declare", "make_header", "split_name", "summarise",
]
