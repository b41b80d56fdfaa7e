# The column controller firmware. Modules are imported one by one (`from firmware import
# pilot`), so a board loads only what its configuration uses; keep this file empty.
# Inside the package, module-level imports are relative (`from .pilot import ...`: shorter
# .mpy files); imports inside functions stay absolute: a relative one there was measured to
# cost about 1 KB of heap at run time (bench firmware_footprint).
