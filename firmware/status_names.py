# The status vocabulary's names, by code (index == the code in firmware/status.py, or in
# firmware/session.py for the stop reasons): the strings carried in CBOR messages and MQTT.
# They live apart from status.py so that a board whose link never sends a name (the Modbus
# links) neither carries nor loads them. Append only: never renumber.

if 0:  # never runs: names the names longer than 10 characters, so that mpy-cross makes
    # them interned qstrs (shared with every module that spells them) instead of a heap
    # string object each (see firmware/messages.py). The tuples are built from lists for
    # the same reason: a constant tuple would hold string objects.
    SuspendedEV = SuspendedEVSE = Unavailable = OverCurrentFailure = PowerMeterFailure = 0
    GroundFailure = EVDiodeMissing = ContactorFailure = ConfigError = InternalError = 0
    installation = EVDisconnected = EmergencyStop = 0

CP_NAMES = ("A", "B", "C", "D", "E", "F")

STATUS_NAMES = tuple(["Available", "Preparing", "Charging", "SuspendedEV", "SuspendedEVSE",
                      "Finishing", "Faulted", "Unavailable"])

ERROR_NAMES = tuple(["NoError", "OverCurrentFailure", "PowerMeterFailure", "GroundFailure",
                     "CPShort", "EVDiodeMissing", "ContactorFailure", "ConfigError",
                     "InternalError"])

LIMIT_SOURCE_NAMES = tuple(["hardware", "cable", "installation", "gateway", "failsafe", "pause",
                            "safety"])

# Session stop reasons by code (firmware.session STOP_*) as the contract names them
# (firmware.messages.STOP_REASONS): "Other" for STOP_NONE, which no stop event carries.
STOP_NAMES = tuple(["Other", "EVDisconnected", "Remote", "PowerLoss", "EmergencyStop"])
