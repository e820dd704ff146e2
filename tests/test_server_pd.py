"""Prefill/decode disaggregation over the OpenAI API: a server on 127.0.0.1 over a local
cluster of one prefill and one decode instance (``--pd 1:1``), the official openai client,
streaming and not; and the ``--pd`` flag's validation."""

from __future__ import annotations

import threading

import openai
import pytest

from llumnix_py.cli import build_parser, cluster_config, main
from llumnix_py.engines.types import SamplingParams
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.server import ServerThread, create_app
from tests.cluster_helpers import HoldOutputs, reference, small_spec, wait_for
from tests.test_pd_local import DECODE, PREFILL, pd_config

MODEL = "llumnix-tiny"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster.start(pd_config())
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(cluster):
    srv = ServerThread(create_app(cluster)).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_disaggregated_completion_has_the_greedy_tokens_of_a_colocated_run(server, cluster, stream):
    """The prefill instance is held after the request's first token; the scheduler hands it
    off (a live migration) and it finishes on the decode instance. The client sees exactly
    the tokens of a run on one engine, each once, in order."""
    prompt = "Hand me over to the decode pool"
    ids = cluster.tokenizer.encode(prompt)
    max_tokens = 32
    (expected,) = reference(small_spec(num_blocks=256), [tuple(ids)], max_tokens)
    before = cluster.state()["migrations"].get("finished", 0)
    emitted: list[tuple[str, int, int]] = []  # (instance, index, count) of each batch of this request
    inner = cluster.on_outputs

    def record(iid, outputs):
        emitted.extend((iid, o.index, len(o.new_token_ids)) for o in outputs)
        inner(iid, outputs)

    cluster.on_outputs = record  # type: ignore[method-assign]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    errors: list[BaseException] = []
    try:
        with HoldOutputs(cluster, PREFILL) as gate:
            gate.hold()

            def hand_off() -> None:
                try:
                    gate.wait_held()  # the first token is out; the prefill engine waits
                    wait_for(lambda: cluster.state()["migrations"].get("finished", 0) > before, what="the hand-off")
                except BaseException as exc:  # surfaced below
                    errors.append(exc)
                finally:
                    gate.release()

            helper = threading.Thread(target=hand_off)
            helper.start()
            body = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                        extra_body={"ignore_eos": True, "return_token_ids": True})
            if stream:
                got = []
                for chunk in client.completions.create(stream=True, **body):
                    for choice in chunk.choices:
                        got.extend(getattr(choice, "token_ids", None) or [])
            else:
                got = list(client.completions.create(**body).choices[0].token_ids)
            helper.join(60)
    finally:
        cluster.on_outputs = inner  # type: ignore[method-assign]
    assert not errors, errors
    assert got == expected
    assert emitted and emitted[0][0] == PREFILL and emitted[-1][0] == DECODE
    positions = [i for _, index, count in emitted for i in range(index, index + count)]
    assert positions == list(range(max_tokens))  # no gap, no duplicate across the hand-off
    roles = {i["instance_id"]: i["role"] for i in cluster.state()["instances"]}
    assert roles == {PREFILL: "prefill", DECODE: "decode"}


def test_the_pd_flag_builds_roles_and_bad_ratios_are_usage_errors(capsys):
    cfg = cluster_config(build_parser().parse_args(["serve", "--runtime", "local", "--instances", "4",
                                                    "--pd", "1:3"]))
    assert cfg.scheduler.pd_ratio == (1, 3)
    for flags, message in ((["--pd", "0:2"], "at least one prefill and one decode"),
                           (["--pd", "x"], "two integers"),
                           (["--pd", "1:3", "--instances", "2"], "needs at least 4 instances")):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--runtime", "local", *flags])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_the_roles_flag_builds_per_instance_roles_and_bad_lists_are_usage_errors(capsys):
    cfg = cluster_config(build_parser().parse_args(["serve", "--runtime", "local", "--roles", "prefill,decode,decode"]))
    assert cfg.num_instances == 3  # one per listed role
    assert [r.value for r in cfg.scheduler.roles] == ["prefill", "decode", "decode"]
    assert cfg.scheduler.pd_ratio is None
    for flags, message in ((["--roles", "prefill,decoder"], "unknown instance role 'decoder'"),
                           (["--roles", "decode,decode"], "no instance takes new requests"),
                           (["--roles", "prefill,prefill"], "list at least one 'decode'"),
                           (["--roles", "prefill,decode", "--instances", "3"], "2 roles listed"),
                           (["--roles", "prefill,decode", "--pd", "1:1"], "not both")):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--runtime", "local", *flags])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_per_instance_roles_serve_and_show_in_the_cluster_state():
    """``roles=decode,prefill`` in the Python API: the second instance takes every request and
    hands it to the first; ``/v1/cluster/state`` shows the roles."""
    import dataclasses

    import httpx

    base = pd_config()
    cfg = dataclasses.replace(base, scheduler=dataclasses.replace(base.scheduler, pd_ratio=None,
                                                                  roles="decode,prefill"))
    c = Cluster.start(cfg)
    try:
        srv = ServerThread(create_app(c)).start()
        try:
            roles = {i["instance_id"]: i["role"] for i in httpx.get(srv.url + "/v1/cluster/state").json()["instances"]}
            assert roles == {"instance-000": "decode", "instance-001": "prefill"}
            ids = tuple(c.tokenizer.encode("Per-instance roles"))
            (expected,) = reference(small_spec(num_blocks=256), [ids], 48)
            handle = c.submit(ids, SamplingParams(max_tokens=48, ignore_eos=True))
            assert handle.instance_id == "instance-001"
            assert handle.result(timeout=120) == expected
        finally:
            srv.stop()
    finally:
        c.stop()
