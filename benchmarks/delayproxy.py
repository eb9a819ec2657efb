"""A loopback TCP proxy that delays every chunk by a fixed time in each direction (models another host).

    python -m benchmarks.delayproxy --listen 127.0.0.1:PORT --target 127.0.0.1:6379 --delay-ms 1

Order is kept per direction; the delay is added to latency only (no bandwidth limit). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

logger = logging.getLogger("benchmarks.delayproxy")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(pump(), deliver())
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError as exc:
            logger.warning("cannot reach %s:%d: %s", target[0], target[1], exc)
            client_w.close()
            return
        await asyncio.gather(_forward(client_r, server_w, delay), _forward(server_r, client_w, delay))

    server = await asyncio.start_server(handle, *listen, backlog=1024)
    logger.info("delaying %s:%d -> %s:%d by %.1f ms each way", *listen, *target, delay * 1000)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host not in LOOPBACK:
        raise argparse.ArgumentTypeError(f"loopback only, got {host!r}")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--target", type=_address, required=True)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.target, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
