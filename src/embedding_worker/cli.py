"""`embedding-worker serve | runpod | auto | download`: the image's entry point.

auto (the default) runs the RunPod handler inside RunPod workers and serves the BentoML service
in one process elsewhere (`api.serve`; `bentoml serve` does the same with an arbiter process).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import startgc
from .config import Settings, load_settings_or_exit
from .observability.logs import configure_logging

SERVICE = "service:InfinityEmbedding"


def service_dir() -> Path:
    """Where service.py lives: beside `src/` in a checkout and in a built bento alike."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "service.py").is_file():
            return candidate
    raise SystemExit("service.py not found beside the package or in the current directory")


def download(settings: Settings, cache_dir: str | None, onnx_dir: str | None) -> None:
    """Fetch MODEL_NAMES from the hub into `cache_dir` (the image build's model baking), then,
    with `onnx_dir`, make the ONNX exports a CPU start would otherwise make and the list of files
    a serve-mode start reads (api/readahead.py)."""
    from huggingface_hub import snapshot_download

    for spec in settings.models:
        if spec.bundled or os.path.isdir(spec.source):
            print(f"{spec.served_name}: local ({spec.source}), nothing to download")
            continue
        path = snapshot_download(repo_id=spec.source, cache_dir=cache_dir)
        print(f"{spec.served_name}: downloaded to {path}")
    if onnx_dir is not None:
        from .engine import export_onnx

        exports = export_onnx(settings, onnx_dir)
        for spec in settings.models:
            where = exports.get(spec.served_name)
            print(f"{spec.served_name}: ONNX export in {where}" if where else
                  f"{spec.served_name}: not served by ONNX Runtime (see the log), nothing exported")
        from .api.readahead import record_ahead

        listed = record_ahead(onnx_dir)  # a fresh container reads its files ahead (docs/deployment.md)
        if listed:
            print(f"files a serve-mode start loads: listed in {listed}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="embedding-worker", description=__doc__)
    parser.add_argument("mode", nargs="?", default="auto",
                        choices=["auto", "serve", "runpod", "download"])
    parser.add_argument("--to", help="download: the hub cache directory to fill")
    parser.add_argument("--onnx", metavar="DIR",
                        help="download: also make the ONNX exports (ONNX Runtime on a CPU) in DIR")
    args, extra = parser.parse_known_args(argv)
    settings = load_settings_or_exit()
    configure_logging(settings)
    mode = args.mode
    if mode == "download":
        download(settings, args.to, args.onnx)
        return
    if mode == "auto":
        mode = "runpod" if settings.on_runpod else "serve"
    startgc.pause()  # until the mode below has imported and loaded what it serves with
    if mode == "serve":
        if extra:
            parser.error(f"serve takes no options ({' '.join(extra)}); HOST and PORT set the "
                         f"address, and `bentoml serve {SERVICE}` takes BentoML's options")
        from .api.serve import serve

        serve(settings, service_dir())
        return
    from .api.runpod import start

    sys.argv = [sys.argv[0], *extra]  # the SDK parses its own --rp_* flags
    start(settings)


if __name__ == "__main__":
    main()
