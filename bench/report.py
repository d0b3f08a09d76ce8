"""results.json -> report.md (table with ratios) and plot.png."""

from __future__ import annotations

from pathlib import Path


def _key(cell: dict) -> tuple:
    return (cell["kind"], cell["concurrency"], cell["size"], cell["format"])


def write_report(report: dict, out: Path) -> None:
    by_name = {t["name"]: {_key(c): c for c in t["cells"]} for t in report["targets"]}
    ceiling = report["ceiling"]
    m = report["machine"]
    lines = [
        "# Benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}, "
        f"GPU: {m['gpu'] or 'none'}. Model: all-MiniLM-L6-v2 (embed); a MiniLM-L6-shaped "
        f"cross-encoder (rerank, query + 32 documents). Texts: half short queries, half "
        f"~100-300-token passages; kind `query`: one short query per request (the c=1 latency target). "
        f"Closed loop, {report['duration_s']:g} s per cell after 1 s warm-up.",
        "",
        f"Raw model ceiling (in-process, best batch size): embed "
        f"{ceiling['embed_items_per_s']:.1f} items/s, rerank {ceiling['rerank_pairs_per_s']:.1f} pairs/s"
        + _runs(report.get("ceiling_runs")) + "." + _by_texts(ceiling),
        "",
    ]
    names = [name for name, cells in by_name.items() if cells]  # worker-runpod: cold starts only
    header = "| kind | conc | items/req | format | " + " | ".join(
        f"{n} items/s | {n} p50 ms | {n} p99 ms | {n} err" for n in names)
    if {"worker", "infinity"} <= set(names):
        header += " | worker/infinity | worker/ceiling | worker/ceiling for its texts in flight"
    lines += [header + " |", "|" + "---|" * header.count("|")]
    for key in by_name[names[0]]:
        row = [key[0], str(key[1]), str(key[2]), key[3]]
        for n in names:
            c = by_name[n].get(key, {})
            row += [f"{c.get('items_per_s', 0):.1f}", f"{c.get('p50_ms', 0):.1f}",
                    f"{c.get('p99_ms', 0):.1f}", str(c.get("errors", ""))]
        if {"worker", "infinity"} <= set(names):
            ours, theirs = by_name["worker"][key], by_name["infinity"].get(key)
            # short queries alone have no ceiling of their own: the ceiling is the mix's
            limit = {"embed": ceiling["embed_items_per_s"], "rerank": ceiling["rerank_pairs_per_s"]}.get(key[0])
            ratio = ours["items_per_s"] / theirs["items_per_s"] if theirs and theirs["items_per_s"] else float("nan")
            near = _ceiling_in_flight(ceiling, key)
            row += [f"{ratio:.2f}x", f"{ours['items_per_s'] / limit:.2f}x" if limit else "",
                    f"{ours['items_per_s'] / near:.2f}x" if near else ""]
        lines.append("| " + " | ".join(row) + " |")
    lines += _cpu_table(by_name, names, ceiling)
    lines += ["", "Cold starts: median of the runs (each run listed), each server alone on the machine; "
              "cells: both servers up, taking turns. worker-runpod is the RunPod handler in one "
              "process (the SDK's local job API, POST /runsync); it has no readiness route, so its "
              "/ready column is its first job.", "",
              "| server | cold start to /ready (s) | cold start to first embedding (s) | runs (s) | peak RSS (MB) |",
              "|---|---|---|---|---|"]
    for t in report["targets"]:
        runs = ", ".join(f"{v:.1f}" for v in t.get("cold_start_first_embedding_s_all", []))
        lines.append(f"| {t['name']} | {t['cold_start_ready_s']:.1f} | "
                     f"{t['cold_start_first_embedding_s']:.1f} | {runs} | {t['peak_rss_mb']:.0f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(report, out / "plot.png")


def _cpu_table(by_name: dict, names: list[str], ceiling: dict) -> list[str]:
    """CPU per item in each server's process tree over the measured span, against the raw model's,
    and the cores the load generator took beside it (all share the machine's cores)."""
    first = by_name[names[0]]
    if not any("server_cpu_s" in c for c in first.values()):
        return []  # results from before the harness measured CPU
    lines = ["", "CPU per item: the server's process tree over each cell (user + system), the raw "
             f"model's in-process run at its best batch size: embed {ceiling.get('embed_cpu_ms_per_item', 0):.1f} "
             f"ms/item, rerank {ceiling.get('rerank_cpu_ms_per_pair', 0):.1f} ms/pair. Cores: CPU "
             "seconds per second of the cell; the load generator shares the machine.", ""]
    header = "| kind | conc | items/req | format | " + " | ".join(
        f"{n} CPU ms/item | {n} cores | load generator cores ({n})" for n in names)
    if len(names) > 1:
        header += f" | {names[0]}/{names[1]} CPU per item"
    lines += [header + " |", "|" + "---|" * header.count("|")]
    for key in first:
        row, per_item = [key[0], str(key[1]), str(key[2]), key[3]], []
        for n in names:
            c = by_name[n].get(key, {})
            items, elapsed = c.get("items", 0), c.get("elapsed_s", 0)
            ms = c.get("server_cpu_s", 0) * 1000 / items if items else float("nan")
            per_item.append(ms)
            row += [f"{ms:.1f}", f"{c.get('server_cpu_s', 0) / elapsed if elapsed else 0:.2f}",
                    f"{c.get('client_cpu_s', 0) / elapsed if elapsed else 0:.2f}"]
        if len(names) > 1:
            row.append(f"{per_item[0] / per_item[1]:.2f}x" if per_item[1] else "")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _ceiling_in_flight(ceiling: dict, key: tuple) -> float | None:
    """The raw model fed as many texts at a time as the embed cell keeps in flight (measured below
    128 texts; above, the batches are the ceiling's own)."""
    by_texts = ceiling.get("embed_items_per_s_by_texts", {})
    return by_texts.get(str(key[1] * key[2])) if key[0] == "embed" else None


def _by_texts(ceiling: dict) -> str:
    by_texts = ceiling.get("embed_items_per_s_by_texts")
    if not by_texts:
        return ""
    rates = ", ".join(f"{n}: {rate:.1f}" for n, rate in by_texts.items())
    return (f" Fed n texts at a time (a closed loop of c requests of s texts never holds more than "
            f"c x s; each group sorted by length, batched at its best size), embed items/s: {rates}.")


def _runs(runs: list[dict] | None) -> str:
    """The ceiling's measurements before and after the servers, when there are several."""
    if not runs or len(runs) < 2:
        return ""
    embed = " / ".join(f"{r['embed_items_per_s']:.1f}" for r in runs)
    rerank = " / ".join(f"{r['rerank_pairs_per_s']:.1f}" for r in runs)
    return f" (the mean of the measurements before / after the servers: embed {embed}, rerank {rerank})"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in report["targets"]:
        for size in (1, 8, 64):
            cells = [c for c in t["cells"] if c["kind"] == "embed" and c["size"] == size and c["format"] == "float"]
            xs = [c["concurrency"] for c in cells]
            left.plot(xs, [c["items_per_s"] for c in cells], marker="o", label=f"{t['name']} n={size}")
            right.plot(xs, [c["p50_ms"] for c in cells], marker="o", label=f"{t['name']} n={size}")
    left.axhline(report["ceiling"]["embed_items_per_s"], color="grey", ls="--", label="raw ceiling")
    for ax, title in ((left, "embeddings: items/s"), (right, "embeddings: p50 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend(fontsize=7)
    right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
