#!/usr/bin/env python
"""Summarise and plot the Fashion-MNIST experiment (benchmarks/fmnist_transfer.sh) from its
metrics files: the pretraining loss and probes, the probe baselines, low-label fine-tuning
(pretrained vs scratch, mean and spread over seeds) and the mask-ratio sweep.

    python benchmarks/plot_fmnist.py outputs/fmnist_transfer   # writes fmnist_transfer.png + summary.json there
"""
import json
import re
import statistics
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last(rows: list[dict], key: str):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


RUN_NAME = re.compile(r"labels(?P<labels>\d+)(?P<tag>-.+)?-(?P<init>pretrained|scratch)-seed(?P<seed>\d+)$")


def finetune_summary(out: Path) -> dict:
    """``{"<labels><tag>": {init: {"top1": [per seed], "mean", "std"}}}`` from the final
    validation; the tag (FT_TAG of fmnist_transfer.sh) names a variant of the recipe."""
    summary = {}
    for run in sorted((out / "finetune").glob("labels*-seed*")):
        m = RUN_NAME.match(run.name)
        top1 = last(read(run / "metrics.jsonl"), "val/top1") if m else None
        if top1 is not None:
            group = m["labels"] + (m["tag"] or "")
            summary.setdefault(group, {}).setdefault(m["init"], {"top1": []})["top1"].append(top1)
    for per_init in summary.values():
        for s in per_init.values():
            s["mean"] = statistics.mean(s["top1"])
            s["std"] = statistics.stdev(s["top1"]) if len(s["top1"]) > 1 else 0.0
    return summary


def sweep_summary(out: Path) -> dict:
    rows = {}
    for run in sorted((out / "sweep").glob("*mask_ratio=*")):
        ratio = float(run.name.split("mask_ratio=")[1].split(",")[0])
        m = read(run / "metrics.jsonl")
        rows[ratio] = {"knn_top1": last(m, "eval/knn_top1"), "linear_top1": last(m, "eval/linear_top1"),
                       "loss": last(m, "loss"), "step": last(m, "step")}
    return dict(sorted(rows.items()))


def main(out: str) -> None:
    out = Path(out)
    pre = read(out / "pretrain" / "metrics.jsonl")
    probe = json.loads((out / "probe.json").read_text()) if (out / "probe.json").exists() else {}
    summary = {
        "pretrain": {"steps": last(pre, "step"), "final_loss": last(pre, "loss"),
                     "knn_top1": [r["eval/knn_top1"] for r in pre if "eval/knn_top1" in r],
                     "linear_top1": [r["eval/linear_top1"] for r in pre if "eval/linear_top1" in r]},
        "probe": probe, "finetune": finetune_summary(out), "sweep": sweep_summary(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'fcmae[plot]' (summary.json is written)")

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    train = [r for r in pre if "loss" in r]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="FCMAE pretraining loss (masked patches)", xlabel="step", ylabel="loss")

    evals = [r for r in pre if "eval/linear_top1" in r]
    for key, style in (("eval/linear_top1", "o-"), ("eval/knn_top1", "s-")):
        axes[1].plot([r["epoch"] for r in evals], [r[key] for r in evals], style, label=key.split("/")[1])
    for name, color in (("raw_pixels", "grey"), ("random_init", "red")):
        if name in probe:
            axes[1].axhline(probe[name]["linear_top1"], color=color, ls="--", lw=1, label=f"{name} linear")
            axes[1].axhline(probe[name]["knn_top1"], color=color, ls=":", lw=1, label=f"{name} k-NN")
    axes[1].set(title="probes (100 labels/class, 2000 test)", xlabel="epoch", ylabel="top-1 %")
    axes[1].legend(fontsize=7)

    ft = summary["finetune"]
    xs, labels = [], []
    for i, (n, per_init) in enumerate(sorted(ft.items(), key=lambda kv: (-int(re.match(r"\d+", kv[0])[0]), kv[0]))):
        for j, (init, color) in enumerate((("pretrained", "tab:blue"), ("scratch", "tab:orange"))):
            if init in per_init:
                s = per_init[init]
                axes[2].bar(i * 3 + j, s["mean"], yerr=s["std"], color=color, capsize=4,
                            label=init if i == 0 else None)
                axes[2].plot([i * 3 + j] * len(s["top1"]), s["top1"], "k.", ms=4)
        xs.append(i * 3 + 0.5)
        count, _, tag = n.partition("-")
        labels.append(f"{count}/class" + (f"\n{tag}" if tag else ""))
    axes[2].set_xticks(xs, labels)
    axes[2].set(title="fine-tuning: labels per class, full test set (3 seeds)", ylabel="top-1 %")
    axes[2].legend(fontsize=7)

    sweep = summary["sweep"]
    if sweep:
        ratios = list(sweep)
        for key, style in (("linear_top1", "o-"), ("knn_top1", "s-")):
            axes[3].plot(ratios, [sweep[r][key] for r in ratios], style, label=key)
        axes[3].legend(fontsize=7)
    axes[3].set(title="mask-ratio sweep (short runs)", xlabel="mask ratio", ylabel="top-1 %")
    fig.tight_layout()
    fig.savefig(out / "fmnist_transfer.png", dpi=90)
    print(f"wrote {out / 'fmnist_transfer.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/fmnist_transfer")
