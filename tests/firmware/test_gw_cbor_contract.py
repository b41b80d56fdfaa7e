# The CBOR link only ever sends stop reasons the message contract knows.
from firmware import messages, session
from firmware.gw_cbor import STOP_NAMES


def test_every_session_stop_reason_maps_into_the_contract():
    assert len(STOP_NAMES) == len(session.STOP_REASON_NAMES)
    for name in STOP_NAMES:
        assert name in messages.STOP_REASONS, name
