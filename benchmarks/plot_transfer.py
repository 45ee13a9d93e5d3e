#!/usr/bin/env python
"""Plot the transfer experiment (benchmarks/transfer_synthetic.sh) from its metrics files:
pretraining loss and k-NN accuracy, and validation top-1 of the two fine-tuning runs.

    python benchmarks/plot_transfer.py outputs/transfer_synthetic   # writes transfer.png + summary.json there
"""
import json
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main(out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'fcmae[plot]'")
    out = Path(out)
    pre = read(out / "pretrain" / "metrics.jsonl")
    ft = {name: read(out / f"finetune_{name}" / "metrics.jsonl") for name in ("pretrained", "scratch")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    train = [r for r in pre if "loss" in r]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="FCMAE pretraining loss (masked patches)", xlabel="step", ylabel="loss")
    knn = [r for r in pre if "eval/knn_top1" in r]
    axes[1].plot([r["epoch"] for r in knn], [r["eval/knn_top1"] for r in knn], marker="o")
    axes[1].set(title="k-NN top-1 during pretraining", xlabel="epoch", ylabel="%")
    summary = {"knn_top1": [r["eval/knn_top1"] for r in knn]}
    for name, rows in ft.items():
        val = [r for r in rows if "val/top1" in r]
        axes[2].plot([r["epoch"] for r in val], [r["val/top1"] for r in val], marker="o", label=name)
        summary[f"finetune_{name}_top1"] = [r["val/top1"] for r in val]
    axes[2].set(title="fine-tuning: validation top-1", xlabel="epoch", ylabel="%")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=100)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    print(f"wrote {out / 'transfer.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/transfer_synthetic")
