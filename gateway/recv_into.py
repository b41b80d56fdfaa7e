"""Protocols whose reads land in a small buffer of their own.

Why: a plain ``asyncio.Protocol`` is fed by ``sock.recv(256 KiB)``. Every read, even of the
12 bytes of a Modbus reply or the 4 of a PUBACK, allocates 256 KiB, which glibc maps, shrinks
and unmaps around the system call (mmap, mremap, munmap: strace counts them per read). A
gateway reads once per column and second and per acknowledged message: ``recv_into`` a
buffer sized for the protocol's frames does none of that (on this machine a 17-byte read
took 17.7 µs with recv(256 KiB), 2.7 µs with recv_into; bench/columns_per_core.py measures
the gateway's CPU per column).
"""

from __future__ import annotations

import asyncio


class RecvIntoProtocol(asyncio.BufferedProtocol):
    """A BufferedProtocol that hands each read to ``data_received`` as bytes, as a Protocol
    would. Subclasses call ``init_reads(size)`` before the connection is made; a read never
    takes more than `size` bytes (the rest waits for the next one)."""

    __slots__ = ("_rx",)

    def init_reads(self, size: int) -> None:
        self._rx = memoryview(bytearray(size))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rx

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._rx[:nbytes]))   # a copy: the buffer takes the next read

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError
