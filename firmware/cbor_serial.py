# The CBOR link (firmware/gw_cbor.py) served on a serial line (a UART, RS-485 or not): a
# cbor-serial board's transport, as firmware/cbor_tcp.py is a cbor-tcp board's. Only a
# cbor-serial board loads this module (firmware/links.py), so a TCP board does not carry
# the serial loop, nor a serial board the TCP server.
const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_RX_CHUNK = const(64)  # bytes read from the line at a time


async def serve_serial(link, uart, de_pin, clock, alive):
    """Serve the CborLink `link` on `uart` (`de_pin` drives RS-485 only while sending;
    alive() checks in with the watchdog at every pass). Never returns."""
    link.connected(link.app.rs485_writer(uart, de_pin), clock.ticks_ms())
    # A small read buffer emptied in a loop (the frame reader holds the frame), handed
    # over as a view, not a copy: the link takes every byte of it before on_bytes
    # returns (FrameReader.feed), so rx is free again for the next read.
    rx = bytearray(_RX_CHUNK)
    view = memoryview(rx)
    while True:
        alive()
        n = uart.readinto(rx)
        while n:
            link.on_bytes(view[0:n], clock.ticks_ms())
            n = uart.readinto(rx) if n == _RX_CHUNK else 0  # a full read: more may wait
        await clock.sleep_ms(2)  # an int: asyncio.sleep(s) makes a float every time
