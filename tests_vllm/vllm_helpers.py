"""Helpers shared by the vLLM tests (importable: ``tests_vllm`` is on ``sys.path``, see conftest)."""

from __future__ import annotations

from llumnix_py.engines.types import Request


def solo_tokens(engine, request: Request) -> list[int]:
    """Tokens of ``request`` run alone, unmigrated, on ``engine`` (which must be idle)."""
    engine.add_request(request)
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step().outputs:
            out.extend(o.new_token_ids)
    assert out, "empty reference: the comparison would prove nothing"
    return out
