"""The table of ``benchmarks/fmnist_channels.sh``: per channel count, the pretraining rate (median
img/s of the logged steps after the first 50, from metrics.jsonl) and the final k-NN top-1, over seeds.

    python benchmarks/fmnist_channels.py outputs/fmnist_channels
"""
import json
import statistics
import sys
from pathlib import Path


def summarise(out: Path) -> dict:
    rows = {}
    for run in sorted(out.glob("ch*-seed*")):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rates = [m["images_per_s"] for m in lines if "images_per_s" in m and m["step"] > 50]
        knn = [m["eval/knn_top1"] for m in lines if "eval/knn_top1" in m]
        if not rates or not knn:
            continue
        chans = run.name.split("-")[0]
        rows.setdefault(chans, []).append({"run": run.name, "img_s": statistics.median(rates), "knn_top1": knn[-1]})
    return rows


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/fmnist_channels")
    rows = summarise(out)
    print("| input | seeds | pretraining img/s (median) | k-NN top-1 (mean +- sd) | per seed |")
    print("|---|---|---|---|---|")
    for chans, runs in sorted(rows.items()):
        knn = [r["knn_top1"] for r in runs]
        sd = statistics.stdev(knn) if len(knn) > 1 else 0.0
        print(f"| {chans[2:]} channel(s) | {len(runs)} | {statistics.median(r['img_s'] for r in runs):.1f} | "
              f"{statistics.mean(knn):.2f} +- {sd:.2f} | {', '.join(f'{k:.2f}' for k in knn)} |")
    if {"ch1", "ch3"} <= set(rows):
        ratio = statistics.median(r["img_s"] for r in rows["ch1"]) / statistics.median(r["img_s"] for r in rows["ch3"])
        print(f"\n1-channel / 3-channel pretraining rate: {ratio:.2f}x")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
