"""The engine the core gets: the ONNX Runtime engine (`engine.ort`) for the text models it
serves on a CPU, CLAP's (`engine.clap_engine`) for audio models, Infinity (`engine.infinity`) for
the rest, as one `Engine`.

Which model goes where is decided before anything heavy is imported: the device without torch
(`device_hint`), each model's plan from its files (`onnx_export.prepare`). With every model on
ONNX Runtime, infinity, torch and transformers are never imported in the serving process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from ..config import (
    ConfigError,
    ModelSpec,
    Settings,
    onnx_cache_dirs,
    prepare_infinity_environment,
    prepare_model_cache,
)
from ..observability.logs import one_line
from . import model_config, onnx_export, runtime
from .base import Engine, ModelBackend
from .onnx_export import OnnxPlan

logger = logging.getLogger("embedding_worker")


def device_hint(settings: Settings) -> str:
    """DEVICE, or for `auto` whether an NVIDIA GPU is there (its device files; torch is not
    imported to ask). A GPU goes to torch, whose device choice is then infinity's."""
    if settings.device != "auto":
        return settings.device
    return "cuda" if any(Path("/dev").glob("nvidia[0-9]*")) else "cpu"


def onnx_plans(settings: Settings, device: str, caches: list[str]) -> dict[str, OnnxPlan]:
    """The models ONNX Runtime serves, exported if need be. BACKEND=optimum: all of them (on a
    CPU), or a ConfigError with the reason. BACKEND=auto: on a CPU, each text model in float32
    that ONNX Runtime can serve; any other (a GPU, an image model, a classifier, an export that
    fails) is served by torch."""
    backend, models = settings.backend, settings.models
    if backend == "optimum" and device != "cpu":
        raise ConfigError(f"BACKEND=optimum runs on the CPU, and DEVICE is {device}: use "
                          f"BACKEND=torch (or auto, which picks it on a GPU)")
    if backend == "auto":
        if device != "cpu" or not onnx_export.onnxruntime_installed():
            return {}
        # bf16 where the lean engine computes it natively (AMX, OpenVINO); elsewhere torch's
        bf16 = runtime.for_this_cpu(runtime.BF16)
        for spec in models:
            if spec.dtype == runtime.BF16 and bf16.precision != runtime.BF16:
                logger.warning("model %s: DTYPES asks for bf16, which the CPU engine does not "
                               "serve here (%s): served by torch, likely slower than fp32",
                               spec.served_name, bf16.reason)
        models = tuple(spec for spec in models if spec.dtype in ("auto", "float32")
                       or (spec.dtype == runtime.BF16 and bf16.precision == runtime.BF16))
    elif backend != "optimum":
        return {}
    if not models:
        return {}
    onnx_export.require_onnxruntime()
    cache, *found_in = caches
    plans = {}
    for spec in models:
        try:
            plans[spec.served_name] = onnx_export.prepare(spec.source, cache, tuple(found_in))
        except Exception as exc:
            if backend == "optimum":
                raise
            logger.info("model %s: served by torch, not ONNX Runtime: %s", spec.served_name,
                        one_line(exc))
    return plans


class CombinedEngine(Engine):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state, self.failure = "starting", ""
        self.models: dict[str, ModelBackend] = {}
        self._parts: list[Engine] | None = None
        self._plans: dict[str, OnnxPlan] = {}
        self._lock: asyncio.Lock | None = None
        self._load_lock = threading.Lock()
        self._load_error: Exception | None = None
        self._onnx_done = False
        self._ort: Engine | None = None
        self._began = 0.0

    def preload(self) -> None:
        """Begin the ONNX Runtime part of `load` in a thread now; the `load` of the start-up hook
        then waits for it (and raises what it raised) and loads torch's part, if any. Serve mode
        calls this before it imports BentoML and the service: ONNX Runtime builds its sessions
        with the GIL released, so they load while BentoML imports; infinity's stack imported
        beside BentoML's was slower than one after the other (docs/performance.md). The
        environment the libraries read at import is set here, before anything imports them."""
        self._prepare_environment()
        if device_hint(self.settings) != "cpu" or self.settings.backend == "torch":
            return  # nothing for ONNX Runtime: torch loads in `load`

        def load_onnx_part() -> None:
            with self._load_lock:
                if self._load_error is None:
                    try:
                        self._load_onnx()
                    except Exception as exc:  # raised again by the load that waits
                        self._load_error = exc

        threading.Thread(target=load_onnx_part, name="engine-preload", daemon=True).start()

    def _prepare_environment(self) -> None:
        prepare_infinity_environment(self.settings)
        prepare_model_cache(self.settings)

    def load(self) -> None:
        """Plan, export where needed, open the ONNX Runtime sessions and load infinity's weights
        for the rest (its batch loops start in `start`). Blocking and once only (a second call,
        or one after `preload`, waits for the first); raises on a load failure."""
        with self._load_lock:
            if self._parts is not None:
                return
            if self._load_error is not None:
                raise self._load_error
            try:
                self._load_onnx()
                self._load_torch()
            except Exception as exc:
                self._load_error = exc
                raise

    def _load_onnx(self) -> None:
        """Every model's plan, and the sessions of those ONNX Runtime serves (once)."""
        if self._onnx_done:
            return
        self._began = time.perf_counter()
        settings = self.settings
        for spec in settings.models:
            if spec.bundled:
                logger.info("MODEL_NAMES is unset: serving the bundled %s from %s (offline)",
                            spec.served_name, spec.source)
        self._prepare_environment()
        self._plans = onnx_plans(settings, device_hint(settings), onnx_cache_dirs(settings))
        if self._plans:
            from .ort import OrtEngine

            ort = OrtEngine(settings, self._plans)
            ort.load()
            for name, exc in ort.failed.items():
                if settings.backend == "optimum":
                    raise exc
                logger.warning("model %s: ONNX Runtime could not load it, served by torch: %s",
                               name, one_line(exc))
            self._ort = ort
        self._onnx_done = True

    def _load_torch(self) -> None:
        """torch for the models ONNX Runtime does not serve: those of outputs beyond one dense
        vector (SPLADE, BGE-M3, ColBERT) in the lean engine around torch's forward pass, which
        gives them; CLAP models in the service's own audio engine; the rest in infinity."""
        parts: list[Engine] = [self._ort] if self._ort is not None else []
        onnx = set(self._ort.models) if self._ort is not None else set()
        rest = [spec for spec in self.settings.models if spec.served_name not in onnx]
        several = self._several_outputs(rest)
        if several:
            from .ort import OrtEngine

            lean = OrtEngine(self.settings, several, torch_device=device_hint(self.settings))
            lean.load()
            for exc in lean.failed.values():
                raise exc
            parts.append(lean)
            rest = [spec for spec in rest if spec.served_name not in several]
        claps = [spec for spec in rest if model_config.model_type(spec.source) == "clap"]
        if claps:  # audio on the service's own torch code
            from .clap_engine import ClapEngine

            engine = ClapEngine(self.settings, claps, device_hint(self.settings))
            engine.load()
            parts.append(engine)
            rest = [spec for spec in rest if spec not in claps]
        if rest:
            from .infinity import InfinityEngine

            infinity = InfinityEngine(self.settings, rest)
            infinity.load()
            parts.append(infinity)
        self._parts = parts
        logger.info("the models loaded in %.2f s", time.perf_counter() - self._began)

    def _several_outputs(self, specs: list[ModelSpec]) -> dict[str, OnnxPlan]:
        """The plans of the text models among `specs` whose files say SPLADE, BGE-M3 or ColBERT
        (their heads made beside, no ONNX export)."""
        if not specs or not onnx_export.installed("tokenizers"):
            return {}
        cache = onnx_cache_dirs(self.settings)[0]
        plans = {}
        for spec in specs:
            try:
                plan = onnx_export.torch_plan(spec.source, cache)
            except Exception as exc:  # noqa: BLE001 - infinity loads it, or says why not
                logger.info("model %s: its files were not read for outputs beyond a dense "
                            "vector: %s", spec.served_name, one_line(exc))
                continue
            if plan is not None:
                plans[spec.served_name] = plan
        return plans

    async def start(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent first jobs (RunPod) start the engines once
            if self.state == "starting":
                await self._start()

    async def _start(self) -> None:
        try:
            await asyncio.to_thread(self.load)
        except Exception as exc:
            return self._fail(one_line(exc))
        assert self._parts is not None
        for part in self._parts:
            await part.start()
            if part.state == "failed":
                return self._fail(part.failure)
        specs = {spec.served_name: spec for spec in self.settings.models}
        found = {name: model for part in self._parts for name, model in part.models.items()}
        for name, spec in specs.items():  # MODEL_NAMES order
            model = found[name]
            prompts, default = model_config.served_prompts(spec.source, spec.prompts)
            if model.info.query_prompt is not None:  # queries apart: both roles can be asked for
                named = dict(prompts)
                prompts += tuple((name, "") for name in (model.info.query_prompt, "document")
                                 if name not in named)
            model.info = replace(model.info, prompts=prompts, default_prompt_name=default)
            self.models[name] = model
            _log_model(model, spec, self._plans.get(name))
        self.state = "ready"

    def _fail(self, reason: str) -> None:
        """Stay up and unready (503 with the reason) rather than crash-looping the worker."""
        self.state, self.failure = "failed", reason
        logger.error("model loading failed, the service stays unready: %s", reason)

    async def stop(self) -> None:
        if self.state == "ready":
            self.state = "stopped"
            for part in self._parts or []:
                await part.stop()

    def export_onnx(self, cache_dir: str) -> dict[str, str]:
        """The ONNX exports this configuration would serve on a CPU, made now into `cache_dir`
        (ahead of time: `embedding-worker download --onnx`, the image build); served name ->
        directory."""
        self._prepare_environment()
        plans = onnx_plans(self.settings, "cpu", [cache_dir])
        return {name: plan.directory for name, plan in plans.items()}


def _log_model(model: ModelBackend, spec: ModelSpec, plan: OnnxPlan | None) -> None:
    info = model.info
    logger.info(
        "model %s: source=%s backend=%s dtype=%s device=%s batch_size=%d capabilities=%s%s%s",
        info.name, info.source, info.backend, info.dtype, info.device, info.batch_size,
        ",".join(sorted(info.capabilities)),
        f" onnx={plan.directory}" if plan is not None and info.backend == "optimum" else "",
        f" runtime={info.runtime} ({info.runtime_reason})" if info.runtime else "",
    )
