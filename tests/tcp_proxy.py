"""A loopback TCP proxy for tests: 127.0.0.1:<free port> forwards to one target, and `cut()` breaks
every connection it carries (both sockets reset: SO_LINGER 0, so each peer reads ECONNRESET) while
it goes on accepting new ones -- a network fault between two live processes.

One asyncio loop on a daemon thread does all the work; `close()` stops it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None and not writer.transport.is_closing():
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # closed by its peer in the meantime: nothing left to reset
            pass
    writer.transport.abort()


class TcpProxy:
    def __init__(self, target: str, host: str = "127.0.0.1"):
        target_host, _, port = target.rpartition(":")
        self.target = (target_host, int(port))
        self.host = host
        self.accepted = 0  # connections forwarded since the start
        self._refuse_until = 0.0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy-{target}", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, host, 0))
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _handle(self, reader, writer) -> None:
        if time.monotonic() < self._refuse_until:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._pairs.discard(pair)

    @staticmethod
    async def _pump(reader, writer) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except OSError:  # the connection was reset (by cut() or by a peer)
            pass
        finally:
            writer.close()  # EOF one way: close the other way too (a FIN; after cut(), already closed)

    async def _cut(self, refuse_seconds: float) -> int:
        self._refuse_until = time.monotonic() + refuse_seconds
        pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            for writer in pair:
                _reset(writer)
        return len(pairs)

    def cut(self, refuse_seconds: float = 0.0) -> int:
        """Reset every open connection, both sides; new ones are reset too for `refuse_seconds`,
        then forwarded again. Returns the number of connections cut."""
        return self._call(self._cut(refuse_seconds))

    def close(self) -> None:
        async def stop():
            self._server.close()
            await self._cut(float("inf"))
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:  # the connections' tasks end once their sockets are reset
                await asyncio.wait(tasks, timeout=5)

        try:
            self._call(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
