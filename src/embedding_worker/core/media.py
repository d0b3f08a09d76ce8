"""Image and audio inputs: http(s) URLs, data URIs and bare base64, fetched safely; images turned
into RGB images here, audio decoded by `audio`.

A public deployment must not become a proxy into its own network, nor be knocked over by one big
or crafted file. So, by default: only http/https; every address a host resolves to must be public,
and the connection goes to the vetted address (no second DNS lookup to rebind); redirects are
followed by hand and each hop is vetted; bodies are streamed under a byte cap (IMAGE_MAX_BYTES,
AUDIO_MAX_BYTES); an image's size (pixel count, smallest side, aspect ratio) is read from the
header before anything is decoded; each item has one deadline (HTTP_CLIENT_TIMEOUT) for its fetch
and, for audio, its decoding. A body is judged by its content, not by the type its server claims.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .audio import AudioError, AudioPolicy, Clip, decode, load_libraries
from .errors import BadRequest, too_many

if TYPE_CHECKING:  # httpx and PIL are imported on the first image: not by a text-only service
    import httpx
    from PIL.Image import Image

    from ..config import Settings

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\r\n_-]+$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}
# the media types a data URI of each kind may name (a clip's is often application/ogg or
# application/octet-stream); the bytes decide what it is
DATA_URI_TYPES = {"image": ("image/",), "audio": ("audio/", "application/")}
# infinity's vision models refuse a side under 3 pixels (an unhandled error, so a 500); refused here
_MIN_SIDE = 3


class MediaError(Exception):
    """Why one item is not a usable image or clip; the caller adds the item's index."""


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int  # of an image
    max_pixels: int
    max_images: int
    max_redirects: int
    timeout: float
    allow_private: bool
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # long side / short side. CLIP-style processors scale the short side to the model's size
    # before cropping, so a 3x40000 image (a few hundred bytes) would become 224 x 2,986,667
    # pixels in memory (about 6 GB at peak in transformers' CLIPImageProcessor)
    max_aspect_ratio: float = 20.0
    audio_max_bytes: int = 20_000_000
    max_audio: int = 32
    audio_max_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaPolicy:
        return cls(
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            max_images=settings.max_images_per_request,
            max_redirects=settings.image_max_redirects,
            timeout=settings.http_client_timeout,
            allow_private=settings.image_fetch_allow_private,
            allowed_networks=settings.allowed_networks,
            max_aspect_ratio=settings.image_max_aspect_ratio,
            audio_max_bytes=settings.audio_max_bytes,
            max_audio=settings.max_audio_per_request,
            audio_max_seconds=settings.audio_max_seconds,
        )


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: MediaPolicy) -> bool:
    """Public unicast only, unless private fetching is enabled or the address is allow-listed."""
    if policy.allow_private or any(ip in net for net in policy.allowed_networks):
        return True
    inner = _embedded_ipv4(ip)
    if inner is not None and not address_allowed(inner, policy):
        return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


async def vet_host(host: str, port: int, policy: MediaPolicy) -> list[str]:
    """Resolve `host`; every address must be allowed. Returns the addresses to connect to."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaError(f"cannot resolve host {host!r}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for ip in addresses:
        if not address_allowed(ip, policy):
            raise MediaError(
                f"address not allowed: {host!r} resolves to {ip}, which is not a public address"
            )
    return list(dict.fromkeys(str(ip) for ip in addresses))


def _number(value: float) -> str:
    """20.0 -> '20', 20.333 -> '20.33', 10000.0 -> '10000' (never '1e+04')."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def check_size(width: int, height: int, max_pixels: int, max_aspect_ratio: float) -> None:
    """The limits that can be judged from the header alone, before any pixel is decoded."""
    if width * height > max_pixels:
        raise MediaError(
            f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the "
            f"limit of {max_pixels / 1e6:g} megapixels (IMAGE_MAX_PIXELS)"
        )
    short, long = sorted((width, height))
    if short < _MIN_SIDE:
        raise MediaError(
            f"image is {width}x{height} pixels; each side must be at least {_MIN_SIDE} pixels"
        )
    if long > max_aspect_ratio * short:
        raise MediaError(
            f"image is {width}x{height} (aspect ratio {_number(long / short)}:1), over the limit "
            f"of {_number(max_aspect_ratio)}:1 (IMAGE_MAX_ASPECT_RATIO)"
        )


def decode_image(data: bytes, max_pixels: int, max_aspect_ratio: float = 20.0) -> Image:
    """Bytes to an RGB image; the size is checked from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_size(*image.size, max_pixels, max_aspect_ratio)
            image.load()
            return image.convert("RGB")
    except (MediaError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses sizes far past its own limit already at open(), before we see the size
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found[1]) / 1e6:.1f} megapixels)" if found else ""
        raise MediaError(
            f"image is too large{size}, over the limit of {max_pixels / 1e6:g} megapixels "
            f"(IMAGE_MAX_PIXELS)"
        ) from None
    except UnidentifiedImageError:
        raise MediaError("not a decodable image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"not a decodable image ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL on crafted bytes (e.g. a TIFF tag of the wrong type)
        raise MediaError(f"not a decodable image ({type(exc).__name__})") from None


def _b64decode(text: str, max_bytes: int, what: str, kind: str = "image") -> bytes:
    compact = re.sub(r"[\r\n]", "", text)  # MIME-style line breaks are fine; spaces are not
    if len(compact.rstrip("=")) * 3 // 4 > max_bytes:  # padding is not data
        raise MediaError(f"{what} is larger than {max_bytes} bytes ({kind.upper()}_MAX_BYTES)")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what} is not valid base64") from None


def parse_data_uri(uri: str, max_bytes: int, kind: str = "image") -> bytes:
    """The bytes of a base64 data URI of `kind` (image, audio): `data:<kind>/<type>;base64,`."""
    match = _DATA_URI.match(uri)
    if not match:
        raise MediaError(f"malformed data URI; expected data:{kind}/<type>;base64,<data>")
    mime = match["mime"].strip().lower()
    if mime and not mime.startswith(DATA_URI_TYPES[kind]):
        raise MediaError(f"data URI has media type {mime!r}; expected {kind}/*")
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise MediaError(f"only base64 data URIs are supported (data:{kind}/<type>;base64,...)")
    return _b64decode(match["data"], max_bytes, "data URI", kind)


class MediaFetcher:
    """Loads the image and audio items of a request. One shared httpx client, opened at the
    first fetch."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.policy = MediaPolicy.from_settings(settings)
        self._client: httpx.AsyncClient | None = None
        self._decoders = False  # audio's libraries imported (`audio.load_libraries`)

    def _open(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            s = self.settings
            self._client = httpx.AsyncClient(
                headers={"User-Agent": s.http_client_user_agent, "Accept": "image/*,audio/*,*/*;q=0.8"},
                timeout=httpx.Timeout(s.http_client_timeout),
                limits=httpx.Limits(
                    max_connections=s.http_client_max_connections,
                    max_keepalive_connections=s.http_client_max_keepalive_connections,
                ),
                follow_redirects=False,  # each hop is vetted in `_fetch`
                trust_env=False,  # no proxy from the environment: it would bypass the vetting
            )
        return self._client

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def load_all(self, items: list[str], field: str = "input",
                       positions: list[int] | None = None) -> list[Image]:
        """Every image or none: the first bad item (lowest index) fails the request with a 400
        naming it as `field[position]` (`positions`: each item's index in the request)."""
        if len(items) > self.policy.max_images:
            raise too_many(field, len(items), self.policy.max_images, "MAX_IMAGES_PER_REQUEST",
                           noun="images")
        return await self._every(items, self._image, field, positions, "invalid_image")

    async def load_audio(self, items: list[str], rate: int, field: str = "input",
                         positions: list[int] | None = None) -> list[Clip]:
        """Every clip or none, each one channel at `rate` Hz (`audio.decode`); as `load_all`."""
        if len(items) > self.policy.max_audio:
            raise too_many(field, len(items), self.policy.max_audio, "MAX_AUDIO_PER_REQUEST",
                           noun="audio items")
        return await self._every(items, lambda item: self._clip(item, rate), field, positions,
                                 "invalid_audio")

    @staticmethod
    async def _every(items: list[str], load: Any, field: str, positions: list[int] | None,
                     code: str) -> list[Any]:
        results = await asyncio.gather(*(load(item) for item in items), return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, MediaError):
                where = positions[index] if positions is not None else index
                raise BadRequest(f"{field}[{where}]: {result}", param=field, code=code)
            if isinstance(result, BaseException):
                raise result
        return results

    async def _image(self, item: str) -> Image:
        data, note = await self._bytes(item, "image", self.policy.max_bytes)
        try:
            return await asyncio.to_thread(
                decode_image, data, self.policy.max_pixels, self.policy.max_aspect_ratio
            )
        except MediaError as exc:
            if note and str(exc).startswith("not a decodable image"):
                raise MediaError(note) from None
            raise

    async def _clip(self, item: str, rate: int) -> Clip:
        """The clip, fetched and decoded within the item's one deadline: decoding checks it
        between blocks, and the wait for it ends at the deadline whatever the decoder does."""
        if not self._decoders:
            await asyncio.to_thread(load_libraries)
            self._decoders = True
        timeout = self.policy.timeout
        deadline = time.monotonic() + timeout
        data, note = await self._bytes(item, "audio", self.policy.audio_max_bytes)
        policy = AudioPolicy(max_seconds=self.policy.audio_max_seconds)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.to_thread(decode, data, rate, policy, deadline)
        except TimeoutError:
            raise MediaError(f"fetching and decoding took longer than {timeout:g} s "
                             f"(HTTP_CLIENT_TIMEOUT)") from None
        except AudioError as exc:
            if note and str(exc).startswith("not audio"):
                raise MediaError(note) from None
            raise MediaError(str(exc)) from None

    async def _bytes(self, item: str, kind: str, max_bytes: int) -> tuple[bytes, str]:
        """The item's bytes, and a note when its server called it text/*."""
        item = item.strip()
        if item.startswith("data:"):
            return parse_data_uri(item, max_bytes, kind), ""
        if item.lower().startswith(("http://", "https://")):
            try:
                async with asyncio.timeout(self.policy.timeout):
                    return await self._fetch(item, kind, max_bytes)
            except TimeoutError:
                raise MediaError(
                    f"fetching timed out after {self.policy.timeout:g} s (HTTP_CLIENT_TIMEOUT)"
                ) from None
        if _SCHEME.match(item) and "://" in item:
            raise MediaError(
                f"unsupported URL scheme {item.split(':', 1)[0]!r}; use http, https, a data URI or base64"
            )
        if _BASE64.match(item):
            return _b64decode(item, max_bytes, f"base64 {kind}", kind), ""
        raise MediaError(f"not an http(s) URL, a data URI or base64-encoded {kind} data")

    async def _fetch(self, url: str, kind: str, max_bytes: int) -> tuple[bytes, str]:
        """The body of `url` after any redirects, and a note when its type was text/*."""
        import httpx

        for _ in range(self.policy.max_redirects + 1):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise MediaError(f"invalid URL ({exc})") from None
            if target.scheme not in ("http", "https"):
                raise MediaError(f"unsupported URL scheme {target.scheme!r} (redirect target)")
            if not target.host:
                raise MediaError("URL has no host")
            port = target.port or (443 if target.scheme == "https" else 80)
            addresses = await vet_host(target.host, port, self.policy)
            response = await self._connect(target, addresses)
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    url = str(target.join(response.headers["location"]))
                    continue
                return await self._read(response, target.host, kind, max_bytes)
            finally:
                await response.aclose()
        raise MediaError(f"more than {self.policy.max_redirects} redirects (IMAGE_MAX_REDIRECTS)")

    async def _connect(self, target: httpx.URL, addresses: list[str]) -> httpx.Response:
        """Send to the vetted addresses only (no second DNS lookup), trying each on connect errors."""
        import httpx

        client = self._open()
        error: Exception | None = None
        for address in addresses:
            request = client.build_request(
                "GET",
                target.copy_with(host=address),
                headers={"Host": target.netloc.decode("ascii")},
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
            )
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                error = exc
            except httpx.HTTPError as exc:
                error = exc
                break
        raise MediaError(f"could not fetch from {target.host}: {type(error).__name__}")

    async def _read(self, response: httpx.Response, host: str, kind: str,
                    limit: int) -> tuple[bytes, str]:
        import httpx

        if not response.is_success:
            raise MediaError(f"HTTP {response.status_code} from {host}")
        # The body is judged by its content (a misconfigured bucket may label a PNG text/plain);
        # a text/* type only words the error when the body is not one after all.
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        note = ""
        if content_type.startswith("text/"):
            what = "an image" if kind == "image" else kind
            note = f"not {what}: {host} sent content-type {content_type}"
        setting = f"{kind.upper()}_MAX_BYTES"
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaError(f"larger than {limit} bytes ({setting})")
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise MediaError(f"larger than {limit} bytes ({setting})")
        except httpx.HTTPError as exc:
            raise MediaError(f"could not fetch from {host}: {type(exc).__name__}") from None
        return bytes(body), note
