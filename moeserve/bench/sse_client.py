"""The load tester's streaming POSTs over plain HTTP/1.1 on asyncio protocols, without httpx.

httpx spends tens of microseconds of CPU per SSE event (h11's parser, anyio streams, a stack
of async generators that each resume per read): at 64 streams and 20k tokens/s the load
tester used most of a core and became the bottleneck it meant to measure. Here a response is
parsed inside the transport's data_received callback (status line, headers, a chunked,
Content-Length or read-until-close body) and its SSE lines are split with bytes operations;
every `data:` payload goes straight to a callback, so no coroutine resumes per event. http://
only. Keep-alive connections are reused: the caller is woken at [DONE], and the connection
returns to the pool when the body's last chunk follows.

Failures raise httpx's exception classes, with httpx's messages where it has one, so the load
tester records them as it does for its httpx path.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httpx

OnData = Callable[[bytes], bool]  # one `data:` payload, stripped; True: the caller is done

MAX_HEAD = 64 * 1024  # a status line and headers longer than this are not HTTP we can read
MAX_ERROR_BODY = 1 << 20  # of a non-200 body, only the start is kept for the error message

_NO_RESPONSE = "Server disconnected without sending a response."
_INCOMPLETE = "peer closed connection without sending complete message body"


class SSELines:
    """Split a text/event-stream body into lines (ending in LF, CRLF or CR, as in the SSE
    spec) and hand every `data:` payload, stripped, to `on_data` until it returns True."""

    __slots__ = ("_on_data", "_tail", "stopped")

    def __init__(self, on_data: OnData) -> None:
        self._on_data, self._tail, self.stopped = on_data, b"", False

    def feed(self, data: bytes) -> bool:
        """Some more of the body; True once `on_data` has returned True."""
        if self.stopped:
            return True
        if self._tail:
            data = self._tail + data
        if b"\r" in data:  # a CRLF cut in two becomes two line ends: the blank line is skipped
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self._tail = lines.pop()  # the line not yet ended
        on_data = self._on_data
        for line in lines:
            if line.startswith(b"data:") and on_data(line[5:].strip()):
                self.stopped, self._tail = True, b""
                return True
        return False

    def close(self) -> bool:
        """The body has ended: its last line counts even without a line break."""
        tail, self._tail = self._tail, b""
        return self.feed(tail + b"\n") if tail else self.stopped


# Where a response is in its body.
_HEAD, _CHUNKED, _LENGTH, _UNTIL_EOF, _COMPLETE = range(5)


READ_SIZE = 64 * 1024


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time, parsed as its bytes arrive.

    A buffered protocol: the loop reads into one buffer per connection, where for a plain
    Protocol asyncio's own loop allocates a 256 KiB bytes object per read.
    """

    def __init__(self, pool: StreamClient) -> None:
        self.pool = pool
        self.buffer = memoryview(bytearray(READ_SIZE))
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.state = _COMPLETE
        self.future: asyncio.Future[tuple[int, bytes]] | None = None
        self.released = False  # the caller is done with it: back to the pool once complete
        self.lines = SSELines(lambda _: True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def send(self, request: bytes, on_data: OnData) -> asyncio.Future[tuple[int, bytes]]:
        """Write `request`; the future gets (status, body) at the end of a non-200 response,
        (200, b"") once `on_data` says it is done or a 200 body ends."""
        assert self.transport is not None and self.state == _COMPLETE
        self.future = asyncio.get_running_loop().create_future()
        self.lines = SSELines(on_data)
        self.state, self.head = _HEAD, b""
        self.status, self.body, self.keep_alive, self.released = 0, b"", False, False
        self.size_line, self.chunk_left, self.crlf_left, self.trailer = b"", 0, 0, False
        self.length = self.length_left = 0
        self.transport.write(request)
        return self.future

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.future is None or self.state == _COMPLETE:  # nothing was asked: not HTTP/1.1
            self.abort()
            return
        try:
            if self.state == _HEAD:
                data = self._head(data)
            if self.state == _CHUNKED:
                self._chunked(data)
            elif self.state == _LENGTH:
                piece, extra = data[: self.length_left], data[self.length_left :]
                self.length_left -= len(piece)
                self._body(piece)
                if not self.length_left:
                    self._complete(extra)
            elif self.state == _UNTIL_EOF:
                self._body(data)
        except Exception as e:  # a malformed response, or on_data raised (a chunk not JSON)
            self._fail(e)

    def _head(self, data: bytes) -> bytes:
        """Collect the status line and headers; return the bytes after them."""
        self.head += data
        while True:
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    raise httpx.RemoteProtocolError("the response headers are too long")
                return b""
            head, rest = self.head[:end], self.head[end + 4 :]
            lines = head.split(b"\r\n")
            try:
                version, status, *_ = lines[0].split(b" ", 2)
                self.status = int(status)
            except ValueError:
                raise httpx.RemoteProtocolError(f"illegal status line: {lines[0]!r}") from None
            if 100 <= self.status < 200:  # an interim response (100 Continue): the next head
                self.head = rest
                continue
            break
        self.head = b""
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        connection = headers.get(b"connection", b"")
        self.keep_alive = (
            b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
        )
        encoding = headers.get(b"content-encoding", b"identity")
        if encoding != b"identity":  # never asked for (no Accept-Encoding is sent)
            raise httpx.DecodingError(f"unsupported Content-Encoding {encoding.decode()!r}")
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            self.state = _CHUNKED
        elif b"content-length" in headers:
            try:
                self.length_left = self.length = int(headers[b"content-length"])
            except ValueError:
                raise httpx.RemoteProtocolError("illegal Content-Length header") from None
            self.state = _LENGTH
            if not self.length:
                self._complete(rest)
                return b""
        else:
            self.state, self.keep_alive = _UNTIL_EOF, False
        return rest

    def _chunked(self, data: bytes) -> None:
        """Decode chunked transfer coding; a size line may span reads, a payload may too."""
        if self.size_line:
            data, self.size_line = self.size_line + data, b""
        pos, n, pieces = 0, len(data), []
        while pos < n:
            if self.chunk_left:  # payload bytes
                end = min(n, pos + self.chunk_left)
                pieces.append(data[pos:end])
                self.chunk_left -= end - pos
                pos = end
                if not self.chunk_left:
                    self.crlf_left = 2
            elif self.crlf_left:  # the CRLF after a payload
                skip = min(self.crlf_left, n - pos)
                pos += skip
                self.crlf_left -= skip
            else:  # a size line, or a trailer line after the last chunk
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.size_line = data[pos:]
                    if len(self.size_line) > MAX_HEAD:
                        raise httpx.RemoteProtocolError("illegal chunk header")
                    break
                line, pos = data[pos:nl].rstrip(b"\r"), nl + 1
                if self.trailer:
                    if not line:  # the blank line that ends the trailer: the body is over
                        self._body(b"".join(pieces))
                        self._complete(data[pos:])
                        return
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"illegal chunk header: {line!r}") from None
                if size:
                    self.chunk_left = size
                else:
                    self.trailer = True
        if pieces:
            self._body(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _body(self, data: bytes) -> None:
        if not data:
            return
        if self.status != 200:
            if len(self.body) < MAX_ERROR_BODY:
                self.body += data
        elif not self.lines.stopped and self.lines.feed(data):
            self._resolve()  # the caller is done ([DONE], an error chunk): wake it now

    def _resolve(self) -> None:
        if self.future is not None and not self.future.done():
            body = b"" if self.status == 200 else self.body
            self.future.set_result((self.status, body))

    def _complete(self, extra: bytes) -> None:
        """The response is whole; the connection is reusable unless bytes follow it."""
        if self.status == 200:
            self.lines.close()
        self._resolve()
        self.state = _COMPLETE
        if extra or not self.keep_alive:
            self.abort()
        elif self.released:
            self.pool.put(self)

    def _fail(self, e: BaseException) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(e)
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.state == _COMPLETE or self.future is None or self.future.done():
            return
        if self.state == _UNTIL_EOF and exc is None:  # the close ends such a body
            try:
                self._complete(b"")
            except Exception as e:  # on_data raised on the body's last line
                self._fail(e)
        elif isinstance(exc, OSError):  # e.g. reset by the peer
            self._fail(httpx.ReadError(str(exc)))
        elif self.state == _HEAD:
            self._fail(httpx.RemoteProtocolError(_NO_RESPONSE))
        elif self.state == _CHUNKED:
            self._fail(httpx.RemoteProtocolError(f"{_INCOMPLETE} (incomplete chunked read)"))
        else:
            got = self.length - self.length_left
            self._fail(
                httpx.RemoteProtocolError(
                    f"{_INCOMPLETE} (received {got} bytes, expected {self.length})"
                )
            )

    def stale(self) -> bool:
        """Whether an idle connection has bytes or EOF waiting: the server closed it (or
        broke HTTP/1.1), and the loop has not read that yet. httpcore checks the same."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        try:
            return sock is None or bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def abort(self) -> None:
        """Close now: nothing more reaches the caller's on_data."""
        self.closed = True
        self.lines = SSELines(lambda _: True)  # drop the caller's callback with its state
        if self.transport is not None:
            self.transport.abort()


class StreamClient:
    """POST JSON and read an SSE reply, over a pool of keep-alive HTTP/1.1 connections
    without a size limit (the load tester's --max-concurrency is the limit)."""

    def __init__(
        self, base_url: str, headers: dict[str, str] | None = None, connect_timeout: float = 30.0
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"the built-in client speaks http:// only, not {base_url}")
        self.host, self.port = url.hostname, url.port or 80
        self.prefix = url.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        host = url.netloc.rpartition("@")[2]  # no userinfo
        self._headers = (
            f"Host: {host}\r\nAccept: */*\r\nUser-Agent: moeserve-bench\r\n"
            f"Content-Type: application/json\r\n{extra}"
        ).encode("latin-1")
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []  # LIFO: the most recently used first
        self._all: set[_Connection] = set()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:  # before OSError: on 3.11+ it is the builtin, an OSError
            raise httpx.ConnectTimeout(f"timed out after {self.connect_timeout:g}s") from None
        except OSError as e:
            raise httpx.ConnectError(str(e)) from None
        self._all.add(conn)
        return conn

    def put(self, conn: _Connection) -> None:
        if not conn.closed:
            self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)  # closed ones still in _idle are skipped when popped

    async def post_sse(self, path: str, body: bytes, on_data: OnData) -> tuple[int, bytes]:
        """POST `body` to prefix + `path`; feed each SSE `data:` payload of a 200 reply to
        `on_data` as it arrives. (status, body): the body of a non-200 reply, else b""."""
        conn = None
        while self._idle:
            candidate = self._idle.pop()
            if not candidate.closed and not candidate.stale():
                conn = candidate
                break
            candidate.abort()  # the server may close an idle connection at any time
        if conn is None:
            conn = await self._connect()
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
        ).encode() + self._headers
        try:
            result = await conn.send(head + b"\r\n" + body, on_data)
        except BaseException:  # a failure, or cancelled (--request-timeout): state unknown
            conn.abort()
            raise
        conn.released = True
        if conn.state == _COMPLETE:
            self.put(conn)
        # else the rest of the body (after [DONE]: its last chunk) puts it back when it comes
        return result

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
