"""RecvIntoProtocol on a real loopback connection: every byte arrives, in order, as bytes that
stay as they were when the buffer takes the next read; a read never exceeds the buffer."""

from __future__ import annotations

import asyncio

from gateway.recv_into import RecvIntoProtocol

PAYLOAD = bytes(range(256)) * 40   # 10,240 bytes: many reads of a 512-byte buffer


class Collector(RecvIntoProtocol):
    def __init__(self, size: int) -> None:
        self.init_reads(size)
        self.chunks: list[bytes] = []
        self.copies: list[bytes] = []   # each chunk as it was when it arrived
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.copies.append(bytes(bytearray(data)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


def test_a_stream_longer_than_the_buffer_arrives_whole_and_in_order() -> None:
    async def main() -> Collector:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(PAYLOAD)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            _t, proto = await asyncio.get_running_loop().create_connection(
                lambda: Collector(512), "127.0.0.1", port)
            await asyncio.wait_for(proto.lost, 10)
        finally:
            server.close()
            await server.wait_closed()
        return proto

    proto = asyncio.run(main())
    assert b"".join(proto.chunks) == PAYLOAD
    assert len(proto.chunks) >= len(PAYLOAD) // 512
    assert all(type(c) is bytes and 0 < len(c) <= 512 for c in proto.chunks)
    assert proto.chunks == proto.copies   # no chunk is a view the next read overwrote
