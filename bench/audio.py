"""Audio embeddings (issue 37, point 6): clips through this service's server against transformers'
CLAP in process at its best batch size, alternated (A, B, A, B), with the decoding cost apart.

    .venv/bin/python bench/audio.py [--rounds 2] [--seconds 30] [--clips 48]

The model: a CLAP of `laion/clap-htsat-unfused`'s shape (transformers' default ClapConfig: HTSAT
audio encoder, RoBERTa-base text encoder, 512-d projection; 48 kHz, 10-second windows), random
weights made here: speed does not care. The corpus: clips of 3-12 s (a tone and noise), as
44.1 kHz stereo 16-bit WAV, the common case (downmix and resampling both run).

- **server**: `embedding-worker serve`, 4 concurrent requests of 8 clips each as data URIs (a
  client's usual way to send files); the server fetches nothing, but decodes, downmixes and
  resamples every clip, then runs the model. Loaded by this process's async client.
- **transformers**: `ClapFeatureExtractor` + `ClapModel.get_audio_features` in one process on
  clips already decoded at 48 kHz mono (transformers reads no files), at its best batch size.
- **engine**: the service's own CLAP code (engine/clap.py) in one process on the same decoded
  clips, at the same batch sizes: the model's cost without the server.
- **decode**: what the server does before the model, per clip, on one thread: base64 out of the
  JSON, WAV (and, for comparison, MP3) decoded, downmixed and resampled to 48 kHz.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from run import Target, bench_models, free_port, run_child  # noqa: E402
from runtimes import cpu  # noqa: E402

BATCHES = (1, 4, 8, 16)
CONCURRENCY, PER_REQUEST = 4, 8
CHILD = """
import json, sys, time
import numpy as np
args = json.loads(open(sys.argv[1]).read())
clips = [np.load(path) for path in args["clips"]]
if args["who"] == "transformers":
    import torch
    from transformers import ClapFeatureExtractor, ClapModel
    model = ClapModel.from_pretrained(args["model"]).eval()
    extractor = ClapFeatureExtractor.from_pretrained(args["model"])
    def encode(items):
        features = extractor(items, sampling_rate=48000, return_tensors="pt")
        with torch.inference_mode():
            return model.get_audio_features(**features)
else:
    from embedding_worker.engine.clap import Clap
    clap = Clap(args["model"])
    encode = clap.embed_audio
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
rates = {}
for batch in args["batches"]:
    encode(clips[:batch])
    start = time.perf_counter()
    for at in range(0, len(clips), batch):
        encode(clips[at:at + batch])
    rates[batch] = len(clips) / (time.perf_counter() - start)
best = max(rates, key=rates.get)
print(json.dumps({"items_per_s": rates[best], "best_batch": best, "by_batch": rates,
                  "peak_mb": hwm()}))
"""


def make_clap(out: Path) -> Path:
    """A CLAP of LAION's unfused shape, random weights, and a small tokenizer (text is not
    measured here)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    from models import make_tiny_clap_audio

    tiny = make_tiny_clap_audio(out.parent / "clap-tokenizer-source", fusion=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    config = ClapConfig()  # LAION's sizes; enable_fusion False
    model = ClapModel(config).eval()
    model.save_pretrained(out)
    extractor = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return out


def corpus(count: int, out: Path) -> tuple[list[bytes], list[Path], list[bytes]]:
    """`count` WAV files (44.1 kHz stereo, 3-12 s), the same clips decoded at 48 kHz mono (saved
    for the in-process children), and a few as MP3."""
    import numpy as np
    import soundfile as sf

    from embedding_worker.core.audio import decode

    rng = np.random.default_rng(0)
    wavs, decoded, mp3s = [], [], []
    for i in range(count):
        seconds = 3 + 9 * (i % 7) / 6
        t = np.arange(int(44100 * seconds)) / 44100
        left = 0.3 * np.sin(2 * np.pi * (200 + 37 * i) * t) + 0.05 * rng.standard_normal(len(t))
        stereo = np.stack([left, 0.8 * left], axis=1).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, stereo, 44100, format="WAV", subtype="PCM_16")
        wavs.append(buffer.getvalue())
        path = out / f"clip-{i}.npy"
        np.save(path, decode(wavs[-1], 48000).samples)
        decoded.append(path)
        if i < 8:
            buffer = io.BytesIO()
            sf.write(buffer, stereo, 44100, format="MP3", subtype="MPEG_LAYER_III")
            mp3s.append(buffer.getvalue())
    return wavs, decoded, mp3s


def decoding_cost(wavs: list[bytes], mp3s: list[bytes]) -> dict:
    """Milliseconds per clip and per second of audio, one thread: base64 decode + decode +
    downmix + resample to 48 kHz."""
    from embedding_worker.core.audio import decode
    from embedding_worker.core.media import _b64decode

    out = {}
    for name, files in (("wav", wavs), ("mp3", mp3s)):
        texts = [base64.b64encode(data).decode() for data in files]
        decode(_b64decode(texts[0], 1 << 30, "x", "audio"), 48000)  # warm: imports, FFT plans
        start, seconds = time.perf_counter(), 0.0
        for text in texts:
            seconds += decode(_b64decode(text, 1 << 30, "x", "audio"), 48000).seconds
        spent = time.perf_counter() - start
        out[name] = {"ms_per_clip": 1000 * spent / len(files),
                     "ms_per_audio_second": 1000 * spent / seconds}
    return out


def child(who: str, model: Path, clips: list[Path], out: Path) -> dict:
    args = {"who": who, "model": str(model), "clips": [str(p) for p in clips],
            "batches": BATCHES}
    return run_child(CHILD, args, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or HERE / "results" / f"audio-{time.strftime('%Y%m%d-%H%M%S')}"
    args.out.mkdir(parents=True, exist_ok=True)
    models, _, _ = bench_models()
    model = make_clap(HERE / "results" / "clap-htsat-shape")
    wavs, decoded, mp3s = corpus(args.clips, args.out)
    uris = ["data:audio/wav;base64," + base64.b64encode(data).decode() for data in wavs]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_NAMES", "SERVED_"))}
    env.update(PORT=str(free_port()), HOST="127.0.0.1", MODEL_NAMES=f"{models['minilm']};{model}",
               SERVED_MODEL_NAMES="minilm;clap", BATCH_SIZES=f"32;{PER_REQUEST}",
               REQUEST_TIMEOUT="600", MAX_REQUEST_BYTES=str(64 << 20),
               BENTOML_DO_NOT_TRACK="true")
    server = Target("worker", [sys.executable, "-m", "embedding_worker", "serve"], env, "/readyz",
                    "/v1", args.out / "worker.log")

    def body(i: int):
        start = (i * PER_REQUEST) % (len(uris) - PER_REQUEST + 1)
        return ({"model": "clap", "modality": "audio", "input": uris[start:start + PER_REQUEST]},
                PER_REQUEST, 0)

    rows = [{"who": "decode", **decoding_cost(wavs, mp3s)}]
    print(json.dumps(rows[-1]), flush=True)
    for _ in range(args.rounds):
        rows.append({"who": "server",
                     **server.one_cell("/v1/embeddings", body, CONCURRENCY, args.seconds)})
        print(json.dumps(rows[-1]), flush=True)
        for who in ("transformers", "engine"):
            rows.append({"who": who, **child(who, model, decoded, args.out)})
            print(json.dumps(rows[-1]), flush=True)
    seconds = sum(len(wav) - 44 for wav in wavs) / (44100 * 4)
    (args.out / "results.json").write_text(json.dumps(
        {"cpu": cpu(), "clips": len(wavs), "audio_seconds": seconds, "rows": rows}, indent=1))
    print("CPU:", cpu(), f"| {len(wavs)} clips, {seconds:.0f} s of audio")
    for who in ("server", "transformers", "engine"):
        rates = [r["items_per_s"] for r in rows if r["who"] == who]
        print(f"{who}: clips/s {', '.join(f'{r:.2f}' for r in rates)}")


if __name__ == "__main__":
    main()
