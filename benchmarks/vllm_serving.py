"""Serving: vLLM's own OpenAI server (one instance) vs ``llumnix-py serve --engine vllm`` (two instances).

The same load (``llumnix_py.bench.run_bench``: Poisson arrivals at ``--rate``, zipf prompt and
output lengths, random token-id prompts, greedy, ``ignore_eos``, streaming) is sent to

(a) ``python -m vllm.entrypoints.openai.api_server`` (one engine, eager, block size 32,
    ``--num-gpu-blocks-override`` = the per-instance pool of (b), no prefix caching);
(b) ``llumnix-py serve --engine vllm --instances 2 --runtime local`` (two vLLM instances in one
    process, serialized by the adapter's process-wide model lock; migration on by default).

Both serve a tiny random Llama (2 layers, hidden 128, context 4096) written to a temporary
folder; the servers run one after the other (never together: the machine has few cores),
bind 127.0.0.1 only, and are always stopped at the end. Reported side by side: TTFT and TPOT
mean and P99, E2E, output tokens/s, failures. Start-up time (process start to a 200 from
``/v1/models``) is reported too.

Usage::

    .venv-vllm/bin/python benchmarks/vllm_serving.py --quick        # 30 requests at 3/s per server
    .venv-vllm/bin/python benchmarks/vllm_serving.py --json /tmp/serving.json
    .venv-vllm/bin/python benchmarks/vllm_serving.py --rate 8 --num-requests 200 --prompt-len zipf:128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests_vllm"))

from benchmarks.vllm_downtime import MAX_POS, make_long_tiny_llama, setup_environment  # noqa: E402

MODEL_NAME = "tiny"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "vllm_serving.json"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(ckpt: str, port: int, num_blocks: int, max_batch: int) -> list[str]:
    return [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--block-size", "32",
            "--dtype", "bfloat16", "--max-model-len", str(MAX_POS), "--num-gpu-blocks-override", str(num_blocks + 1),
            "--max-num-seqs", str(max_batch), "--no-enable-prefix-caching", "--disable-log-stats"]


def llumnix_command(ckpt: str, port: int, num_blocks: int, max_batch: int, instances: int) -> list[str]:
    return [PY, "-m", "llumnix_py.cli", "serve", "--engine", "vllm", "--model", ckpt, "--model-name", MODEL_NAME,
            "--instances", str(instances), "--runtime", "local", "--block-size", "32", "--num-blocks", str(num_blocks),
            "--max-model-len", str(MAX_POS), "--max-batch-size", str(max_batch), "--threads", "1",
            "--host", "127.0.0.1", "--port", str(port)]


class Server:
    """One server subprocess in its own process group; ``stop`` ends that group only."""

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.ready_s = float("nan")

    def start(self, timeout: float = 300.0) -> None:
        import httpx

        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env=dict(os.environ), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this script created for the server
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()


def warm_up(url: str) -> None:
    """Two short requests (first-use costs of the engines stay out of the measurement)."""
    import httpx

    for n in (16, 200):
        r = httpx.post(url + "/v1/completions", timeout=120,
                       json={"model": MODEL_NAME, "prompt": list(range(2, 2 + n)), "max_tokens": 8,
                             "temperature": 0.0, "ignore_eos": True})
        r.raise_for_status()


def bench_server(server: Server, args, console) -> dict:
    from llumnix_py.bench import BenchConfig, config_dict, run_bench

    server.start()
    console.print(f"{server.name}: ready in {server.ready_s:.1f} s ({server.url})")
    warm_up(server.url)
    cfg = BenchConfig(url=server.url, model=MODEL_NAME, num_requests=args.num_requests, rate=args.rate,
                      prompt_len=args.prompt_len, output_len=args.output_len, vocab=256, seed=args.seed,
                      timeout_s=600.0)
    result = asyncio.run(run_bench(cfg, progress=False))
    summary = result.summary()
    errors = sorted({r.error for r in result.records if not r.ok})[:5]
    return {"command": " ".join(server.cmd), "ready_s": server.ready_s, "bench": config_dict(cfg),
            "errors": errors, **summary}


def print_report(out: dict, console) -> None:
    from rich.table import Table

    cols = [("vllm", "vLLM api_server (1 instance)"), ("llumnix", f"llumnix-py serve ({out['instances']} instances)")]
    cols = [(k, t) for k, t in cols if k in out["results"]]
    table = Table(title=f"Serving the same load: {out['num_requests']} requests, Poisson {out['rate']}/s, "
                        f"prompt {out['prompt_len']}, output {out['output_len']} (vLLM {out['vllm']})")
    table.add_column("metric")
    for _k, title in cols:
        table.add_column(title, justify="right")
    rows = [("TTFT mean ms", "ttft_mean_ms", "{:.1f}"), ("TTFT P99 ms", "ttft_p99_ms", "{:.1f}"),
            ("TPOT mean ms", "tpot_mean_ms", "{:.2f}"), ("TPOT P99 ms", "tpot_p99_ms", "{:.2f}"),
            ("E2E mean ms", "e2e_mean_ms", "{:.1f}"), ("E2E P99 ms", "e2e_p99_ms", "{:.1f}"),
            ("output tokens/s", "output_tokens_per_s", "{:.1f}"), ("succeeded", "succeeded", "{}"),
            ("failed", "failed", "{}"), ("duration s", "duration_s", "{:.1f}"), ("start-up s", "ready_s", "{:.1f}")]
    for label, key, fmt in rows:
        table.add_row(label, *(fmt.format(out["results"][k][key]) for k, _t in cols))
    console.print(table)
    for k, _t in cols:
        if out["results"][k]["errors"]:
            console.print(f"[red]{k} errors:[/red] {out['results'][k]['errors']}")


def main(argv: Optional[list[str]] = None) -> dict:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="30 requests at 3/s, prompt zipf:64, output zipf:32 (about 1.5 min, mostly server start-up)")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="requests per second (Poisson)")
    ap.add_argument("--prompt-len", default=None, help="'N' or 'zipf:MEAN' (default zipf:128)")
    ap.add_argument("--output-len", default=None, help="'N' or 'zipf:MEAN' (default zipf:64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-blocks", type=int, default=512, help="KV blocks per instance (both servers)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--instances", type=int, default=2, help="llumnix-py instances")
    ap.add_argument("--only", choices=["vllm", "llumnix"], default=None, help="run one server only")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help=f"also write the results here (always written to {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    q = args.quick
    args.num_requests = args.num_requests or (30 if q else 200)
    args.rate = args.rate or (3.0 if q else 6.0)
    args.prompt_len = args.prompt_len or ("zipf:64" if q else "zipf:128")
    args.output_len = args.output_len or ("zipf:32" if q else "zipf:64")
    console = Console() if Console().is_terminal else Console(width=130)

    tmp = Path(tempfile.mkdtemp(prefix="llumnix-vllm-serving-"))
    setup_environment(tmp, 1)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    try:
        ckpt = str(make_long_tiny_llama(tmp / "tiny-llama-4k"))
        servers = {
            "vllm": Server("vLLM api_server", vllm_command(ckpt, free_port(), args.num_blocks, args.max_batch_size),
                           tmp / "vllm-server.log"),
            "llumnix": Server("llumnix-py serve", llumnix_command(ckpt, free_port(), args.num_blocks,
                                                                  args.max_batch_size, args.instances),
                              tmp / "llumnix-server.log"),
        }
        for key, server in servers.items():
            if args.only and key != args.only:
                continue
            try:
                results[key] = bench_server(server, args, console)
            except Exception:
                console.print(f"[red]{server.name} failed; log tail:[/red]\n{server.log_tail()}")
                raise
            finally:
                server.stop()
        import vllm

        version = vllm.__version__
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"vllm": version, "model": f"tiny random Llama (2 layers, hidden 128, context {MAX_POS})",
           "num_requests": args.num_requests, "rate": args.rate, "prompt_len": args.prompt_len,
           "output_len": args.output_len, "num_blocks_per_instance": args.num_blocks, "instances": args.instances,
           "cpu_count": os.cpu_count(), "results": results, "wall_s": time.perf_counter() - t0}
    print_report(out, console)
    DEFAULT_JSON.parent.mkdir(parents=True, exist_ok=True)
    for path in {str(DEFAULT_JSON), args.json} - {None}:
        Path(path).write_text(json.dumps(out, indent=2))
    console.print(f"done in {out['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main()
