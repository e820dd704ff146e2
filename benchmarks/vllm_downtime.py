"""Migration downtime vs sequence length between two vLLM instances (Llumnix paper, Figure 10).

Set-up: ONE process holds two vLLM engine cores (``VLLMEngineAdapter``, tiny random Llama,
2 layers, hidden 128, ``max_position_embeddings`` 4096), each driven by its own ``Llumlet``
(engine loop in a thread); migrations go over the ZeroMQ transport on loopback, exactly as
between two processes, but both instances share this process's CPU and the adapter's
process-wide model lock (vLLM's CPU kernels keep process-wide scratch state, so a step of
one instance and a KV read/write of the other never overlap). The lock's effect: a KV
gather or scatter may wait for the other instance's in-flight step, so the downtime below
includes up to one decode step of the *other* instance (a few ms on the tiny model) that two
processes would not pay; it also serializes the two engine loops on the 2-core machine.

For each sequence length one request is prefilled on instance A, then, while it decodes:

- live migration (ping-pong A <-> B, median of several): downtime (freeze -> commit) and total;
- blocking copy (freeze first, copy everything, commit): downtime;
- recomputation (token ids only; the destination re-prefills): from the freeze on the source
  until the destination emits the next token.

Usage::

    .venv-vllm/bin/python benchmarks/vllm_downtime.py              # 256 .. 3584 tokens
    .venv-vllm/bin/python benchmarks/vllm_downtime.py --quick      # 256 and 2048, under a minute
    .venv-vllm/bin/python benchmarks/vllm_downtime.py --json /tmp/out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests_vllm"))

MAX_POS = 4096
BLOCK_SIZE = 32
NUM_BLOCKS = 2 * MAX_POS // BLOCK_SIZE + 16  # room for a full-length sequence plus an incoming copy
LENGTHS = [256, 1024, 2048, 3584]
QUICK_LENGTHS = [256, 2048]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "vllm_downtime.json"


def setup_environment(tmp: Path, threads: int) -> None:
    """The variables vLLM reads at import (set before importing it)."""
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CACHE_ROOT=str(tmp / "vllm-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), TMPDIR=str(tmp / "tmp"), VLLM_NO_USAGE_STATS="1",
        VLLM_HOST_IP="127.0.0.1", VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads),
        VLLM_ENABLE_V1_MULTIPROCESSING="0", RAY_AUTH_MODE="disabled",
    )
    tempfile.tempdir = None


def make_long_tiny_llama(folder: Path, max_pos: int = MAX_POS, seed: int = 0, std: float = 0.3) -> Path:
    """``tests_vllm/tiny_checkpoint.make_tiny_llama`` with a longer context."""
    import torch
    from tiny_checkpoint import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["model_max_length"] = max_pos
    cfg_path.write_text(json.dumps(tok_cfg))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, torch_dtype="bfloat16",
        initializer_range=std,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    return folder


class Recorder:
    """Token sink of both llumlets: per request, (output index, instance, perf_counter time)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: dict[str, list[tuple[int, str, float]]] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, instance_id, reply_to, outputs) -> None:
        now = time.perf_counter()
        with self.cond:
            for o in outputs:
                if not o.new_token_ids:
                    continue
                self.events.setdefault(o.request_id, []).append((o.index, instance_id, now))
                self.counts[o.request_id] = max(self.counts.get(o.request_id, 0), o.index + len(o.new_token_ids))
            self.cond.notify_all()

    def count(self, rid: str) -> int:
        with self.cond:
            return self.counts.get(rid, 0)

    def wait(self, rid: str, n: int, timeout: float = 120.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.counts.get(rid, 0) >= n, timeout=timeout):
                raise RuntimeError(f"{rid}: {self.counts.get(rid, 0)} tokens after {timeout} s, wanted {n}")


class Pair:
    def __init__(self, checkpoint: str, threads: int) -> None:
        from llumnix_py.engines.vllm.adapter import VLLMEngineAdapter
        from llumnix_py.engines.vllm.config import VLLMEngineConfig
        from llumnix_py.llumlet import Llumlet
        from llumnix_py.llumlet_types import LlumletConfig
        from llumnix_py.tokens import CallbackSink

        cfg = VLLMEngineConfig(checkpoint=checkpoint, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                               max_model_len=MAX_POS, max_num_batched_tokens=MAX_POS, num_threads=threads)
        self.rec = Recorder()
        self.engines = {"A": VLLMEngineAdapter.start(cfg), "B": VLLMEngineAdapter.start(cfg)}
        self.kv_block_bytes = self.engines["A"].kv_block_bytes
        self.llumlets = {k: Llumlet(LlumletConfig(instance_id=k, transport="zmq", lease_timeout_s=None),
                                    e, CallbackSink(self.rec)) for k, e in self.engines.items()}
        for lm in self.llumlets.values():
            lm.start()
        self.n = 0

    @staticmethod
    def other(k: str) -> str:
        return "B" if k == "A" else "A"

    def add(self, k: str, rid: str, length: int, max_tokens: int, salt: int) -> None:
        from llumnix_py.engines.types import Request, SamplingParams

        prompt = tuple((salt * 131 + 7 * i) % 400 + 2 for i in range(length))  # vocab ~450, skip bos/eos
        self.llumlets[k].add_request(Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                             reply_to="tcp://bench-frontend"))

    def migrate(self, src: str, rid: str, mode: str):
        from migration.protocol import MigrationConfig, MigrationStatus

        self.n += 1
        cfg = MigrationConfig(max_stages=3, last_stage_max_blocks=16, mode=mode)
        res = self.llumlets[src].migrate_now(rid, self.llumlets[self.other(src)].address, f"bench-{self.n}",
                                             config=cfg)
        if res.status != MigrationStatus.FINISHED:
            raise RuntimeError(f"migration of {rid} ({mode}) {res.status}: {res.reason}")
        return res

    def close(self) -> None:
        for lm in self.llumlets.values():
            lm.stop()
        for e in self.engines.values():
            e.close()


def measure_length(pair: Pair, length: int, live_repeats: int, tag: str = "seq") -> dict:
    rid = f"{tag}{length}"
    pair.add("A", rid, length, MAX_POS - length - 8, salt=length)
    pair.rec.wait(rid, 2)
    where = "A"
    live = []
    for _ in range(live_repeats):  # ping-pong; the request decodes on its holder in between
        live.append(pair.migrate(where, rid, "live"))
        where = pair.other(where)
        pair.rec.wait(rid, pair.rec.count(rid) + 2)
    blocking = pair.migrate(where, rid, "blocking")
    where = pair.other(where)
    pair.rec.wait(rid, pair.rec.count(rid) + 2)
    rec = pair.migrate(where, rid, "recompute")
    dst = pair.other(where)
    freeze_t = rec.committed_at - rec.downtime_s

    def dst_times() -> list[float]:  # tokens the destination emitted after the freeze
        return [t for _index, inst, t in pair.rec.events[rid] if inst == dst and t >= freeze_t]

    with pair.rec.cond:
        if not pair.rec.cond.wait_for(dst_times, timeout=120):
            raise RuntimeError(f"{rid}: no token from {dst} after recomputation")
        first_t = min(dst_times())
    pair.llumlets[dst].abort(rid)
    return {
        "length": length,
        "live_downtime_ms": statistics.median(r.downtime_s for r in live) * 1e3,
        "live_total_ms": statistics.median(r.total_s for r in live) * 1e3,
        "live_stages": [r.stages for r in live],
        "blocking_downtime_ms": blocking.downtime_s * 1e3,
        "blocking_total_ms": blocking.total_s * 1e3,
        "recompute_ms": (first_t - freeze_t) * 1e3,
        "blocks": blocking.blocks,
        "kv_bytes": blocking.blocks * pair.kv_block_bytes,
    }


def wait_idle(pair: Pair, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(lm.is_idle() for lm in pair.llumlets.values()):
        time.sleep(0.01)


def run(lengths: list[int], repeats: int, threads: int, console) -> dict:
    from rich.progress import Progress

    tmp = Path(tempfile.mkdtemp(prefix="llumnix-vllm-downtime-"))
    setup_environment(tmp, threads)
    rows = []
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("checkpoint + two vLLM instances", total=len(lengths) + 1)
            ckpt = str(make_long_tiny_llama(tmp / "tiny-llama-4k"))
            pair = Pair(ckpt, threads)
            try:
                progress.update(task, description="warm-up")
                measure_length(pair, min(lengths), 1, tag="warmup")  # first-use costs stay out
                wait_idle(pair)
                progress.advance(task)
                for length in lengths:
                    progress.update(task, description=f"{length} tokens")
                    rows.append(measure_length(pair, length, repeats))
                    wait_idle(pair)
                    progress.advance(task)
            finally:
                pair.close()
        import vllm

        version = vllm.__version__
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "setup": "two vLLM instances (two Llumlets, engine loops in threads) in ONE process, zmq transport "
                 "on loopback; the adapter's process-wide model lock serializes steps and KV reads/writes "
                 "of both instances",
        "vllm": version, "model": f"tiny random Llama (2 layers, hidden 128, max_position_embeddings {MAX_POS})",
        "block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS, "threads_per_instance": threads,
        "live_repeats": repeats,
        "lengths": [r["length"] for r in rows],
        "live_downtime_ms": [r["live_downtime_ms"] for r in rows],
        "live_total_ms": [r["live_total_ms"] for r in rows],
        "live_stages": [r["live_stages"] for r in rows],
        "blocking_downtime_ms": [r["blocking_downtime_ms"] for r in rows],
        "blocking_total_ms": [r["blocking_total_ms"] for r in rows],
        "recompute_ms": [r["recompute_ms"] for r in rows],
        "kv_bytes": [r["kv_bytes"] for r in rows],
        "cpu_count": os.cpu_count(),
    }


def print_report(out: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"vLLM migration downtime (zmq, two instances in one process, vLLM {out['vllm']})")
    for col in ("tokens", "KV KiB", "live downtime ms", "live total ms", "stages", "blocking downtime ms",
                "recompute ms", "recompute / live"):
        table.add_column(col, justify="right")
    for i, n in enumerate(out["lengths"]):
        table.add_row(str(n), f"{out['kv_bytes'][i] / 1024:.0f}", f"{out['live_downtime_ms'][i]:.2f}",
                      f"{out['live_total_ms'][i]:.1f}", ",".join(map(str, out["live_stages"][i])),
                      f"{out['blocking_downtime_ms'][i]:.2f}", f"{out['recompute_ms'][i]:.1f}",
                      f"{out['recompute_ms'][i] / out['live_downtime_ms'][i]:.1f}x")
    console.print(table)
    console.print(f"[dim]{out['setup']}; downtime includes waiting for the other instance's in-flight step.[/dim]")


def main(argv: Optional[list[str]] = None) -> dict:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 and 2048 tokens, 3 live repeats (under a minute)")
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--repeats", type=int, default=None, help="live migrations per length (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help=f"also write the results here (always written to {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (QUICK_LENGTHS if args.quick else LENGTHS)
    if max(lengths) > MAX_POS - 256:
        ap.error(f"lengths must be <= {MAX_POS - 256} (the request must keep decoding while it migrates)")
    repeats = args.repeats or (3 if args.quick else 5)
    console = Console() if Console().is_terminal else Console(width=130)
    t0 = time.perf_counter()
    out = run(lengths, repeats, args.threads, console)
    out["wall_s"] = time.perf_counter() - t0
    print_report(out, console)
    DEFAULT_JSON.parent.mkdir(parents=True, exist_ok=True)
    for path in {str(DEFAULT_JSON), args.json} - {None}:
        Path(path).write_text(json.dumps(out, indent=2))
    console.print(f"done in {out['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main()
