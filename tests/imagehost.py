"""A real HTTP server on loopback serving good, bad and hostile image responses."""

from __future__ import annotations

import io
import random
import select
import socket
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


def image_of(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    """A real, decodable image of any size (a thin 3x600 PNG is a few hundred bytes)."""
    return image_bytes(fmt, "red", size)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first part of a file: its header (and so its size) is intact, its pixel data cut."""
    return data[: max(40, int(len(data) * keep))]


def corrupt_png(data: bytes) -> bytes:
    """A PNG whose header is intact but whose pixel data (IDAT) is overwritten with junk."""
    start = data.index(b"IDAT") + 4
    return data[:start] + bytes(range(7, 7 + 64)) + data[start + 64:]


def _png_header_claiming(width: int, height: int) -> bytes:
    """Only a signature and an IHDR chunk: enough for PIL to report a size, nothing to decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


RANDOM_BYTES = bytes((i * 7919 + 13) % 251 for i in range(4096))  # deterministic "noise"


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

    # --- fault behaviours -------------------------------------------------------------------

    def _reset(self, sent: bytes = b"") -> None:
        """Send `sent` raw, then abort the connection with a TCP RST (SO_LINGER 0, then close)."""
        try:
            if sent:
                self.wfile.write(sent)
                self.wfile.flush()
                time.sleep(0.05)  # let the bytes leave before the RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the socket's file keeps the descriptor open otherwise
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    def _wait_for_hangup(self, limit: float = 15.0) -> None:
        """Hold the connection, sending nothing, until the client gives up (or `limit` passes)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not self.server.closing.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.1)
            if readable:
                try:
                    if not self.connection.recv(4096):
                        return  # the client closed its side
                except OSError:
                    return

    def _drip(self, data: bytes, every: float, limit: float = 15.0) -> None:
        """Send `data` a byte at a time, each gap well under any per-read timeout."""
        deadline = time.monotonic() + limit
        for byte in data:
            if time.monotonic() > deadline or self.server.closing.is_set():
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(every)

    def _headers(self, content_type: str = "image/png", length: int | None = None) -> bytes:
        lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _fault(self, path: str) -> bool:
        """The fault routes (`/fault/...`); True when `path` was one."""
        png = self.server.images["/red.png"][0]
        big_png = self.server.big_png
        if path == "/fault/rst-before-headers":  # request read, then RST; nothing sent
            self._reset()
        elif path == "/fault/rst-mid-headers":  # half a status line and header, then RST
            self._reset(b"HTTP/1.1 200 OK\r\nContent-Type: ima")
        elif path == "/fault/rst-mid-body":  # full headers, half the body, then RST
            self._reset(self._headers(length=len(big_png)) + big_png[: len(big_png) // 2])
        elif path == "/fault/close-mid-body":  # full headers, half the body, then a clean FIN
            self.wfile.write(self._headers(length=len(big_png)) + big_png[: len(big_png) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
        elif path == "/fault/stall-silent":  # accepts and reads the request, never answers
            self._wait_for_hangup()
        elif path == "/fault/stall-after-headers":  # headers, then no body at all
            self.wfile.write(self._headers(length=len(png)))
            self.wfile.flush()
            self._wait_for_hangup()
        elif path == "/fault/drip-headers":  # the status line and headers, a byte every 0.2 s
            self._drip(self._headers(length=len(png)) + png, every=0.2)
        elif path == "/fault/drip-body":  # headers at once, then the body a byte every 0.2 s
            self.wfile.write(self._headers(length=len(png)))
            self.wfile.flush()
            self._drip(png, every=0.2)
        elif path == "/fault/html-as-png":
            self._send(200, b"<!doctype html><html><body>a web page</body></html>", "image/png")
        elif path == "/fault/random-as-png":
            self._send(200, RANDOM_BYTES, "image/png")
        elif path == "/fault/empty-as-png":
            self._send(200, b"", "image/png")
        elif path == "/fault/png-as-html":  # a real PNG mislabelled as a web page
            self._send(200, png, "text/html; charset=utf-8")
        elif path == "/fault/png-as-text":
            self._send(200, png, "text/plain")
        elif path == "/fault/png-untyped":  # no Content-Type header at all
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)
        elif path == "/fault/truncated.png":  # valid signature and IHDR, body cut short
            self._send(200, truncated(big_png), "image/png")
        elif path == "/fault/header-only.png":  # signature and IHDR only: a size, no pixels
            self._send(200, _png_header_claiming(40, 30), "image/png")
        elif path == "/fault/corrupt.png":  # intact header, junk pixel data
            self._send(200, corrupt_png(big_png), "image/png")
        elif path == "/fault/truncated.jpg":
            self._send(200, truncated(self.server.big_jpeg), "image/jpeg")
        else:
            return False
        return True

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        server = self.server
        if path.startswith("/fault/") and self._fault(path):
            return
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
        # an image with real pixel data, so that cutting it leaves a valid header and a cut body
        noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
        big_png, big_jpeg = io.BytesIO(), io.BytesIO()
        noise.save(big_png, format="PNG")
        noise.save(big_jpeg, format="JPEG", quality=90)
        self.closing = threading.Event()  # tells stalling handlers to let go at shutdown
        self.servers = []
        for host in ("127.0.0.1", "127.0.0.2"):
            server = ThreadingHTTPServer((host, 0), _Handler)
            server.daemon_threads = True
            server.images = self.images
            server.big_png, server.big_jpeg = big_png.getvalue(), big_jpeg.getvalue()
            server.closing = self.closing
            self.servers.append(server)
        self.servers[0].other_port = self.servers[1].server_address[1]
        self.servers[1].other_port = self.servers[0].server_address[1]
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]
        # a listener on 127.0.0.2 that never accepts: the kernel completes the TCP handshake
        # (backlog), the request is sent, and nothing ever reads it
        self.blackhole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.blackhole.bind(("127.0.0.2", 0))
        self.blackhole.listen(64)
        # a port on 127.0.0.2 with nothing listening: connections are refused
        refused = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        refused.bind(("127.0.0.2", 0))
        self.refused_port = refused.getsockname()[1]
        refused.close()

    def blackhole_url(self, path: str = "/x.png") -> str:
        return f"http://127.0.0.2:{self.blackhole.getsockname()[1]}{path}"

    def refused_url(self, path: str = "/x.png") -> str:
        return f"http://127.0.0.2:{self.refused_port}{path}"

    def url(self, path: str, host: str = "127.0.0.2") -> str:
        server = self.servers[0] if host in ("127.0.0.1", "localhost") else self.servers[1]
        name = "localhost" if host == "localhost" else server.server_address[0]
        return f"http://{name}:{server.server_address[1]}{path}"

    def __enter__(self) -> "ImageHost":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.blackhole.close()
        for server in self.servers:
            server.shutdown()
            server.server_close()
