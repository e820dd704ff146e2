"""``llumnix-py bench``: a load generator for any OpenAI-compatible completions endpoint.

Requests arrive as a Poisson or Gamma process at a given rate, with fixed or
zipf-distributed prompt and output lengths (prompts are random token ids, sent
as the token-list form of ``prompt``). Each request streams; the generator
records time to first token (TTFT), time per output token (TPOT) and end-to-end
latency, and prints mean and P99 as a table (and JSON). With an objective
(``--ttft-ms`` and ``--tbt-ms``, or ``--deadline-ms``), every request carries it (the
server's extension fields) and the generator also reports attainment (the share of
requests whose every token arrived by its due time, as the client saw them) and
goodput (output tokens per second of the requests that met it).

With objectives (``slo_ttft_ms`` and ``slo_tpot_ms``) it also reports SLO attainment
and SLO scale (``llumnix_py.slo``); ``run_sweep`` runs the same load at several rates
and reports DistServe's goodput (the highest rate at which 90% of requests meet both
objectives), also per instance (the server's ``/v1/cluster/state`` counts them).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import httpx
import numpy as np

from llumnix_py.engines.types import Objective
from llumnix_py import slo as slo_math


@dataclass(frozen=True)
class BenchConfig:
    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str = "llumnix-tiny"
    num_requests: int = 100
    rate: float = 4.0  # requests per second
    arrival: str = "poisson"  # poisson | gamma
    cv: float = 1.0  # coefficient of variation of gamma inter-arrival gaps
    prompt_len: str = "128"  # "N" or "zipf:MEAN"
    output_len: str = "64"
    vocab: int = 256
    api_key: Optional[str] = None
    seed: int = 0
    timeout_s: float = 600.0
    ttft_ms: Optional[float] = None
    tbt_ms: Optional[float] = None
    deadline_ms: Optional[float] = None
    slo_ttft_ms: Optional[float] = None  # with slo_tpot_ms: report attainment and SLO scale
    slo_tpot_ms: Optional[float] = None

    @property
    def objective(self) -> Optional[Objective]:
        given = {k: getattr(self, k) for k in ("ttft_ms", "tbt_ms", "deadline_ms") if getattr(self, k) is not None}
        return Objective(**given) if given else None

    def __post_init__(self) -> None:
        self.objective  # noqa: B018 (validates: InvalidRequestError names a bad combination)
        if (self.slo_ttft_ms is None) != (self.slo_tpot_ms is None):
            raise ValueError("give both slo_ttft_ms and slo_tpot_ms, or neither")
        if self.slo_ttft_ms is not None:
            slo_math.SLO.from_ms(self.slo_ttft_ms, self.slo_tpot_ms)  # type: ignore[arg-type]
        if self.num_requests <= 0 or self.rate <= 0 or self.cv <= 0:
            raise ValueError("num_requests, rate and cv must be positive")
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError("arrival must be poisson or gamma")
        sample_lengths(self.prompt_len, 1, np.random.default_rng(0))
        sample_lengths(self.output_len, 1, np.random.default_rng(0))


@dataclass
class RequestRecord:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    error: str = ""
    margin_s: Optional[float] = None  # least slack to the objective's due times (met iff >= 0)

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass
class BenchResult:
    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0
    slo: Optional[slo_math.SLO] = None

    def attainment(self) -> float:
        """Share of all requests (a failed one misses) that met both objectives."""
        assert self.slo is not None
        ttfts = [r.ttft_s if r.ok else float("inf") for r in self.records]
        tpots = [r.tpot_s if r.ok and r.output_tokens > 1 else None for r in self.records]
        return slo_math.attainment(ttfts, tpots, self.slo.ttft_s, self.slo.tpot_s)

    def summary(self) -> dict:
        ok = [r for r in self.records if r.ok]
        out = {"requests": len(self.records), "succeeded": len(ok), "failed": len(self.records) - len(ok),
               "duration_s": self.duration_s,
               "output_tokens_per_s": sum(r.output_tokens for r in ok) / self.duration_s if self.duration_s else 0.0}
        for name, values in (("ttft", [r.ttft_s for r in ok]), ("tpot", [r.tpot_s for r in ok if r.output_tokens > 1]),
                             ("e2e", [r.e2e_s for r in ok])):
            arr = np.asarray(values) if values else np.zeros(1)
            out[f"{name}_mean_ms"] = float(arr.mean() * 1e3)
            out[f"{name}_p99_ms"] = float(np.percentile(arr, 99) * 1e3)
        judged = [r for r in self.records if r.margin_s is not None or not r.ok]
        if any(r.margin_s is not None for r in self.records):
            met = [r for r in judged if r.ok and r.margin_s is not None and r.margin_s >= 0]
            out["attainment"] = len(met) / len(judged) if judged else 0.0
            out["goodput_tokens_per_s"] = sum(r.output_tokens for r in met) / self.duration_s if self.duration_s else 0.0
        if self.slo is not None:
            ttfts = [r.ttft_s if r.ok else float("inf") for r in self.records]
            tpots = [r.tpot_s if r.ok and r.output_tokens > 1 else None for r in self.records]
            out["slo_ttft_ms"], out["slo_tpot_ms"] = self.slo.ttft_s * 1e3, self.slo.tpot_s * 1e3
            out["slo_attainment"] = self.attainment()
            out["slo_scale"] = slo_math.slo_scale(ttfts, tpots, self.slo.ttft_s, self.slo.tpot_s)
        return out


def sample_lengths(spec: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` lengths by ``spec``: ``zipf:MEAN`` (Zipf-like, exponent 1.5, scaled to the mean) or a
    fixed ``N``; ``ValueError`` for a bad spec."""
    if spec.startswith("zipf:"):
        mean = float(spec[5:])
        if mean < 1:
            raise ValueError("zipf mean must be >= 1")
        hi = max(2, int(2 * mean - 1))
        ranks = np.arange(1, hi + 1, dtype=float)
        p = ranks ** -1.5
        p /= p.sum()
        raw = rng.choice(ranks, size=n, p=p)
        return np.maximum(1, np.round(raw * mean / (p * ranks).sum())).astype(int)
    value = int(spec)
    if value <= 0:
        raise ValueError(f"length must be positive, got {spec}")
    return np.full(n, value, dtype=int)


def arrival_times(cfg: BenchConfig, rng: np.random.Generator) -> np.ndarray:
    if cfg.arrival == "poisson":
        gaps = rng.exponential(1.0 / cfg.rate, cfg.num_requests)
    else:
        shape = 1.0 / cfg.cv ** 2
        gaps = rng.gamma(shape, 1.0 / (cfg.rate * shape), cfg.num_requests)
    return np.cumsum(gaps) - gaps[0]


async def _sse_lines(resp: httpx.Response):
    """Lines of an SSE body split on ``\n`` only: JSON text may hold U+2028 or U+0085
    unescaped, which ``aiter_lines`` would also treat as line breaks."""
    buf = b""
    async for data in resp.aiter_bytes():
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, prompt: list[int], max_tokens: int) -> RequestRecord:
    body = {"model": cfg.model, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    objective = cfg.objective
    if objective is not None:
        body.update(objective.to_wire(), return_token_ids=True)
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    token_times: list[float] = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return RequestRecord(False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in _sse_lines(resp):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and ttft is None:
                    ttft = time.perf_counter() - t0
                for choice in chunk.get("choices") or ():
                    token_times.extend([time.perf_counter() - t0] * len(choice.get("token_ids") or ()))
                usage = chunk.get("usage")
                if usage:
                    tokens = usage.get("completion_tokens", tokens)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestRecord(False, error=f"{type(exc).__name__}: {exc}")
    e2e = time.perf_counter() - t0
    margin = objective.margin_s(0.0, token_times) if objective is not None and token_times else None
    return RequestRecord(True, ttft_s=ttft if ttft is not None else e2e, e2e_s=e2e, output_tokens=tokens,
                         margin_s=margin)


async def run_bench(cfg: BenchConfig, progress: bool = True) -> BenchResult:
    rng = np.random.default_rng(cfg.seed)
    starts = arrival_times(cfg, rng)
    prompt_lens = sample_lengths(cfg.prompt_len, cfg.num_requests, rng)
    output_lens = sample_lengths(cfg.output_len, cfg.num_requests, rng)
    prompts = [rng.integers(0, cfg.vocab, int(n)).tolist() for n in prompt_lens]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.num_requests, desc="requests", unit="req")
    limits = httpx.Limits(max_connections=cfg.num_requests, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        t0 = time.perf_counter()

        async def fire(i: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, starts[i] - (time.perf_counter() - t0)))
            rec = await _one(client, cfg, prompts[i], output_lens[i])
            if bar is not None:
                bar.update(1)
            return rec

        records = await asyncio.gather(*(fire(i) for i in range(cfg.num_requests)))
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    slo = slo_math.SLO.from_ms(cfg.slo_ttft_ms, cfg.slo_tpot_ms) if cfg.slo_ttft_ms is not None else None
    return BenchResult(list(records), duration, slo)


async def run_sweep(cfg: BenchConfig, rates: list[float], progress: bool = True) -> dict:
    """The same load (``cfg``) at each of ``rates``, then DistServe's goodput over them.

    Returns ``{"rates": [...], "attainment": [...], "summaries": [...], "goodput_rps": g,
    "instances": n, "goodput_per_instance_rps": g / n}`` (``n`` from the server's
    ``/v1/cluster/state``; ``None`` where it does not say).
    """
    if cfg.slo_ttft_ms is None:
        raise ValueError("a goodput sweep needs SLOs (slo_ttft_ms, slo_tpot_ms)")
    if not rates or any(r <= 0 for r in rates):
        raise ValueError("rates must be a non-empty list of positive request rates")
    summaries = []
    for rate in sorted(rates):
        result = await run_bench(replace(cfg, rate=rate), progress)
        summaries.append(result.summary())
    attained = [s["slo_attainment"] for s in summaries]
    good = slo_math.goodput(sorted(rates), attained)
    instances = await _instance_count(cfg)
    return {"rates": sorted(rates), "attainment": attained, "summaries": summaries, "goodput_rps": good,
            "instances": instances, "goodput_per_instance_rps": good / instances if instances else None}


async def _instance_count(cfg: BenchConfig) -> Optional[int]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=30) as client:
            resp = await client.get("/v1/cluster/state")
            if resp.status_code != 200:
                return None
            return len(resp.json().get("instances") or []) or None
    except (httpx.HTTPError, ValueError):
        return None


def print_summary(summary: dict, title: str = "llumnix-py bench") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("P99", justify="right")
    for name in ("ttft", "tpot", "e2e"):
        table.add_row(f"{name.upper()} (ms)", f"{summary[f'{name}_mean_ms']:.1f}", f"{summary[f'{name}_p99_ms']:.1f}")
    Console().print(table)
    Console().print(f"requests {summary['succeeded']}/{summary['requests']} ok, "
                    f"{summary['output_tokens_per_s']:.1f} output tokens/s over {summary['duration_s']:.1f} s")
    if "attainment" in summary:
        Console().print(f"objective attainment {100 * summary['attainment']:.1f}%, goodput "
                        f"{summary['goodput_tokens_per_s']:.1f} tokens/s")
    if "slo_attainment" in summary:
        Console().print(f"SLO (TTFT {summary['slo_ttft_ms']:.0f} ms, TPOT {summary['slo_tpot_ms']:.0f} ms): "
                        f"{summary['slo_attainment']:.1%} of requests met both; SLO scale for 90%: "
                        f"{summary['slo_scale']:.2f}")


def print_sweep(sweep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SLO attainment by rate")
    for col in ("rate (req/s)", "attainment", "SLO scale", "TTFT P99 (ms)", "TPOT P99 (ms)"):
        table.add_column(col, justify="right")
    for rate, s in zip(sweep["rates"], sweep["summaries"]):
        table.add_row(f"{rate:g}", f"{s['slo_attainment']:.1%}", f"{s['slo_scale']:.2f}", f"{s['ttft_p99_ms']:.1f}",
                      f"{s['tpot_p99_ms']:.1f}")
    Console().print(table)
    per = sweep["goodput_per_instance_rps"]
    Console().print(f"goodput (highest swept rate with >= 90% meeting both): {sweep['goodput_rps']:g} req/s"
                    + (f", {per:.3g} req/s per instance ({sweep['instances']} instances)" if per is not None else ""))


def config_dict(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    d.pop("api_key", None)
    return d
