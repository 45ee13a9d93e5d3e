import os

# The Triton kernels run on the CPU in interpreter mode (tests/sparse/test_triton_dwconv.py). Triton decides
# how its jit'd helpers are called when it is first imported (torch, torchvision or timm may import
# it), so this must be set before anything imports torch. A GPU machine runs the compiled kernels
# with TRITON_INTERPRET=0 (benchmarks/gpu_check.sh).
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path
from typing import Mapping

import pytest
import torch

from fcmae.sparse.me_kernels import dense_conv_to_me, dense_depthwise_to_me

# Tests live in a folder per package they cover (DEVELOPING.md has the map); their shared helpers
# (test_pretrain.make_cfg, test_finetune.compose_cfg, ...) import by module name from any folder.
for _folder in sorted(Path(__file__).parent.iterdir()):
    if _folder.is_dir() and _folder.name.isidentifier() and any(_folder.glob("test_*.py")):
        sys.path.insert(0, str(_folder))

pytest_plugins = ["tiers", "pytester"]  # tiers: the fast tier and the full set, time limits, the budget


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| (0 when both are zero)."""
    denom = b.detach().norm()
    diff = (a.detach() - b.detach()).norm()
    return float(diff / denom) if denom > 0 else float(diff)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_distributed_env_left_behind():
    """A test that leaves RANK or MASTER_PORT set in this process hands it to every later subprocess (a Slurm
    job then refuses to set up its group): fail that test, by name, and clean up."""
    before = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    yield
    after = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert after == before, f"the test left the distributed environment changed: {after} (was {before})"


def canonical_to_minkowski(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical -> official sparse (MinkowskiEngine) encoder layout, ``encoder.`` prefixed: the
    tests' way to write checkpoints as the official sparse FCMAE saves them (the converter only
    reads that layout)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "downsample_layers" and parts[1] != "0":
            if parts[2] == "0":  # LayerNorm
                k = ".".join(parts[:3] + ["ln", parts[3]])
            elif parts[3] == "weight":
                k, v = ".".join(parts[:3] + ["kernel"]), dense_conv_to_me(v)
            else:
                v = v.reshape(1, -1)
        elif parts[0] == "stages":
            name, leaf = parts[3], parts[4]
            if name == "dwconv":
                k, v = (".".join(parts[:4] + ["kernel"]), dense_depthwise_to_me(v)) if leaf == "weight" \
                    else (k, v.reshape(1, -1))
            elif name == "norm":
                k = ".".join(parts[:4] + ["ln", leaf])
            elif name in ("pwconv1", "pwconv2"):
                k = ".".join(parts[:4] + ["linear", leaf])
            elif name == "grn":
                v = v.reshape(1, -1)
        out[f"encoder.{k}"] = v
    return out
