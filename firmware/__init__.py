# The column controller firmware. Modules are imported one by one (`from firmware import
# pilot`), so a board loads only what its configuration uses; keep this file empty.
