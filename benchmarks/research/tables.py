"""Render the findings tables (markdown) from benchmarks/research/*.json.

    python benchmarks/research/tables.py > benchmarks/research/tables.md
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def f(x) -> str:
    return "" if x is None else f"{x:.3f}"


def heads() -> None:
    print("### a. Within-task accuracy of closed-form heads on frozen base features\n")
    print("| stream | px | crop | ridge (LOO lambda) | LDA (OAS) | NCM | ridge per task |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(HERE.glob("exp_heads_*.json")):
        r = json.loads(path.read_text())
        a = r["a"]
        mean = {k: sum(a[k]) / len(a[k]) for k in ("ridge", "lda", "ncm")}
        crop = "none" if r["tag"] else "0.875"
        per = ", ".join(f"{v:.3f}" for v in a["ridge"])
        print(f"| {r['stream']} | {r['size']} | {crop} | {f(mean['ridge'])} | {f(mean['lda'])} "
              f"| {f(mean['ncm'])} | {per} |")
    print("\n(unweighted mean over experiences)\n")


def routers() -> None:
    print("### c/d. Task identification and end-to-end accuracy on cached features\n")
    files = sorted(HERE.glob("exp_heads_*.json"))
    runs = [json.loads(p.read_text()) for p in files]
    names = []
    for r in runs:
        names += [n for n in r["routers"] if n not in names]
    cols = [f"{r['stream']} {r['size']}{'nc' if r['tag'] else ''}" for r in runs]
    print("task id (e2e with closed-form ridge head)\n")
    print("| router | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for n in names:
        cells = []
        for r in runs:
            row = r["routers"].get(n)
            cells.append("" if row is None else f"{row['task_id']:.3f} ({row['e2e_closed']:.3f})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nRanPAC-style head's own class-incremental accuracy (argmax over all classes):\n")
    print("| run | " + " | ".join(sorted({k for r in runs for k in r["ranpac"]})) + " |")
    keys = sorted({k for r in runs for k in r["ranpac"]})
    print("|---|" + "---|" * len(keys))
    for c, r in zip(cols, runs):
        print(f"| {c} | " + " | ".join(f(r["ranpac"].get(k, {}).get("ci_acc")) for k in keys) + " |")
    print()


def taps() -> None:
    print("### b. Closed-form head init inside TAPS training (within-task accuracy, true task)\n")
    print("| stream | variant | step 0 (eval) | after training | per task | s |")
    print("|---|---|---|---|---|---|")
    for path in sorted(HERE.glob("taps_init_*.json")):
        stream = path.stem.replace("taps_init_", "")
        for name, row in json.loads(path.read_text()).items():
            per = ", ".join(f"{v:.3f}" for v in row["acc"])
            print(f"| {stream} | {name} | {f(row['mean0'])} | {f(row['mean'])} | {per} "
                  f"| {row['seconds']:.0f} |")
    print()


if __name__ == "__main__":
    heads()
    taps()
    routers()
