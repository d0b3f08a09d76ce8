"""A real HTTP server on loopback serving good, bad and hostile image responses."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_bytes(fmt: str, color: str = "red", size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny file whose header claims 900 megapixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 16)  # a few rows only; never decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    routes: dict = {}
    other_port = 0  # port of the sibling server (for redirect targets)

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/png", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        server = self.server
        if path in server.images:
            body, content_type = server.images[path]
            return self._send(200, body, content_type)
        if path == "/missing":
            return self._send(404, b"not found", "text/plain")
        if path == "/forbidden":
            return self._send(403, b"forbidden", "text/plain")
        if path == "/page.html":
            return self._send(200, b"<html><body>hi</body></html>", "text/html; charset=utf-8")
        if path == "/lying.png":
            return self._send(200, b"<html>not a png</html>", "image/png")
        if path == "/slow.png":
            time.sleep(5)
            return self._send(200, server.images["/red.png"][0])
        if path == "/drip.png":  # headers at once, then a byte a second
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(30):
                try:
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(1)
            return
        if path == "/endless.png":  # no length, never ends (bounded: 200 MB or a broken pipe)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            block = b"\x00" * 65536
            for _ in range(3200):
                try:
                    self.wfile.write(block)
                except OSError:
                    return
            return
        if path == "/reset.png":  # drop the connection mid-response
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x89PNG")
            self.connection.shutdown(2)
            return
        if path.startswith("/redirect/"):
            left = int(path.rsplit("/", 1)[1])
            target = "/red.png" if left == 0 else f"/redirect/{left - 1}"
            return self._send(302, b"", "text/plain", {"Location": target})
        if path == "/to-loopback":
            return self._send(302, b"", "text/plain",
                              {"Location": f"http://127.0.0.1:{server.other_port}/red.png"})
        if path == "/to-file":
            return self._send(302, b"", "text/plain", {"Location": "file:///etc/passwd"})
        return self._send(404, b"", "text/plain")


class ImageHost:
    """Serves the same routes on 127.0.0.1 and 127.0.0.2 (two distinct loopback hosts)."""

    def __init__(self):
        self.images = {
            "/red.png": (image_bytes("PNG", "red"), "image/png"),
            "/red.jpg": (image_bytes("JPEG", "red"), "image/jpeg"),
            "/blue.gif": (image_bytes("GIF", "blue"), "image/gif"),
            "/green.png": (image_bytes("PNG", "green"), "image/png"),
            "/octet.png": (image_bytes("PNG", "red"), "application/octet-stream"),
            "/bomb.png": (png_bomb(), "image/png"),
        }
        self.servers = []
        for host in ("127.0.0.1", "127.0.0.2"):
            server = ThreadingHTTPServer((host, 0), _Handler)
            server.daemon_threads = True
            server.images = self.images
            self.servers.append(server)
        self.servers[0].other_port = self.servers[1].server_address[1]
        self.servers[1].other_port = self.servers[0].server_address[1]
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]

    def url(self, path: str, host: str = "127.0.0.2") -> str:
        server = self.servers[0] if host in ("127.0.0.1", "localhost") else self.servers[1]
        name = "localhost" if host == "localhost" else server.server_address[0]
        return f"http://{name}:{server.server_address[1]}{path}"

    def __enter__(self) -> "ImageHost":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        for server in self.servers:
            server.shutdown()
            server.server_close()
