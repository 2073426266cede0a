"""A lean HTTP/1.1 keep-alive client for bench/load.py: the load generator must not eat the cores
it measures.

httpx spent ~3 ms of CPU per /classify request on the dev CPU (multipart encoding, header models,
its connection pool), as much as the server's whole serving overhead, and the client shares the
server's cores. Here every request body is encoded once (by httpx, so the bytes on the wire are
what a real client sends) and each worker writes it over its own connection with asyncio streams
and reads the response by Content-Length (or chunked). No TLS, no redirects, no proxies: loopback
benchmarking only.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


def encode_post(url: str, path: str, files: dict, data: dict) -> bytes:
    """The complete bytes of a ``POST path`` with a multipart body, as httpx would send them."""
    import httpx

    parts = urlsplit(url)
    request = httpx.Request("POST", url + path, files=files, data=data)
    body = request.read()
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode("latin-1") + body


class Connection:
    """One keep-alive connection; reconnects when the server closes it."""

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request, return ``(status, body)``; raises OSError/TimeoutError/ValueError."""
        return await asyncio.wait_for(self._request(raw), self.timeout)

    async def _request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(raw)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._chunked()
            else:
                raise ValueError("response has neither Content-Length nor chunked encoding")
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, body
        except BaseException:
            self.close()
            raise

    async def _chunked(self) -> bytes:
        chunks = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append(await self.reader.readexactly(size + 2))
            if size == 0:
                return b"".join(c[:-2] for c in chunks)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
