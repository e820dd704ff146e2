"""Context-switch cost on the built-in engine (real tensors): per-block vs grouped swap
copies, and a decode step with swap copies in flight on the copy thread.

FastSwitch (Shen, Li and Gao, arXiv:2411.18424) names two costs of a swap: many small
copies waste the host link (fixed by block groups: one copy per contiguous run), and
the engine idles while copies run (fixed by a copy thread beside the steps). This
measures both on the built-in engine's KV tensors:

* ``swap_out_ms_per_block_copy`` / ``swap_out_ms_grouped``: ``blocks`` KV blocks from
  the device pool to the host pool, one copy per block vs one copy per run (here the
  blocks are one group); ``swap_in_*`` the other way;
* ``step_ms_idle`` / ``step_ms_swapping``: one decode step of a batch, alone vs while
  the copy thread swaps ``blocks`` other blocks out and in (alternated step by step,
  medians, so both see the same machine);
* ``migrate_read_ms_indexed`` / ``migrate_read_ms_grouped`` (and ``migrate_write_*``):
  packing ``blocks`` blocks (one group) into a migration frame and writing a frame back,
  as the engine did before (a row-wise ``index_select`` / ``index_copy_``) vs now (one
  copy per contiguous run: ``migrate_copies_grouped`` copies each way, against
  ``blocks`` row copies).

    python benchmarks/context_switch.py                 # 1,024 blocks, more repeats
    python benchmarks/context_switch.py --quick         # 256 blocks, under a minute
    python benchmarks/context_switch.py --json out.json

On a CPU the "host link" is a memcpy inside one memory system and the copy thread
shares the cores with the step, so this measures the copy-count overhead and the
interference, not PCIe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from llumnix_py.engines.block_manager import copy_runs  # noqa: E402
from llumnix_py.engines.copier import ThreadCopier  # noqa: E402
from llumnix_py.engines.core import EngineConfig  # noqa: E402
from llumnix_py.engines.torch_engine.engine import make_torch_engine  # noqa: E402
from llumnix_py.engines.types import Request, SamplingParams  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(blocks: int, repeats: int, steps: int, batch: int, context: int) -> dict:
    engine = make_torch_engine(EngineConfig(num_blocks=2 * blocks + batch * (context // 16 + 2) + 8,
                                            num_host_blocks=blocks, max_batch_size=batch))
    ex = engine.executor
    dev, host = list(range(blocks)), list(range(blocks))  # the copies use the first ``blocks`` blocks
    per_block, grouped = copy_runs(dev, host, grouped=False), copy_runs(dev, host)
    ex.kv.normal_()  # real data, not zero pages
    out = {
        "blocks": blocks,
        "block_bytes": ex.kv_block_bytes,
        "swap_out_ms_per_block_copy": _median_ms(lambda: ex.swap_out(per_block), repeats),
        "swap_out_ms_grouped": _median_ms(lambda: ex.swap_out(grouped), repeats),
        "swap_in_ms_per_block_copy": _median_ms(lambda: ex.swap_in(per_block), repeats),
        "swap_in_ms_grouped": _median_ms(lambda: ex.swap_in(grouped), repeats),
    }
    index = torch.as_tensor(dev, dtype=torch.long)
    frame = ex.read_blocks(dev)
    before = ex.migration_copies
    ex.read_blocks(dev)
    out["migrate_copies_grouped"] = ex.migration_copies - before
    out["migrate_read_ms_indexed"] = _median_ms(lambda: ex.kv.index_select(0, index), repeats)
    out["migrate_read_ms_grouped"] = _median_ms(lambda: ex.read_blocks(dev), repeats)
    out["migrate_write_ms_indexed"] = _median_ms(lambda: ex.kv.index_copy_(0, index, frame), repeats)
    out["migrate_write_ms_grouped"] = _median_ms(lambda: ex.write_blocks(dev, frame), repeats)
    # A decode batch whose blocks the copies never touch: take the copied blocks first.
    held = engine.blocks.allocate(("bench", "copies"), blocks)
    assert held == dev, "the copied blocks must be the first ones"
    for i in range(batch):
        engine.add_request(Request(f"b{i}", tuple((i * 7 + k) % 300 for k in range(context)),
                                   SamplingParams(max_tokens=10 ** 6, ignore_eos=True)))
    engine.step()  # prefill
    copier = ThreadCopier()
    copier.start()
    idle, swapping = [], []
    try:
        for i in range(2 * steps):
            if i % 2:
                tickets = [copier.submit(lambda: ex.swap_out(grouped)), copier.submit(lambda: ex.swap_in(grouped))]
            t0 = time.perf_counter()
            engine.step()
            (swapping if i % 2 else idle).append(time.perf_counter() - t0)
            if i % 2:
                for t in tickets:
                    t.wait()
    finally:
        copier.close()
    out["step_ms_idle"] = statistics.median(idle) * 1e3
    out["step_ms_swapping"] = statistics.median(swapping) * 1e3
    out["batch"], out["context_tokens"], out["torch_threads"] = batch, context, torch.get_num_threads()
    out["grouped_speedup_out"] = out["swap_out_ms_per_block_copy"] / out["swap_out_ms_grouped"]
    out["grouped_speedup_in"] = out["swap_in_ms_per_block_copy"] / out["swap_in_ms_grouped"]
    out["step_slowdown"] = out["step_ms_swapping"] / out["step_ms_idle"] - 1.0
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 blocks, fewer repeats (under a minute)")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # this script owns its process
    blocks = args.blocks or (256 if args.quick else 1024)
    r = run(blocks, repeats=10 if args.quick else 30, steps=30 if args.quick else 100, batch=8, context=128)
    print("| blocks | block | copy | per-block copies (ms) | grouped (ms) | speedup |")
    print("|---|---|---|---|---|---|")
    for d in ("out", "in"):
        print(f"| {blocks} | {r['block_bytes'] // 1024} KiB | swap {d} | {r[f'swap_{d}_ms_per_block_copy']:.2f} | "
              f"{r[f'swap_{d}_ms_grouped']:.2f} | {r[f'grouped_speedup_{d}']:.1f}x |")
    for d in ("read", "write"):
        a, b = r[f"migrate_{d}_ms_indexed"], r[f"migrate_{d}_ms_grouped"]
        before = "index_select" if d == "read" else "index_copy_"
        print(f"| {blocks} | {r['block_bytes'] // 1024} KiB | migration {d} ({before} vs "
              f"{r['migrate_copies_grouped']} copy) | {a:.2f} | {b:.2f} | {a / b:.1f}x |")
    print(f"\ndecode step (batch {r['batch']}, {r['context_tokens']}-token contexts, {r['torch_threads']} torch "
          f"thread(s)): idle {r['step_ms_idle']:.2f} ms, with {blocks}-block swaps in flight "
          f"{r['step_ms_swapping']:.2f} ms ({100 * r['step_slowdown']:+.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
