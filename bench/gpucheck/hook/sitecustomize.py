"""Put on the server's PYTHONPATH by bench/gpu-check's throughput step only: arms the in-process
sampler (gpucheck/sampler.py) in each process it starts, when GPU_CHECK_PROFILE names a folder.
Nothing here runs in the service otherwise (a sitecustomize shadowed by this one is not chained:
the check's server needs none)."""

import os

if os.environ.get("GPU_CHECK_PROFILE"):
    try:
        from gpucheck import sampler

        sampler.arm(os.environ["GPU_CHECK_PROFILE"])
    except Exception as exc:  # noqa: BLE001 - profiling must never stop the server
        print(f"gpu-check sampler not armed: {exc!r}", flush=True)
