# Status vocabulary shared by the firmware, the gateway and the HIL (the contract).
# Codes are the values carried in Modbus registers; the names carried in CBOR messages and
# MQTT are in status_names.py (index == code), which the CBOR link and host code import
# themselves, so that a board that never sends a name (the Modbus links) never carries
# them. Append only: never renumber.
const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

# IEC 61851 control pilot states.
CP_A = const(0)  # no vehicle (+12 V)
CP_B = const(1)  # vehicle connected, not ready (+9 V)
CP_C = const(2)  # ready, charging (+6 V)
CP_D = const(3)  # charging with ventilation (+3 V)
CP_E = const(4)  # CP short / no supply (0 V)
CP_F = const(5)  # EVSE not available (-12 V)

# OCPP-like connector status.
ST_AVAILABLE = const(0)
ST_PREPARING = const(1)
ST_CHARGING = const(2)
ST_SUSPENDED_EV = const(3)
ST_SUSPENDED_EVSE = const(4)
ST_FINISHING = const(5)
ST_FAULTED = const(6)
ST_UNAVAILABLE = const(7)

# Error codes reported with a status (OCPP vocabulary plus the column's own).
ERR_NONE = const(0)
ERR_OVER_CURRENT = const(1)      # car drew more than offered + tolerance for the grace time
ERR_POWER_METER = const(2)       # meter stale or failing
ERR_GROUND = const(3)            # RCD / residual current tripped
ERR_CP_SHORT = const(4)          # state E
ERR_DIODE = const(5)             # EV diode missing (no -12 V low level)
ERR_CONTACTOR = const(6)         # contactor feedback disagrees with the command
ERR_CONFIG = const(7)            # configuration invalid: safe, non-charging state
ERR_INTERNAL = const(8)          # a task died or a check failed

# Where the offered current's binding limit comes from.
SRC_HARDWARE = const(0)
SRC_CABLE = const(1)
SRC_INSTALLATION = const(2)
SRC_GATEWAY = const(3)
SRC_FAILSAFE = const(4)
SRC_PAUSE = const(5)       # below 6 A, paused (with minimum pause time)
SRC_SAFETY = const(6)      # fault, overdraw, meter failure, disabled

