"""Render the newest ``bench/results/*.json`` into README.md between the bench markers.

    python bench/readme_table.py            # rewrites the section in README.md
    python bench/readme_table.py --print    # prints it instead

Per (op, shape, mode): our impl's median ms and TFLOP/s (or GB/s) with % of the measured peak, and
the speed-up over each peer timed in the same run (records of one (op, shape) come from one run).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
OURS = ("triton", "auto")


def newest_results() -> Path:
    files = sorted((ROOT / "bench" / "results").glob("*.json"), key=lambda p: (json.loads(p.read_text()).get("date", ""), p.name))
    if not files:
        raise SystemExit("no results in bench/results/")
    return files[-1]


def render(path: Path) -> str:
    doc = json.loads(path.read_text())
    groups = defaultdict(dict)
    for r in doc["records"]:
        groups[(r["op"], r["shape"], r["mode"])][r["impl"]] = r
    lines = [
        f"Device: {doc['device']} (measured bf16 peak {doc['peak_tflops']:.0f} TFLOP/s, copy {doc['peak_gbps']:.0f} GB/s), "
        f"torch {doc['torch']}, triton {doc['triton']}, {doc['date']}; file `{path.relative_to(ROOT)}`.",
        "",
        "| op | shape | mode | ours | ms | TFLOP/s or GB/s (% peak) | speed-up vs peers (same run) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (op, shape, mode), impls in sorted(groups.items()):
        for ours in OURS:
            r = impls.get(ours)
            if r is None:
                continue
            peaks = doc.get("runs", {}).get(r.get("run"), doc)  # each record against its own run's peaks
            if r.get("tflops"):
                rate = f"{r['tflops']:.0f} TF/s ({100 * r['tflops'] / peaks['peak_tflops']:.0f}%)"
            elif r.get("gbps"):
                rate = f"{r['gbps']:.0f} GB/s ({100 * r['gbps'] / peaks['peak_gbps']:.0f}%)"
            else:
                rate = "-"
            peers = ", ".join(f"{name} {p['ms'] / r['ms']:.2f}x" for name, p in sorted(impls.items()) if name not in OURS)
            lines.append(f"| {op} | {shape} | {mode} | {ours} | {r['ms']:.2f} | {rate} | {peers or '-'} |")
    return "\n".join(lines)


def main() -> None:
    table = render(newest_results())
    if "--print" in sys.argv:
        print(table)
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    main()
