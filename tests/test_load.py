"""The load snapshots: keyword-only construction, derived counts, the not-yet-admitted factory."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from llumnix_py.load import InstanceLoad, RequestLoad


def test_snapshots_are_built_by_keyword_only():
    with pytest.raises(TypeError):
        RequestLoad("r", 0, 1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        InstanceLoad("i", 10, 2)  # type: ignore[misc]


def test_a_queued_request_holds_no_blocks_and_needs_its_prompt_and_outputs():
    r = RequestLoad.queued("r", prompt_len=33, block_size=16, priority=1, arrival_time=2.5)
    assert (r.num_blocks, r.blocks_needed, r.prompt_len, r.output_len) == (0, 3, 33, 0)
    assert (r.priority, r.arrival_time, r.num_preemptions, r.migrating) == (1, 2.5, 0, False)
    resumed = RequestLoad.queued("r", prompt_len=33, block_size=16, output_len=15)
    assert resumed.blocks_needed == 3 and resumed.output_len == 15
    assert RequestLoad.queued("r", prompt_len=33, block_size=16, output_len=16).blocks_needed == 4


def test_free_blocks_and_queue_length_are_derived():
    queued = RequestLoad.queued("w", prompt_len=16, block_size=16)
    inst = InstanceLoad(total_blocks=100, used_blocks=30, waiting=(queued,))
    assert inst.free_blocks == 70 and inst.num_waiting == 1 and inst.num_running == 0
    seen = dataclasses.replace(inst, instance_id="i0", pending_dispatch=(queued,))
    assert seen.num_waiting == 2 and seen.free_blocks == 70


def test_the_load_module_imports_nothing_of_the_project():
    code = "import sys, llumnix_py.load; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('llumnix_py', 'policies', 'migration', 'torch', 'zmq')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['llumnix_py', 'llumnix_py.load']"


def test_the_scheduler_core_and_the_policies_load_without_the_engines():
    code = "import sys, llumnix_py.scheduler.core, policies.dispatch, policies.pairing; " \
           "print([m for m in sys.modules if m.startswith('llumnix_py.engines')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
