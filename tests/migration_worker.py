"""One engine instance in its own process, driven over a ``multiprocessing`` Pipe.

Spawned by ``tests/test_migration_processes.py`` and ``benchmarks/migration_downtime.py``:
the child builds a built-in engine, runs a ``Llumlet`` on a real migration transport
(zmq or gloo; migration traffic never uses pickle) and answers commands, plain dicts,
on its control pipe::

    {"cmd": "add", "requests": [request dict, ...]}                      -> {"ok": True}
    {"cmd": "wait_tokens", "ids": [...], "n": k, "timeout": s}           -> {"ok", "counts"}
    {"cmd": "migrate", "request_id", "dst", "migration_id", "mode", ...} -> MigrationResult fields + copy stats
    {"cmd": "abort", "ids": [...]}                                       -> {"ok": True}
    {"cmd": "outputs"}                                                   -> {"outputs": [(rid, i, tokens, fin, t)]}
    {"cmd": "wait_idle", "timeout": s}                                   -> {"ok"}
    {"cmd": "state"}                                                     -> free blocks, invariants, requests
    {"cmd": "stop"}

Times (``t``) are ``time.perf_counter()``, the same clock (CLOCK_MONOTONIC) in every
process on a Linux host, so the parent can compare them with other processes' times.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def request_to_dict(r) -> dict:
    return {"request_id": r.request_id, "prompt": list(r.prompt_token_ids), "sampling": r.sampling.to_wire(),
            "arrival_time": r.arrival_time}


def request_from_dict(d: dict):
    from llumnix_py.engines.types import Request, SamplingParams

    return Request(d["request_id"], tuple(d["prompt"]), SamplingParams.from_wire(d["sampling"]),
                   arrival_time=d.get("arrival_time", 0.0))


def build_engine(spec: dict):
    """``spec``: {"model": "tiny"|"default", "dtype", "num_blocks", "block_size", "max_model_len",
    "max_batch_size", "max_position_embeddings", "max_batched_tokens"}."""
    from llumnix_py.engines.core import EngineConfig
    from llumnix_py.engines.torch_engine.engine import make_torch_engine
    from llumnix_py.engines.torch_engine.model import ModelConfig

    if spec.get("model", "tiny") == "tiny":
        from tests.factories import small_model_config

        model = small_model_config(spec.get("dtype", "float64"))
    else:
        kw = {"max_position_embeddings": spec["max_position_embeddings"]} if spec.get("max_position_embeddings") \
            else {}
        model = ModelConfig(dtype=spec.get("dtype", "float32"), **kw)
    cfg = EngineConfig(num_blocks=spec.get("num_blocks", 128), block_size=spec.get("block_size", 16),
                       max_batch_size=spec.get("max_batch_size", 64), watermark=spec.get("watermark", 0.01),
                       max_batched_tokens=spec.get("max_batched_tokens", 4096))
    return make_torch_engine(cfg, model, max_model_len=spec.get("max_model_len"))


class _CopyTimer:
    """Wraps ``TransportPort.copy`` (class attribute, this process only) to time KV copies."""

    def __init__(self) -> None:
        self.records: list[tuple[int, float]] = []  # (blocks, seconds)

    def install(self) -> None:
        from migration.driver import TransportPort

        orig = TransportPort.copy
        timer = self

        def copy(port, migration_id, src_ids, dst_ids):
            t0 = time.perf_counter()
            try:
                return orig(port, migration_id, src_ids, dst_ids)
            finally:
                timer.records.append((len(dst_ids), time.perf_counter() - t0))

        TransportPort.copy = copy


def main(conn: Any, instance_id: str, transport: str, spec: dict, options: dict) -> None:
    """Child entry point (``multiprocessing`` spawn target)."""
    import torch

    torch.set_num_threads(options.get("threads", 1))
    from llumnix_py.llumlet import Llumlet
    from llumnix_py.llumlet_types import LlumletConfig
    from llumnix_py.tokens import CallbackSink
    from migration.protocol import MigrationConfig

    outputs: list[tuple] = []
    counts: dict[str, int] = {}
    cond = threading.Condition()

    def on_tokens(iid, reply_to, outs):
        t = time.perf_counter()
        with cond:
            for o in outs:
                outputs.append((o.request_id, o.index, list(o.new_token_ids),
                                o.finish_reason.value if o.finish_reason else None, t))
                counts[o.request_id] = o.index + len(o.new_token_ids)
            cond.notify_all()

    timer = _CopyTimer()
    timer.install()
    engine = build_engine(spec)
    config = LlumletConfig(instance_id=instance_id, transport=transport,
                           chunk_blocks=options.get("chunk_blocks", 256),
                           migration_timeout_s=options.get("timeout_s", 30.0))
    if config.gil_switch_interval_s:
        sys.setswitchinterval(config.gil_switch_interval_s)  # this process runs one llumlet, as a Ray worker does
    llumlet = Llumlet(config, engine, CallbackSink(on_tokens))
    address = llumlet.start()
    conn.send({"address": address, "kv_block_bytes": engine.kv_block_bytes, "pid": os.getpid()})
    try:
        while True:
            msg = conn.recv()
            cmd = msg["cmd"]
            try:
                if cmd == "stop":
                    conn.send({"ok": True})
                    break
                if cmd == "add":
                    for d in msg["requests"]:
                        llumlet.add_request(request_from_dict(d))
                    conn.send({"ok": True})
                elif cmd == "wait_tokens":
                    deadline = time.monotonic() + msg.get("timeout", 60.0)
                    with cond:
                        ok = cond.wait_for(lambda: all(counts.get(r, 0) >= msg["n"] for r in msg["ids"]),
                                           timeout=max(0.0, deadline - time.monotonic()))
                        conn.send({"ok": ok, "counts": {r: counts.get(r, 0) for r in msg["ids"]}})
                elif cmd == "migrate":
                    cfg = MigrationConfig(max_stages=msg.get("max_stages", 3),
                                          last_stage_max_blocks=msg.get("last_stage_max_blocks", 16),
                                          mode=msg.get("mode", "live"))
                    timer.records.clear()
                    res = llumlet.migrate_now(msg["request_id"], msg["dst"], msg["migration_id"],
                                              waiting=msg.get("waiting", False), config=cfg)
                    conn.send({"status": res.status.value, "reason": res.reason, "mode": res.mode,
                               "stages": res.stages, "blocks": res.blocks, "total_s": res.total_s,
                               "downtime_s": res.downtime_s, "committed_at": res.committed_at,
                               "copies": list(timer.records), "kv_block_bytes": engine.kv_block_bytes})
                elif cmd == "abort":
                    for rid in msg["ids"]:
                        llumlet.abort(rid)
                    conn.send({"ok": True})
                elif cmd == "outputs":
                    with cond:
                        conn.send({"outputs": list(outputs)})
                elif cmd == "wait_idle":
                    deadline = time.monotonic() + msg.get("timeout", 60.0)
                    while not llumlet.is_idle() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    conn.send({"ok": llumlet.is_idle()})
                elif cmd == "state":
                    with llumlet._locked():
                        try:
                            engine.check_invariants()
                            inv = ""
                        except AssertionError as exc:
                            inv = str(exc) or "invariant violated"
                        conn.send({"num_free": engine.blocks.num_free, "num_blocks": engine.config.num_blocks,
                                   "invariants": inv, "requests": sorted(engine.seqs),
                                   "incoming": sorted(llumlet.dest.incoming),
                                   "migrations_in": llumlet.stats.migrations_in,
                                   "migrations": dict(llumlet.stats.migrations)})
                else:
                    conn.send({"error": f"unknown command {cmd!r}"})
            except Exception as exc:  # report, keep serving
                conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        llumlet.stop()


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, instance_id: str, transport: str, spec: dict, options: dict | None = None,
                 start_timeout: float = 120.0) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=main, args=(child, instance_id, transport, spec, options or {}),
                                name=f"worker-{instance_id}", daemon=True)
        self.proc.start()
        child.close()
        hello = self.recv(start_timeout)
        self.address = hello["address"]
        self.kv_block_bytes = hello["kv_block_bytes"]

    def recv(self, timeout: float = 120.0) -> dict:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"worker {self.proc.name} did not answer in {timeout}s (alive={self.proc.is_alive()})")
        msg = self.conn.recv()
        if "error" in msg:
            raise RuntimeError(f"worker {self.proc.name}: {msg['error']}\n{msg.get('traceback', '')}")
        return msg

    def call(self, cmd: str, timeout: float = 120.0, **kw) -> dict:
        """Send one command and wait ``timeout`` for its answer; a command that waits in the
        worker (``wait_tokens``, ``wait_idle``) waits 90% of it there, so it answers first."""
        self.conn.send({"cmd": cmd, "timeout": 0.9 * timeout, **kw})
        return self.recv(timeout)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("stop", timeout=30)
        except Exception:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
