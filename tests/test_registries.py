"""Lazy registries (policies, engines, transports), their typed errors, and what importing loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from llumnix_py.engines.core import EngineConfig
from llumnix_py.engines.registry import ENGINES, EngineSpec, build_engine, engine_kinds, register_engine
from llumnix_py.errors import (LlumnixError, UnknownEngineError, UnknownNameError, UnknownPolicyError,
                               UnknownTransportError)
from llumnix_py.lazy_registry import LazyRegistry, check_callable, import_path
from migration.transports import check_transport_name, get_transport, transport_names


def run_clean(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object, which is returned."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_builtins_resolve_on_first_get():
    reg: LazyRegistry = LazyRegistry("demo", UnknownNameError, {"dumps": "json:dumps"}, check_callable)
    assert "dumps" in reg and reg.names() == ["dumps"] and len(reg) == 1
    assert reg.get("dumps") is json.dumps
    reg.register("dumps", json.dumps)  # the same object again is harmless
    with pytest.raises(ValueError, match="already registered"):
        reg.register("dumps", json.loads)
    broken: LazyRegistry = LazyRegistry("demo", UnknownNameError, {"x": "json:no_such_attribute"})
    with pytest.raises(AttributeError):
        broken.get("x")
    with pytest.raises(ValueError, match="import path"):
        import_path("json.dumps")


def test_unknown_names_raise_their_own_typed_errors():
    cases = [(lambda: EngineSpec(kind="warp-drive"), UnknownEngineError, "torch"),
             (lambda: build_engine(EngineSpec(kind="sim", sim_profile="abacus")), UnknownEngineError, "llama"),
             (lambda: get_transport("carrier-pigeon"), UnknownTransportError, "zmq"),
             (lambda: check_transport_name("carrier-pigeon"), UnknownTransportError, "inproc")]
    for make, error, known in cases:
        with pytest.raises(error, match=known) as info:
            make()
        assert isinstance(info.value, UnknownNameError) and isinstance(info.value, LlumnixError)
        assert not isinstance(info.value, UnknownPolicyError)
        assert isinstance(info.value, KeyError) and str(info.value).startswith("unknown")  # not quoted


def test_engine_registry_names_vllm_by_path_and_takes_plugins():
    assert {"torch", "sim", "vllm"} <= set(engine_kinds())
    from llumnix_py.engines.vllm import build_vllm_engine  # importable without vLLM

    assert ENGINES.get("vllm") is build_vllm_engine
    with pytest.raises(ValueError, match="already"):
        register_engine("torch", lambda spec: None)
    with pytest.raises(TypeError):
        register_engine("test-not-callable", 3)  # type: ignore[arg-type]
    name = "test-tiny-sim"
    if name not in ENGINES:
        register_engine(name, ENGINES.get("sim"))
    engine = build_engine(EngineSpec(kind=name, engine=EngineConfig(num_blocks=8, block_size=4)))
    assert engine.load().total_blocks == 8


def test_transport_names_are_known_without_importing_them():
    assert {"zmq", "gloo", "nccl", "inproc"} <= set(transport_names())
    check_transport_name("nccl")


def test_validating_names_imports_no_backend():
    got = run_clean("""
        import json, sys
        from policies.config import PolicyConfig
        PolicyConfig(dispatch="load", pairing="defrag", migrate_out="last", scaling="none")
        from llumnix_py.engines.registry import EngineSpec
        EngineSpec(kind="vllm")
        before = {m: m in sys.modules for m in ("policies.dispatch", "policies.pairing", "policies.selection",
                                                "policies.scaling", "llumnix_py.engines.vllm")}
        from policies.registry import DISPATCH
        by_load = DISPATCH.get("load")
        print(json.dumps({"before": before, "after": "policies.dispatch" in sys.modules,
                          "resolved": by_load.__module__ + "." + by_load.__name__}))
    """)
    assert not any(got["before"].values()), got
    assert got["after"] and got["resolved"] == "policies.dispatch.by_load"


def test_llumlet_and_configs_import_neither_zmq_nor_torch_distributed():
    """Building a llumlet's or a cluster's config validates the transport name without loading it.

    ``import torch`` itself loads part of ``torch.distributed`` (its data loader imports it), so
    the check is: nothing beyond what a bare ``import torch`` loads.
    """
    probe = """
        import json, sys
        {body}
        print(json.dumps({{"zmq": "zmq" in sys.modules,
                          "dist": sorted(m for m in sys.modules if m.startswith("torch.distributed")),
                          "transports": sorted(m for m in sys.modules if m.startswith("migration.transports."))}}))
    """
    bare = run_clean(probe.format(body="import torch"))
    got = run_clean(probe.format(body=textwrap.dedent("""
        import llumnix_py.llumlet
        from llumnix_py.config import ClusterConfig
        from llumnix_py.llumlet import LlumletConfig
        LlumletConfig(instance_id="a", transport="gloo")
        LlumletConfig(instance_id="b", transport="zmq")
        ClusterConfig()
    """).replace("\n", "\n        ")))
    assert got["zmq"] is False
    assert set(got["dist"]) <= set(bare["dist"]), set(got["dist"]) - set(bare["dist"])
    assert "migration.transports.registry" in got["transports"]
    assert not {"migration.transports.zmq_transport", "migration.transports.torch_dist"} & set(got["transports"])


def test_the_cli_the_llumlet_and_the_scheduler_start_without_torch():
    """``llumnix-py --help``, ``scheduler --status/--stop``, the scheduler daemon and a llumlet's
    module load no torch (about 2 s here): only an engine, a KV payload or a torch transport does.
    A message is still checked, and its payload size known, without it."""
    got = run_clean("""
        import json, sys
        import llumnix_py.cli, llumnix_py.llumlet, llumnix_py.scheduler.daemon, llumnix_py.runtime.ray_lifecycle
        from migration import wire
        msg = wire.decode_request({"type": "blocks", "migration_id": "m", "dst_block_ids": [1, 2],
                                   "dtype": "bfloat16", "shape": [2, 8]}, 32)
        print(json.dumps({"torch": "torch" in sys.modules, "bytes": msg.payload_nbytes}))
    """)
    assert got == {"torch": False, "bytes": 32}
    loaded = run_clean("""
        import json
        import torch
        from migration import wire
        print(json.dumps({"same": wire.torch_dtypes() == {n: getattr(torch, n) for n in wire.DTYPE_ITEMSIZE},
                          "sizes": all(getattr(torch, n).itemsize == k for n, k in wire.DTYPE_ITEMSIZE.items())}))
    """)
    assert loaded == {"same": True, "sizes": True}
