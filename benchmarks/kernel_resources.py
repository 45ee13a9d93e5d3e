"""Resources of the tile kernels on real GPUs, read on any machine (#29): each launch configuration
compiled by Triton for sm_80 and sm_90 and read by the bundled ``ptxas -v``; registers, spill stores,
shared memory, and the global-memory bytes each kernel asks for per active site and channel.

    TRITON_INTERPRET=0 python benchmarks/kernel_resources.py [--arch 80 90] [--dtype bf16 fp32]
"""
import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (read when triton is imported)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fcmae.sparse.kernel_resources import bytes_per_site, compile_config, launch_configs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"])
    args = p.parse_args()
    print("| kernel | tile | BLOCK_C | dtype | sm | registers | spill stores (B/thread) | shared (B) | "
          "read/write per site & channel (B) | used by |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst, start = 0, time.time()
    for cfg, users in sorted(launch_configs(tuple(args.dtype)).items(),
                             key=lambda kv: (kv[0].kernel, -kv[0].tile, kv[0].block_c, kv[0].dtype)):
        for arch in args.arch:
            r, _ = compile_config(cfg, arch)
            io = bytes_per_site(cfg)
            worst = max(worst, r.spill_stores)
            shown = ", ".join(users[:3]) + (f" +{len(users) - 3}" if len(users) > 3 else "")
            print(f"| {cfg.kernel} | {cfg.tile} | {cfg.block_c} | {cfg.dtype} | {arch} | {r.registers} | "
                  f"{r.spill_stores} | {r.shared} | {io['read']}/{io['write']} | {shown} |", flush=True)
    print(f"\nworst spill stores: {worst} B/thread; compiled in {time.time() - start:.0f} s")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
