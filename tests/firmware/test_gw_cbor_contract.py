# The CBOR link only ever sends stop reasons the message contract knows, one for every
# session stop reason code.
from firmware import messages, session
from firmware.gw_cbor import STOP_NAMES


def test_every_session_stop_reason_maps_into_the_contract():
    codes = (session.STOP_NONE, session.STOP_EV_DISCONNECTED, session.STOP_REMOTE,
             session.STOP_POWER_LOSS, session.STOP_EMERGENCY)
    assert len(STOP_NAMES) == len(codes)
    for code in codes:
        assert STOP_NAMES[code] in messages.STOP_REASONS, code
    assert STOP_NAMES[session.STOP_NONE] == "Other"
    assert STOP_NAMES[session.STOP_EV_DISCONNECTED] == "EVDisconnected"
    assert STOP_NAMES[session.STOP_EMERGENCY] == "EmergencyStop"
