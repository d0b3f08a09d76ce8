"""`embedding-worker serve | runpod | auto | download | bulk`: the image's entry point.

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


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of `kind` no smaller than `low`."""
    def parse(text: str) -> float:
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def bulk_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding-worker bulk",
        description="Embed the texts of INPUT (Parquet, JSON lines or CSV) into Parquet files "
                    "under OUTPUT, with a served model's options, on Ray (a local cluster, or "
                    "RAY_ADDRESS / --address). Models and their settings come from the "
                    "environment, as for the server.")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--format", choices=["parquet", "jsonl", "json", "csv", "openai-batch"],
                        help="INPUT's format (default: from its name). openai-batch: an OpenAI "
                             "batch input file (lines of custom_id, method, url, body; any route "
                             "of this service), answered into OUTPUT, a file of OpenAI's batch "
                             "output lines; a rerun answers only the lines not in OUTPUT yet")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--id-column", help="a unique id per row, passed through; with it a "
                                            "rerun after a crash embeds only the rows not written")
    parser.add_argument("--model", help="a served name (default: the first model that embeds)")
    parser.add_argument("--input-type")
    parser.add_argument("--prompt-name")
    parser.add_argument("--dimensions", type=_at_least(1))
    parser.add_argument("--output-dtype", default="float",
                        choices=["float", "int8", "uint8", "binary", "ubinary"])
    parser.add_argument("--truncate", choices=["END", "START", "NONE"])
    parser.add_argument("--raw", action="store_true", help="the model's own vectors, not "
                                                            "normalised (as normalized: false)")
    parser.add_argument("--workers", type=_at_least(1), help="model processes (Ray actors); default: one "
                                                    "per GPU where the cluster has GPUs, else 1")
    parser.add_argument("--cpus-per-worker", type=_at_least(1),
                        help="CPUs (and the engine's threads) per worker; default: the "
                             "cluster's CPUs shared by the workers")
    parser.add_argument("--gpus-per-worker", type=_at_least(0, float),
                        help="GPUs per worker (a fraction shares one); default: 1 where the "
                             "cluster has GPUs, else 0")
    parser.add_argument("--batch-size", type=_at_least(1), default=256)
    parser.add_argument("--address", help="an existing Ray cluster (default: RAY_ADDRESS, else "
                                          "a local one of this machine's CPUs, started for "
                                          "this run)")
    parser.add_argument("--checkpoint", help="where the ids written are kept (default: "
                                             "OUTPUT.checkpoint)")
    parser.add_argument("--progress-every", type=_at_least(0.1, float), default=10.0, metavar="SECONDS",
                        help="how often a line of progress (rows, rows/s, time left) is "
                             "printed to stderr (default: 10)")
    return parser


def bulk(settings: Settings, argv: list[str]) -> None:
    """`embedding-worker bulk INPUT OUTPUT ...`: a corpus embedded on Ray (api/bulk.py)."""
    args = bulk_parser().parse_args(argv)
    try:
        from .api import bulk as job
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise SystemExit(f"bulk needs Ray Data: pip install \".[bulk]\" ({exc})") from exc
    address = args.address or settings.ray_address or None
    if args.format == "openai-batch":
        answered = job.run_requests(args.input, args.output,
                                    settings=settings.model_dump(exclude_defaults=True),
                                    workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                    gpus_per_worker=args.gpus_per_worker, address=address)
        print(f"{answered} requests answered into {args.output}")
        return
    embedder = {"model": args.model, "text_column": args.text_column,
                "input_type": args.input_type, "prompt_name": args.prompt_name,
                "dimensions": args.dimensions, "output_dtype": args.output_dtype,
                "truncate": args.truncate, "normalized": not args.raw,
                # the workers are other processes: the environment's settings go with them
                "settings": settings.model_dump(exclude_defaults=True)}
    job.run(args.input, args.output, embedder=embedder, id_column=args.id_column,
            file_format=args.format, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size, address=address,
            checkpoint=args.checkpoint, progress_every=args.progress_every)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="embedding-worker", description=__doc__)
    parser.add_argument("mode", nargs="?", default="auto",
                        choices=["auto", "serve", "runpod", "download", "bulk"])
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
    if mode == "bulk":
        bulk(settings, extra)
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
