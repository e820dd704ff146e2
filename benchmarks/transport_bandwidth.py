"""Raw bandwidth of the migration transports between two processes.

For each transport (zmq, gloo) a destination server runs in a spawned process
whose handler accepts every payload without touching it; the source (this
process) sends ``nbytes`` either as one message or in pipelined chunks, then
waits for every reply (``send_blocks`` + ``flush``). A plain in-process memcpy
of the same size is measured in the same run for reference.

    python benchmarks/transport_bandwidth.py            # 256 MiB, 1 MiB chunks
    python benchmarks/transport_bandwidth.py --quick    # 32 MiB, under a minute
    python benchmarks/transport_bandwidth.py --json out.json

``measure_raw_bandwidth`` is the importable entry point (GB/s = 1e9 bytes/s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from migration import wire  # noqa: E402
from migration.transports import get_transport  # noqa: E402

MiB = 1 << 20


def _accept(msg: Any, payload: Optional[torch.Tensor]) -> dict:
    return wire.Reply(True).to_header()


def _serve(transport: str, addresses: Any, stop: Any) -> None:
    torch.set_num_threads(1)
    server_cls, _ = get_transport(transport)
    server = server_cls(_accept, timeout_s=60.0) if transport != "zmq" else server_cls(_accept)
    addresses.put(server.start())
    stop.wait(600)
    server.stop()


def _timed_sends(client: Any, data: torch.Tensor, repeats: int) -> list[float]:
    ids = list(range(data.shape[0]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        client.send_blocks("bench", ids, data)
        client.flush()
        times.append(time.perf_counter() - t0)
    return times


def _wait_address(proc: Any, addresses: Any, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return addresses.get(timeout=0.5)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"server process exited with code {proc.exitcode}") from None
    raise RuntimeError("server process did not report its address")


def measure_raw_bandwidth(transport: str, nbytes: int, chunk_bytes: Optional[int], *, repeats: int = 3) -> float:
    """Median GB/s of moving ``nbytes`` to a server in another process.

    Args:
        transport: a registered transport name with a cross-process server ("zmq", "gloo", "nccl").
        nbytes: bytes per transfer.
        chunk_bytes: pipelined chunk size; ``None`` sends one message of ``nbytes``.
        repeats: timed transfers (after one untimed warm-up transfer); the median is returned.
    """
    chunk = nbytes if chunk_bytes is None else chunk_bytes
    if nbytes <= 0 or chunk <= 0 or nbytes % chunk:
        raise ValueError(f"nbytes ({nbytes}) must be a positive multiple of chunk_bytes ({chunk})")
    data = torch.ones(nbytes // chunk, chunk, dtype=torch.uint8)  # one block per chunk
    ctx = mp.get_context("spawn")
    addresses, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(transport, addresses, stop), daemon=True)
    proc.start()
    try:
        address = _wait_address(proc, addresses)
        _, transport_cls = get_transport(transport)
        client = transport_cls(address, timeout_s=60.0, chunk_blocks=1)
        client.connect()
        try:
            _timed_sends(client, data, 1)  # warm-up: connection, process group, allocator
            times = _timed_sends(client, data, repeats)
        finally:
            client.close()
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return nbytes / statistics.median(times) / 1e9


def measure_memcpy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Median GB/s of one in-process copy of ``nbytes`` (reference for the transports)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def run(nbytes: int, chunk_bytes: int, transports: list[str], repeats: int) -> dict:
    rows = []
    for transport in transports:
        for mode, chunk in (("one message", None), (f"{chunk_bytes // MiB} MiB chunks", chunk_bytes)):
            gbps = measure_raw_bandwidth(transport, nbytes, chunk, repeats=repeats)
            rows.append({"transport": transport, "mode": mode, "nbytes": nbytes, "chunk_bytes": chunk, "gbps": gbps})
            print(f"  {transport:<6} {mode:<14} {gbps:8.2f} GB/s", flush=True)
    return {"memcpy_gbps": measure_memcpy_bandwidth(nbytes), "nbytes": nbytes, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "results": rows}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 MiB transfers (under a minute)")
    ap.add_argument("--transports", default="zmq,gloo")
    ap.add_argument("--mib", type=int, default=None, help="MiB per transfer (default 256, 32 with --quick)")
    ap.add_argument("--chunk-mib", type=int, default=1)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    nbytes = (args.mib or (32 if args.quick else 256)) * MiB
    repeats = 3 if args.quick else 5
    print(f"transfer {nbytes // MiB} MiB, median of {repeats}, two processes")
    out = run(nbytes, args.chunk_mib * MiB, args.transports.split(","), repeats)
    print(f"\n{'transport':<10}{'mode':<16}{'GB/s':>8}{'vs memcpy':>11}")
    for r in out["results"]:
        print(f"{r['transport']:<10}{r['mode']:<16}{r['gbps']:>8.2f}{r['gbps'] / out['memcpy_gbps']:>10.0%}")
    print(f"{'memcpy':<10}{'in-process':<16}{out['memcpy_gbps']:>8.2f}{1:>10.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
