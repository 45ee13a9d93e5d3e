#!/usr/bin/env python
"""A static roofline of one whole training step (forward, loss, backward, fused AdamW) on a GPU,
computed on the CPU: FCMAE (any size, backend, mask, batch) next to MAE ViT-B/16.

Every aten op of the step is traced with a ``TorchDispatchMode`` on fake tensors at the real shapes
(no memory, seconds), under CUDA's autocast policy for bf16 (LayerNorm, pow and norms/sums without a
dtype in fp32: re-registered here for the CPU's autocast, which keeps them in bf16). Per op: FLOPs
(``torch.utils.flop_counter``; a grouped conv's backward counted from its forward, which the counter
counts as dense), bytes (tensors read and written; views are free) and the forward source line that
made it (anomaly mode carries it into the backward). A kernel's time is
``max(FLOPs / peak, bytes / HBM bandwidth)`` with the GEMM peak for matrix products in bf16 and the
CUDA-core peak for everything else. Two rules:

- ``a``: every aten op its own kernel (what eager PyTorch launches);
- ``b``: the ops between two GEMM / convolution / optimizer kernels fused into one kernel that reads
  each tensor from outside the chain once and writes only what is used outside it (later ops, and the
  tensors eager saves for the backward): the floor a fusing compiler approaches.

Per op class (GEMM, dwconv, LayerNorm, GRN, GELU, elementwise, gather/scatter, reductions, copies/casts,
loss, optimizer, mask/layout) it prints GFLOP, GB, ms and launches under both rules, the top source
lines, and FCMAE / MAE per image.

    python benchmarks/step_roofline.py                           # base, b128, 224, mask 0.6, bf16, H100
    python benchmarks/step_roofline.py --model atto --batch 8 --gpu h200 --json out.json
    python benchmarks/step_roofline.py --dwconv canvas --no-mae  # the canvas depthwise conv instead
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The tile depthwise conv (what encoder.dwconv=auto runs on CUDA) is traced through its custom op's fake
# implementation; the sparse backend offers it on the CPU only under Triton's interpreter (it never runs here).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # mae_reference

from fcmae.run.memory_plan import emulated_cuda_autocast, tensors_in  # noqa: E402  (CUDA's casts on the CPU)

aten = torch.ops.aten

# Peak rates (dense, no sparsity) and HBM bandwidth, from the vendors' data sheets.
GPUS = {
    "h100": {"gemm_bf16": 989e12, "gemm_fp32": 67e12, "cuda_cores": 67e12, "hbm": 3.35e12},
    "h200": {"gemm_bf16": 989e12, "gemm_fp32": 67e12, "cuda_cores": 67e12, "hbm": 4.8e12},
}
CLASSES = ("GEMM", "dwconv", "LayerNorm", "GRN", "GELU", "elementwise", "gather/scatter", "reductions",
           "copies/casts", "loss", "optimizer", "mask/layout")
# ops that only make a view: no kernel, no bytes
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "permute", "t", "transpose", "slice", "select",
         "as_strided", "alias", "unsqueeze", "squeeze", "detach", "unbind", "split", "split_with_sizes",
         "chunk", "narrow", "view_as", "expand_as", "lift_fresh", "_reshape_alias", "diagonal", "unfold",
         "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_to_copy_noop", "sym_size",
         "sym_stride", "sym_numel", "is_same_size", "_local_scalar_dense", "set_", "resize_"}
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
         "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
GATHERS = {"index_select", "index_copy", "index_add", "gather", "scatter", "scatter_add", "index",
           "index_put", "_index_put_impl", "index_fill", "masked_fill", "embedding", "embedding_dense_backward",
           "new_zeros", "zeros", "zeros_like", "fill", "scatter_reduce", "index_reduce"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "linalg_vector_norm", "norm", "var_mean", "var", "std",
              "argmax", "argmin", "_softmax", "_log_softmax", "sort", "argsort", "topk", "cumsum"}
COPIES = {"_to_copy", "copy", "copy_", "clone", "contiguous", "cat", "stack", "_unsafe_index", "constant_pad_nd",
          "to", "_to_dtype"}


@dataclass
class Op:
    name: str
    cls: str
    flops: float
    reads: list  # (storage key, bytes)
    writes: list
    gemm_dtype: str | None
    where: str
    backward: bool
    fp32_out: int = 0  # values the op writes in fp32 (to find full-size fp32 tensors between kernels)


def _storage_key(t: torch.Tensor):
    try:
        return id(t.untyped_storage())
    except Exception:  # noqa: BLE001 (a tensor without storage: count it by identity)
        return id(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StepTrace(TorchDispatchMode):
    """Every aten op of what runs under it, as :class:`Op` records."""

    def __init__(self, classify):
        super().__init__()
        self.ops: list[Op] = []
        self.classify = classify
        self.backward = False
        self._storages = []  # keep storages alive: their ids are the tensors' identity

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        base = func.overloadpacket.__name__
        if func.namespace == "prim" or base in VIEWS or base.startswith("_record_function"):
            return out
        ins = list(tensors_in(args)) + list(tensors_in(kwargs))
        outs = list(tensors_in(out))
        mutated = [a for a, arg in zip(args, func._schema.arguments) if arg.alias_info is not None
                   and arg.alias_info.is_write]
        outs += [t for t in tensors_in(mutated) if all(t is not o for o in outs)]
        if not outs:  # no tensor made or written: a query, not a kernel
            return out
        flops = self._flops(func, args, kwargs, out)
        for t in ins + outs:
            self._storages.append(t)
        reads = [(_storage_key(t), _nbytes(t)) for t in ins]
        writes = [(_storage_key(t), _nbytes(t)) for t in outs]
        where = _source_line(self.backward)
        gemm_dtype = None
        if base in GEMMS or func.namespace == "roofline" or \
                (base in ("convolution", "convolution_backward") and _groups(args) == 1):
            gemm_dtype = "bf16" if any(t.dtype in (torch.bfloat16, torch.float16) for t in ins) else "fp32"
        cls = self.classify(base, args, where, gemm_dtype)
        fp32 = sum(t.numel() for t in outs if t.dtype == torch.float32)
        self.ops.append(Op(base, cls, flops, reads, writes, gemm_dtype, where, self.backward, fp32))
        return out

    @staticmethod
    def _flops(func, args, kwargs, out) -> float:
        packet = func.overloadpacket
        base = packet.__name__
        if base in ("convolution", "convolution_backward") and _groups(args) > 1:
            # a grouped conv: the counter would count its backward as dense; forward FLOPs x grads computed
            x, w = args[0] if base == "convolution" else args[1], args[1] if base == "convolution" else args[2]
            fwd = 2 * (x.numel() // x.shape[1]) * w.numel() // _stride_area(args, base)
            if base == "convolution":
                return float(fwd)
            mask = args[-1] if isinstance(args[-1], (list, tuple)) else [True, True, True]
            return float(fwd * (int(mask[0]) + int(mask[1])))
        if packet in flop_registry:
            try:
                return float(flop_registry[packet](*args, **kwargs, out_val=out))
            except TypeError:
                return 0.0
        if func.namespace == "roofline":
            return _attention_flops(base, args)
        if base == "dwconv_tiles":  # (x (R, C), weight (taps, C) or (C, 1, k, k), ...): 2 FLOPs a tap a value
            x, w = args[0], args[1]
            return float(2 * x.numel() * (w.numel() // x.shape[1]))
        if base == "dwconv_tiles_wgrad":  # (x, grad, halo, tile, taps)
            return float(2 * args[0].numel() * args[4])
        return float(sum(t.numel() for t in tensors_in(out)))  # elementwise: one op an output value


def _groups(args) -> int:
    for a in reversed(args):
        if isinstance(a, int) and not isinstance(a, bool):
            return a
    return 1


def _stride_area(args, base) -> int:
    stride = args[3] if base == "convolution" else args[4]
    return int(stride[0]) * int(stride[1]) if isinstance(stride, (list, tuple)) and len(stride) == 2 else 1


def _source_line(backward: bool) -> str:
    """The innermost line of ours or timm's that made the op (for the backward: the forward line that made
    its autograd node, which anomaly mode records)."""
    frames = None
    if backward:
        node = torch._C._current_autograd_node()
        text = (node.metadata.get("traceback_") if node is not None else None) or []
        frames = [ln for ln in "".join(text).splitlines() if ln.strip().startswith("File ")]
        for line in reversed(frames):
            if "/fcmae/" in line or "/timm/" in line or "mae_reference" in line:
                return _short(line)
        return "backward (no forward line)"
    for f in reversed(traceback.extract_stack()[:-3]):
        if "/fcmae/" in f.filename or "/timm/" in f.filename or "mae_reference" in f.filename:
            return f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
    return "step"


def _short(line: str) -> str:
    # '  File "/x/fcmae/sparse/compact.py", line 71, in grn_rows'
    try:
        path = line.split('"')[1]
        rest = line.split(", line ")[1]
        lineno, fn = rest.split(", in ")
        return f"{Path(path).parent.name}/{Path(path).name}:{lineno} {fn.strip()}"
    except (IndexError, ValueError):
        return line.strip()


def classify(base: str, args, where: str, gemm_dtype) -> str:
    """An op's class, by what it is and, for the elementwise ones, by the source line that made it."""
    if base.startswith(("_fused_adam", "_foreach")):
        return "optimizer"
    if gemm_dtype is not None:
        return "GEMM"
    if base in ("convolution", "convolution_backward") or base.startswith("dwconv_tiles") or "dwconv" in where \
            or "depthwise" in where:
        return "dwconv"
    if "layer_norm" in base:
        return "LayerNorm"
    if "grn" in where.lower() or "normalizer" in where:
        return "GRN"
    if base.startswith("gelu"):
        return "GELU"
    if "loss" in where:
        return "loss"
    if any(k in where for k in ("masking.py", "layout.py", "tiles.py", "random_masking")):
        return "mask/layout"
    if base in GATHERS:
        return "gather/scatter"
    if base in REDUCTIONS:
        return "reductions"
    if base in COPIES:
        return "copies/casts"
    return "elementwise"


# What a profiled kernel (or CPU op) is, by its name: inductor names its kernels after the ops it fused
# (triton_red_fused_add_linalg_vector_norm_...), cuBLAS and CUTLASS theirs after the GEMM shape.
_KERNEL_WORDS = (
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("dwconv", ("dwconv", "_row_", "depthwise", "conv_depthwise", "tiles")),
    ("GRN", ("vector_norm", "grn")),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("GEMM", ("gemm", "xmma", "cutlass", "sm90_", "sm80_", "ampere_", "cublas", "flash", "attention", "fmha",
              "mm_", "addmm", "::mm", "bmm", "convolution", "conv2d", "cudnn", "linear")),
    ("GELU", ("gelu",)),
    ("loss", ("mse", "loss", "pow_sub")),
    ("gather/scatter", ("index", "scatter", "gather", "embedding")),
    ("copies/casts", ("copy", "_to_copy", "cat", "clone", "contiguous", "convert")),
    ("reductions", ("reduce", "red_", "per_", "sum", "mean", "amax", "softmax")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, words in _KERNEL_WORDS:
        if any(w in low for w in words):
            return cls
    return "elementwise"


# ---------------------------------------------------------------- fused attention as one kernel

@torch.library.custom_op("roofline::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stands for a flash-attention kernel (what CUDA runs; the CPU would trace the math path)."""
    return torch.empty_like(q)


@attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


@torch.library.custom_op("roofline::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@attention_backward.register_fake
def _(q, k, v, o, g):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _attention_grad(ctx, g):
    return attention_backward(*ctx.saved_tensors, g)


attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def _attention_flops(base: str, args) -> float:
    b, h, lq, d = args[0].shape
    fwd = 4.0 * b * h * lq * args[1].shape[2] * d
    return fwd if base == "attention" else 2.5 * fwd  # flash attention's backward: 2.5x its forward


@contextlib.contextmanager
def flash_attention():
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or dropout_p:
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return attention(q, k, v)
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


# ---------------------------------------------------------------- the two models

def fcmae_step(model_name: str, batch: int, img: int, mask_ratio: float, backend: str, dwconv: str):
    from fcmae.models import create_fcmae
    from fcmae.models.masking import num_visible, random_mask

    def build():
        return create_fcmae(model_name, backend=backend, dwconv=dwconv, mask_ratio=mask_ratio)

    def inputs(model, fake):
        grid = img // 32
        keep = num_visible(grid * grid, mask_ratio)
        mask = random_mask(batch, grid * grid, mask_ratio, generator=torch.Generator().manual_seed(0))
        return (fake(torch.randn(batch, 3, img, img)), fake(mask), keep)

    def loss(model, args):
        imgs, mask, keep = args
        return model(imgs, mask=mask, visible_per_sample=keep)[0]
    return build, inputs, loss


def mae_step(batch: int, img: int):
    from mae_reference import MaeVitB16

    def build():
        return MaeVitB16(img_size=img)

    def inputs(model, fake):
        ids_keep, mask = model.random_masking(batch, "cpu")
        return (fake(torch.randn(batch, 3, img, img)), fake(ids_keep), fake(mask))

    def loss(model, args):
        imgs, ids_keep, mask = args
        return model.loss(imgs, ids_keep, mask)
    return build, inputs, loss


def _to_fake(model: torch.nn.Module, fake_mode) -> torch.nn.Module:
    for module in model.modules():
        for k, v in module._parameters.items():
            if v is not None:
                module._parameters[k] = torch.nn.Parameter(fake_mode.from_tensor(v.detach()), requires_grad=v.requires_grad)
        for k, v in module._buffers.items():
            if v is not None:
                module._buffers[k] = fake_mode.from_tensor(v)
    return model


def trace_step(step, dtype: str = "bf16") -> list[Op]:
    """Trace forward, loss, backward and a fused AdamW step of a model at real shapes on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    build, inputs, loss_of = step
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # module constants (layout offsets) stay real
    model = _to_fake(build(), fake_mode)  # built for real (its init reads values), then faked: no memory after
    args = inputs(model, fake_mode.from_tensor)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    with fake_mode:  # the optimizer's state exists in steady state: made here, outside the trace
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    recorder = StepTrace(classify)
    policy = emulated_cuda_autocast() if dtype == "bf16" else contextlib.nullcontext()
    with fake_mode, flash_attention(), torch.autograd.set_detect_anomaly(True, check_nan=False), recorder:
        with policy:
            loss = loss_of(model, args)
        recorder.backward = True
        loss.backward()
        recorder.backward = False
        opt.step()
    return recorder.ops


# ---------------------------------------------------------------- the two rules

@dataclass
class Kernel:
    cls: str
    flops: float
    bytes: float
    gemm_dtype: str | None
    where: str
    launches: int = 1
    classes: dict = field(default_factory=dict)  # class -> share of the kernel's bytes (rule b)


def kernel_time(k: Kernel, gpu: dict) -> float:
    peak = gpu["gemm_bf16"] if k.gemm_dtype == "bf16" else gpu["gemm_fp32"] if k.gemm_dtype else gpu["cuda_cores"]
    return max(k.flops / peak, k.bytes / gpu["hbm"])


def rule_a(ops: list[Op]) -> list[Kernel]:
    return [Kernel(o.cls, o.flops, sum(b for _, b in o.reads) + sum(b for _, b in o.writes), o.gemm_dtype, o.where,
                   classes={o.cls: 1.0}) for o in ops]


ANCHORS = ("GEMM", "optimizer")


def _is_anchor(o: Op) -> bool:
    return o.cls in ANCHORS or o.name in ("convolution", "convolution_backward") or o.name.startswith("dwconv_tiles")


def rule_b(ops: list[Op]) -> list[Kernel]:
    """Anchors (GEMM, convolution, optimizer) stay kernels of their own; each run of other ops between two
    anchors becomes one kernel that reads each outside tensor once and writes what is read after it."""
    last_read = {}
    for i, o in enumerate(ops):
        for key, _ in o.reads:
            last_read[key] = i
    kernels, i = [], 0
    while i < len(ops):
        if _is_anchor(ops[i]):
            kernels += rule_a([ops[i]])
            i += 1
            continue
        j = i
        while j < len(ops) and not _is_anchor(ops[j]):
            j += 1
        chain = ops[i:j]
        made = {}
        for o in chain:
            for key, b in o.writes:
                made[key] = max(made.get(key, 0), b)
        read = {}
        for o in chain:
            for key, b in o.reads:
                if key not in made:
                    read[key] = max(read.get(key, 0), b)
        written = sum(b for key, b in made.items() if last_read.get(key, -1) >= j)
        per_class = defaultdict(float)
        for o in chain:
            per_class[o.cls] += sum(b for _, b in o.reads) + sum(b for _, b in o.writes)
        total = sum(per_class.values()) or 1.0
        kernels.append(Kernel(max(per_class, key=per_class.get), sum(o.flops for o in chain),
                              sum(read.values()) + written, None, chain[0].where,
                              classes={c: v / total for c, v in per_class.items()}))
        i = j
    return kernels


def summarise(kernels: list[Kernel], gpu: dict) -> dict:
    """Per class: GFLOP, GB, ms and launches (a fused kernel's time and bytes split by its classes' shares)."""
    out = {c: {"gflop": 0.0, "gb": 0.0, "ms": 0.0, "launches": 0.0} for c in CLASSES}
    for k in kernels:
        t = kernel_time(k, gpu)
        for c, share in k.classes.items():
            row = out.setdefault(c, {"gflop": 0.0, "gb": 0.0, "ms": 0.0, "launches": 0.0})
            row["gb"] += k.bytes * share / 1e9
            row["ms"] += t * share * 1e3
            row["launches"] += share
            row["gflop"] += k.flops * share / 1e9
    total = {"gflop": sum(r["gflop"] for r in out.values()), "gb": sum(r["gb"] for r in out.values()),
             "ms": sum(r["ms"] for r in out.values()), "launches": len(kernels)}
    return {"classes": out, "total": total}


def top_lines(kernels: list[Kernel], gpu: dict, n: int = 8) -> list[tuple[str, float]]:
    by = defaultdict(float)
    for k in kernels:
        by[k.where] += kernel_time(k, gpu) * 1e3
    return sorted(by.items(), key=lambda kv: -kv[1])[:n]


def roofline(args) -> dict:
    gpu = GPUS[args.gpu]
    steps = {"fcmae": fcmae_step(args.model, args.batch, args.img, args.mask, args.backend, args.dwconv)}
    if not args.no_mae:
        steps["mae"] = mae_step(args.batch, args.img)
    result = {"gpu": args.gpu, "model": args.model, "batch": args.batch, "img": args.img, "mask": args.mask,
              "backend": args.backend, "dwconv": args.dwconv, "dtype": args.dtype}
    for name, step in steps.items():
        ops = trace_step(step, args.dtype)
        result[name] = {rule: {**summarise(ks, gpu), "top": top_lines(ks, gpu)}
                        for rule, ks in (("a", rule_a(ops)), ("b", rule_b(ops)))}
    if "mae" in result:
        result["ratio"] = {r: result["fcmae"][r]["total"]["ms"] / result["mae"][r]["total"]["ms"] for r in ("a", "b")}
    return result


def print_table(res: dict) -> None:
    names = [n for n in ("fcmae", "mae") if n in res]
    print(f"# step roofline: {res['model']} ({res['backend']}, dwconv {res['dwconv']}) vs MAE ViT-B/16, batch "
          f"{res['batch']}, {res['img']} px, mask {res['mask']}, {res['dtype']}, {res['gpu'].upper()} peaks")
    for rule, what in (("a", "every op its own kernel"), ("b", "fused between GEMM/conv/optimizer kernels")):
        print(f"\n## rule {rule}: {what}")
        print(f"{'class':<15}" + "".join(f"{n + ' GFLOP':>13}{'GB':>8}{'ms':>8}{'launch':>8}" for n in names))
        for c in CLASSES:
            cells = ""
            for n in names:
                r = res[n][rule]["classes"].get(c, {"gflop": 0, "gb": 0, "ms": 0, "launches": 0})
                cells += f"{r['gflop']:>13.1f}{r['gb']:>8.2f}{r['ms']:>8.2f}{r['launches']:>8.0f}"
            print(f"{c:<15}{cells}")
        cells = "".join(f"{res[n][rule]['total']['gflop']:>13.1f}{res[n][rule]['total']['gb']:>8.2f}"
                        f"{res[n][rule]['total']['ms']:>8.2f}{res[n][rule]['total']['launches']:>8d}" for n in names)
        print(f"{'total':<15}{cells}")
        if "ratio" in res:
            print(f"FCMAE / MAE (same batch): {res['ratio'][rule]:.2f}")
        for n in names:
            print(f"top source lines ({n}, ms): " + "; ".join(f"{w} {t:.2f}" for w, t in res[n][rule]["top"][:6]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", help="FCMAE size (atto ... huge)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--mask", type=float, default=0.6)
    p.add_argument("--backend", default="sparse", choices=("sparse", "dense"))
    p.add_argument("--dwconv", default="tiles", choices=("canvas", "tiles"),
                   help="the sparse backend's depthwise conv as traced: tiles (the Triton custom op, the default "
                        "on CUDA) or canvas (scatter, cuDNN conv, gather)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--no-mae", action="store_true", help="FCMAE alone")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    if not args.model.startswith("convnextv2_"):
        args.model = f"convnextv2_{args.model}"
    res = roofline(args)
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
