"""The demo's thread count: the idle cores, shared by a launcher's processes, at least 1 and at most 4; a user's
OMP_NUM_THREADS wins."""
from __future__ import annotations

import pytest
import torch

from trainer.demo import threads as T


@pytest.mark.parametrize("cpus, idle, processes, expected", [
    (16, 16.0, 1, 4),  # an idle big machine: more threads do not help a model this small
    (16, 1.2, 1, 1),  # a busy machine: the idle core only
    (2, 0.3, 1, 1),  # nothing idle: still one thread
    (2, 2.0, 1, 2),
    (8, 6.0, 2, 3),  # torchrun with two processes on this machine share the idle cores
    (4, 9.0, 1, 4),  # idle never counts more cores than there are
])
def test_the_idle_cores_shared_by_the_processes(cpus, idle, processes, expected):
    assert T.demo_threads(cpus=cpus, idle=idle, processes=processes) == expected


def test_local_world_size_is_the_number_of_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert T.demo_threads(cpus=8, idle=8.0) == 2


def test_the_machine_is_measured_and_omp_num_threads_wins(monkeypatch):
    assert 1 <= T.usable_cpus() and 0.0 <= T.idle_cpus(T.usable_cpus(), 0.05) <= T.usable_cpus()
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        said = []
        assert T.use_demo_threads(said.append) == 3 and said == []
        monkeypatch.delenv("OMP_NUM_THREADS")
        chosen = T.use_demo_threads(said.append)
        assert torch.get_num_threads() == chosen and 1 <= chosen <= T.MAX_DEMO_THREADS
        assert said and f"using {chosen} CPU thread(s)" in said[0]
    finally:
        torch.set_num_threads(before)
