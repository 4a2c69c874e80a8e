"""multiprocessing's pipe framing, read without ever blocking the event loop.

The server's event loop reads the engine's messages itself (a reader callback), so the read
side must cope with a non-blocking descriptor (uvloop makes it so) and a message that has
only partly arrived; the write side waits out a full pipe (a 2 MB prompt is more than a
socket buffer holds).
"""

from __future__ import annotations

import os
import pickle
import select
import struct
from collections.abc import Iterator
from typing import Any


class Frames:
    """A Connection's messages read as the bytes arrive, never blocking: the event loop's
    reader may find the descriptor non-blocking (uvloop makes it so) and a message only
    partly written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def read(self) -> bool:
        """Take what has arrived; False at end of stream (the engine process is gone)."""
        try:
            data = os.read(self.fd, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return True
        self.buf += data
        return bool(data)

    def ready(self, timeout: float) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])

    def messages(self) -> Iterator[Any]:
        """Every complete message in the buffer (multiprocessing's framing: a 4-byte length,
        or -1 and an 8-byte one)."""
        while len(self.buf) >= 4:
            (size,), head = struct.unpack("!i", self.buf[:4]), 4
            if size == -1:
                if len(self.buf) < 12:
                    return
                (size,), head = struct.unpack("!Q", self.buf[4:12]), 12
            if len(self.buf) < head + size:
                return
            payload = bytes(self.buf[head : head + size])
            del self.buf[: head + size]
            yield pickle.loads(payload)


def write_frame(fd: int, msg: Any) -> None:
    """Send one message in multiprocessing's framing, waiting out a full buffer on a
    non-blocking descriptor (a 2 MB prompt is more than a socket buffer holds)."""
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    n = len(payload)
    head = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
    view = memoryview(head + payload)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
