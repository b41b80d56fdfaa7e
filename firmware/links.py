# The modules each gateway link mode loads on top of the core, in load order (dependencies
# first); the last one holds the link. The one list of them: App.run() reads it once at boot
# (then unloads it: a table a board reads once should not hold RAM for good), and
# tools/firmware_build.py reads it, with every module's import statements, to bundle only
# what a board of one link mode imports.
LINKS = (
    ("modbus-rtu", ("regmap", "modbus_slave", "modbus", "gw_modbus")),
    ("modbus-tcp", ("regmap", "modbus_slave", "tcp_link", "modbus_tcp", "gw_modbus")),
    ("cbor-serial", ("cbor_wire", "msg_link", "cbor_serial", "gw_cbor")),
    ("cbor-tcp", ("cbor_wire", "msg_link", "tcp_link", "cbor_tcp", "gw_cbor")),
)
