"""Leftovers of earlier splits stay gone: real logger names, no compatibility aliases."""

from __future__ import annotations

import importlib
import logging

import pytest


@pytest.mark.parametrize("module", ["llumnix_py.frontend.supervision", "llumnix_py.frontend.receiver",
                                    "llumnix_py.server.app", "llumnix_py.server.errors", "llumnix_py.server.frontend",
                                    "llumnix_py.server.generation", "migration.security"])
def test_module_loggers_are_named_after_their_module(module):
    mod = importlib.import_module(module)
    assert isinstance(mod.log, logging.Logger) and mod.log.name == module


def test_server_app_does_not_re_export_its_helpers():
    app = importlib.import_module("llumnix_py.server.app")
    gone = ["_Frontend", "_short", "_validation_error", "_finite_float", "_reject_constant", "DEFAULT_MAX_TOKENS",
            "GREEDY_BELOW", "_EventStream", "_kv_capacity_tokens", "_sse", "_wait_for_disconnect", "Metrics"]
    assert [name for name in gone if hasattr(app, name)] == []
