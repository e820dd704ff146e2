"""Migration downtime vs sequence length (Llumnix paper, Figure 10) on this machine.

Two processes (``tests/migration_worker.py``), each a ``Llumlet`` over the default
built-in model (``ModelConfig`` defaults, ``max_position_embeddings`` raised to 8448 so
that an 8k-token sequence still has room to decode), 640 blocks of 16 tokens each. For
each sequence length one request is prefilled on the source, then migrated back and
forth while it decodes:

- live migration (several, median): downtime (freeze -> commit) and total time;
- blocking copy (freeze first, copy everything, commit): downtime;
- recomputation: from the freeze on the source until the destination has re-prefilled
  the sequence and emitted the next token (both processes use CLOCK_MONOTONIC).

Then the decode step time of the source's batch (8 short requests plus a few long
ones) idle vs while long sequences migrate back to back, the raw bandwidth of the same
transport (one large message, two processes) and the migration's achieved bandwidth
(bytes / time spent in ``copy`` of a blocking migration of the longest sequence).

    python benchmarks/migration_downtime.py                 # 256 .. 8192 tokens
    python benchmarks/migration_downtime.py --quick         # 256 and 4096, under a minute
    python benchmarks/migration_downtime.py --transport gloo --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from llumnix_py.engines.types import Request, SamplingParams  # noqa: E402
from tests.migration_worker import Worker, request_to_dict  # noqa: E402

LENGTHS = [256, 1024, 2048, 4096, 8192]
QUICK_LENGTHS = [256, 4096]
MAX_POS = 8448
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "migration_downtime.json")
SPEC = {"model": "default", "dtype": "float32", "num_blocks": 640, "block_size": 16, "max_model_len": MAX_POS,
        "max_position_embeddings": MAX_POS, "max_batch_size": 64, "max_batched_tokens": MAX_POS, "watermark": 0.01}


def _request(rid: str, length: int, max_tokens: int, salt: int = 0) -> dict:
    prompt = tuple((salt * 131 + 7 * i) % 300 + 1 for i in range(length))
    return request_to_dict(Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


class Pair:
    def __init__(self, transport: str, chunk_blocks: int) -> None:
        opts = {"chunk_blocks": chunk_blocks, "timeout_s": 60.0}
        self.w = {"A": Worker("A", transport, SPEC, opts), "B": Worker("B", transport, SPEC, opts)}
        self.n = 0

    def other(self, k: str) -> str:
        return "B" if k == "A" else "A"

    def count(self, k: str, rid: str) -> int:
        return self.w[k].call("wait_tokens", ids=[rid], n=0, timeout=1)["counts"][rid]

    def wait(self, k: str, rid: str, n: int, timeout: float = 300) -> None:
        r = self.w[k].call("wait_tokens", ids=[rid], n=n, timeout=timeout, )
        if not r["ok"]:
            raise RuntimeError(f"{rid} on {k}: {r['counts']} tokens, wanted {n}")

    def migrate(self, src: str, rid: str, mode: str, **cfg: Any) -> dict:
        self.n += 1
        res = self.w[src].call("migrate", timeout=600, request_id=rid, dst=self.w[self.other(src)].address,
                               migration_id=f"bench-{self.n}", mode=mode, **cfg)
        if res["status"] != "finished":
            raise RuntimeError(f"migration of {rid} ({mode}) {res['status']}: {res['reason']}")
        return res

    def close(self) -> None:
        for w in self.w.values():
            w.close()


def measure_length(pair: Pair, length: int, live_repeats: int, cfg: dict, tag: str = "seq") -> dict:
    rid = f"{tag}{length}"
    pair.w["A"].call("add", requests=[_request(rid, length, MAX_POS - length - 8, salt=length)])
    pair.wait("A", rid, 2)
    where = "A"
    live = []
    for _ in range(live_repeats):  # ping-pong, the request decoding on its holder in between
        res = pair.migrate(where, rid, "live", **cfg)
        live.append(res)
        where = pair.other(where)
        pair.wait(where, rid, pair.count(where, rid) + 2)
    blocking = pair.migrate(where, rid, "blocking")
    where = pair.other(where)
    pair.wait(where, rid, pair.count(where, rid) + 2)
    # recomputation: the destination re-prefills prompt + outputs, then emits the next token
    before = pair.count(where, rid)
    rec = pair.migrate(where, rid, "recompute")
    dst = pair.other(where)
    freeze_t = rec["committed_at"] - rec["downtime_s"]
    pair.wait(dst, rid, before + 1)
    outs = pair.w[dst].call("outputs")["outputs"]
    first_t = min(t for r, index, toks, fin, t in outs if r == rid and index >= before)
    pair.w[dst].call("abort", ids=[rid])
    copy_blocks = sum(b for b, _ in blocking["copies"])
    copy_s = sum(s for _, s in blocking["copies"])
    return {
        "length": length,
        "live_downtime_ms": statistics.median(r["downtime_s"] for r in live) * 1e3,
        "live_total_ms": statistics.median(r["total_s"] for r in live) * 1e3,
        "live_stages": [r["stages"] for r in live],
        "blocking_downtime_ms": blocking["downtime_s"] * 1e3,
        "recompute_ms": (first_t - freeze_t) * 1e3,
        "blocks": blocking["blocks"],
        "bytes": blocking["blocks"] * blocking["kv_block_bytes"],
        "copy_bytes": copy_blocks * blocking["kv_block_bytes"],
        "copy_s": copy_s,
    }


def _step_ms(outputs: list, ids: set, t0: float, t1: float) -> float:
    """Mean gap between consecutive steps (emits carrying a token of ``ids``) inside [t0, t1]."""
    times = sorted({t for r, _i, _toks, _f, t in outputs if r in ids and t0 <= t <= t1})
    if len(times) < 2:
        return float("nan")
    return (times[-1] - times[0]) / (len(times) - 1) * 1e3


def measure_step_time(pair: Pair, long_len: int, num_long: int, rounds: int, idle_s: float, cfg: dict) -> dict:
    """Source batch: 8 short decoders + ``num_long`` long sequences; idle window, then ``rounds``
    of back-to-back live migrations of the long ones (A -> B, then B -> A), then idle again."""
    a = pair.w["A"]
    short = [f"short{i}" for i in range(8)]
    long_ids = [f"long{i}" for i in range(num_long)]
    a.call("add", requests=[_request(r, long_len, MAX_POS - long_len - 8, salt=90 + i) for i, r in enumerate(long_ids)])
    for r in long_ids:
        pair.wait("A", r, 1)
    a.call("add", requests=[_request(r, 64, MAX_POS - 200, salt=i) for i, r in enumerate(short)])
    for r in short:
        pair.wait("A", r, 2)
    t0 = time.perf_counter()
    time.sleep(idle_s)
    t1 = time.perf_counter()
    migrations = []
    for _ in range(rounds):
        for r in long_ids:
            migrations.append(pair.migrate("A", r, "live", **cfg))
        for r in long_ids:
            pair.migrate("B", r, "live", **cfg)
    t2 = time.perf_counter()
    time.sleep(idle_s)
    t3 = time.perf_counter()
    outs = a.call("outputs")["outputs"]
    a.call("abort", ids=short + long_ids)
    ids = set(short)
    return {
        "step_ms_idle": _step_ms(outs, ids, t0, t1),
        "step_ms_migrating": _step_ms(outs, ids, t1, t2),
        "step_ms_after": _step_ms(outs, ids, t2, t3),
        "migrating_window_s": t2 - t1,
        "migrations_in_window": 2 * rounds * num_long,
    }


def run(lengths: list[int], transport: str, chunk_blocks: int, quick: bool, console: Console) -> dict:
    from benchmarks.transport_bandwidth import measure_raw_bandwidth

    cfg = {"max_stages": 3, "last_stage_max_blocks": 16}
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("starting workers", total=len(lengths) + 2)
        pair = Pair(transport, chunk_blocks)
        try:
            progress.update(task, description="warm-up")
            # first-use costs (imports, sockets, allocator) stay out of the figures
            measure_length(pair, min(lengths), 1, cfg, tag="warmup")
            for length in lengths:
                progress.update(task, description=f"{length} tokens")
                rows.append(measure_length(pair, length, 5, cfg))
                progress.advance(task)
            progress.update(task, description="step time with migrations in flight")
            step = measure_step_time(pair, 2048 if quick else 3072, 2, 2 if quick else 3,
                                     1.5 if quick else 3.0, cfg)
            progress.advance(task)
        finally:
            pair.close()
        progress.update(task, description="raw transport bandwidth")
        raw_bytes = max(r["bytes"] for r in rows)
        raw = measure_raw_bandwidth(transport, raw_bytes, None, repeats=3)
        progress.advance(task)
    longest = max(rows, key=lambda r: r["length"])
    mig_bw = longest["copy_bytes"] / longest["copy_s"] / 1e9 if longest["copy_s"] > 0 else float("nan")
    return {
        "transport": transport,
        "chunk_blocks": chunk_blocks,
        "lengths": [r["length"] for r in rows],
        "live_downtime_ms": [r["live_downtime_ms"] for r in rows],
        "live_total_ms": [r["live_total_ms"] for r in rows],
        "live_stages": [r["live_stages"] for r in rows],
        "blocking_downtime_ms": [r["blocking_downtime_ms"] for r in rows],
        "recompute_ms": [r["recompute_ms"] for r in rows],
        "kv_bytes": [r["bytes"] for r in rows],
        "raw_bandwidth_gbps": raw,
        "raw_bandwidth_nbytes": raw_bytes,
        "migration_bandwidth_gbps": mig_bw,
        "bandwidth_ratio": mig_bw / raw,
        **step,
        "cpu_count": os.cpu_count(),
    }


def targets(out: dict) -> list[tuple[str, str, bool]]:
    live, rec = out["live_downtime_ms"], out["recompute_ms"]
    t = []
    t.append((f"downtime at {out['lengths'][-1]} <= 1.5x downtime at {out['lengths'][0]}",
              f"{live[-1]:.2f} ms vs {live[0]:.2f} ms ({live[-1] / live[0]:.2f}x)", live[-1] <= 1.5 * live[0]))
    t.append((f"downtime at {out['lengths'][-1]} >= 20x lower than recomputation",
              f"{rec[-1] / live[-1]:.0f}x", rec[-1] >= 20 * live[-1]))
    t.append(("achieved bandwidth >= 70% of raw", f"{out['bandwidth_ratio']:.0%}", out["bandwidth_ratio"] >= 0.7))
    slow = out["step_ms_migrating"] / out["step_ms_idle"] - 1
    t.append(("step time with migration in flight <= 10% slower", f"{slow:+.1%}", slow <= 0.10))
    return t


def print_report(out: dict, console: Console) -> None:
    table = Table(title=f"Migration downtime ({out['transport']}, two processes, default model)")
    for col in ("tokens", "KV MiB", "live downtime ms", "live total ms", "stages", "blocking downtime ms",
                "recompute ms", "recompute / live"):
        table.add_column(col, justify="right")
    for i, n in enumerate(out["lengths"]):
        table.add_row(str(n), f"{out['kv_bytes'][i] / 2**20:.1f}", f"{out['live_downtime_ms'][i]:.2f}",
                      f"{out['live_total_ms'][i]:.1f}", ",".join(map(str, out["live_stages"][i])),
                      f"{out['blocking_downtime_ms'][i]:.2f}", f"{out['recompute_ms'][i]:.1f}",
                      f"{out['recompute_ms'][i] / out['live_downtime_ms'][i]:.0f}x")
    console.print(table)
    console.print(f"raw {out['transport']} bandwidth (one {out['raw_bandwidth_nbytes'] / 2**20:.0f} MiB message): "
                  f"{out['raw_bandwidth_gbps']:.2f} GB/s; migration copy: {out['migration_bandwidth_gbps']:.2f} GB/s "
                  f"({out['bandwidth_ratio']:.0%} of raw)")
    console.print(f"source decode step: idle {out['step_ms_idle']:.2f} ms, with migrations in flight "
                  f"{out['step_ms_migrating']:.2f} ms ({out['migrations_in_window']} migrations in "
                  f"{out['migrating_window_s']:.2f} s), after {out['step_ms_after']:.2f} ms")
    tt = Table(title="targets (reported, not asserted)")
    for col in ("target", "measured", "met"):
        tt.add_column(col)
    for name, got, ok in targets(out):
        tt.add_row(name, got, "yes" if ok else "NO")
    console.print(tt)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 and 4096 tokens only (under a minute)")
    ap.add_argument("--transport", default="zmq", choices=["zmq", "gloo"])
    ap.add_argument("--chunk-blocks", type=int, default=256,
                    help="KV blocks per message (pipelining); 256 blocks = 16 MiB of the default model")
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help=f"also write the results here (always written to {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (QUICK_LENGTHS if args.quick else LENGTHS)
    if max(lengths) > MAX_POS - 64:
        ap.error(f"lengths must be <= {MAX_POS - 64}")
    console = Console()
    t0 = time.perf_counter()
    out = run(lengths, args.transport, args.chunk_blocks, args.quick, console)
    out["wall_s"] = time.perf_counter() - t0
    print_report(out, console)
    os.makedirs(os.path.dirname(DEFAULT_JSON), exist_ok=True)
    for path in {DEFAULT_JSON, args.json} - {None}:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    console.print(f"done in {out['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main()
