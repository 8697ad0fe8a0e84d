"""The Python baseline of ``run.py``: a port forwarder on asyncio streams.

Written the way such a forwarder usually is: ``asyncio.start_server`` (its
default backlog), one ``asyncio.open_connection`` to the target per client
(no connect timeout), and two pump tasks ``reader.read(65536)`` /
``writer.write`` / ``await writer.drain()`` with ``write_eof()`` at end of
file (asyncio sets TCP_NODELAY on TCP transports itself).  Standard library
only: ``run.py`` runs it as ``python -I -S <this file> LISTEN_PORT TARGET_PORT``
(both on 127.0.0.1).  A copy of ``fastpipe._bench.asyncio_forward``, so that
this benchmark does not depend on where the package keeps its own.

It prints ``... listening on 127.0.0.1:PORT, forwarding to ...`` on stderr,
as ``fastpipe forward`` does, and exits with status 0 on SIGTERM, at once,
open connections or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def _serve(listen_port: int, target_port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    port = server.sockets[0].getsockname()[1]
    print(
        f"asyncio-forward: listening on 127.0.0.1:{port}, forwarding to 127.0.0.1:{target_port}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    # Not `async with server`: since Python 3.12 its exit waits for every open
    # connection to end.  asyncio.run() cancels the connections' tasks instead.
    server.close()


def main(argv: list[str]) -> int:
    asyncio.run(_serve(int(argv[0]), int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
