# The status vocabulary's names, by code (index == the code in firmware/status.py): the
# strings carried in CBOR messages and MQTT. They live apart from status.py so that a
# board whose link never sends a name (the Modbus links) neither carries nor loads them.
# Append only: never renumber.

CP_NAMES = ("A", "B", "C", "D", "E", "F")

STATUS_NAMES = ("Available", "Preparing", "Charging", "SuspendedEV", "SuspendedEVSE",
                "Finishing", "Faulted", "Unavailable")

ERROR_NAMES = ("NoError", "OverCurrentFailure", "PowerMeterFailure", "GroundFailure",
               "CPShort", "EVDiodeMissing", "ContactorFailure", "ConfigError",
               "InternalError")

LIMIT_SOURCE_NAMES = ("hardware", "cable", "installation", "gateway", "failsafe", "pause",
                      "safety")
