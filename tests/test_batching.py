"""Batches: one bucket and one base resolution each, repeats honoured, deterministic, resumable mid-stream."""
import json
from collections import Counter
from dataclasses import dataclass

import pytest

from trainer.data.batching import BatchSampler, batches_per_epoch, epoch_batches
from trainer.errors import TrainingError


@dataclass
class S:
    bucket: tuple
    repeats: int = 1
    resolution: int = 512
    content_hash: str = ""


def samples():
    out = []
    for i in range(7):
        out.append(S((512, 512), repeats=3, content_hash=f"sq{i}"))
    for i in range(5):
        out.append(S((640, 384), repeats=1, content_hash=f"wide{i}"))
    out.append(S((384, 640), repeats=10, content_hash="tall"))
    for i in range(4):  # same bucket dims at another base resolution: must not share batches
        out.append(S((512, 512), repeats=1, resolution=768, content_hash=f"hi{i}"))
    return out


def test_every_sample_appears_repeats_times_per_epoch():
    data = samples()
    batches = epoch_batches(data, 4, seed=0, epoch=0)
    counts = Counter(i for b in batches for i in b)
    assert counts == Counter({i: s.repeats for i, s in enumerate(data)})


def test_batches_never_mix_buckets_or_resolutions_and_only_the_last_is_short():
    data = samples()
    for epoch in range(5):
        batches = epoch_batches(data, 4, seed=1, epoch=epoch)
        short = Counter()
        for b in batches:
            keys = {(data[i].resolution, data[i].bucket) for i in b}
            assert len(keys) == 1
            assert 1 <= len(b) <= 4
            if len(b) < 4:
                short[keys.pop()] += 1
        assert all(n == 1 for n in short.values())
        assert len(batches) == batches_per_epoch(data, 4)


def test_order_is_deterministic_from_seed_and_epoch():
    data = samples()
    assert epoch_batches(data, 3, 5, 2) == epoch_batches(data, 3, 5, 2)
    assert epoch_batches(data, 3, 5, 2) != epoch_batches(data, 3, 5, 3)
    assert epoch_batches(data, 3, 5, 2) != epoch_batches(data, 3, 6, 2)


def test_repeats_are_spread_so_one_image_rarely_fills_a_batch_twice():
    data = [S((512, 512), repeats=5, content_hash=str(i)) for i in range(8)]
    for epoch in range(10):
        for b in epoch_batches(data, 4, seed=0, epoch=epoch):
            assert len(set(b)) == len(b)  # 8 images, 4 per batch: rounds of 8 never put an image twice in one


def test_sampler_streams_epoch_after_epoch():
    data = samples()
    sampler = BatchSampler(data, 4, seed=3)
    per_epoch = sampler.batches_per_epoch
    stream = [next(sampler) for _ in range(per_epoch * 2 + 1)]
    assert stream[:per_epoch] == epoch_batches(data, 4, 3, 0)
    assert stream[per_epoch:2 * per_epoch] == epoch_batches(data, 4, 3, 1)
    assert stream[-1] == epoch_batches(data, 4, 3, 2)[0]
    assert sampler.epoch == 2 and sampler.position == 1


@pytest.mark.parametrize("stop_after", [0, 1, 7, 11, 22, 23])
def test_resumed_sampler_continues_with_exactly_the_same_batches(stop_after):
    data = samples()
    uninterrupted = BatchSampler(data, 4, seed=9)
    expected = [uninterrupted.next_batch() for _ in range(stop_after + 30)]
    first = BatchSampler(data, 4, seed=9)
    got = [first.next_batch() for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a state file
    resumed = BatchSampler(data, 4, seed=9)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(30)]
    assert got == expected and resumed.warning is None


def test_resume_with_a_changed_dataset_warns_or_raises():
    data = samples()
    sampler = BatchSampler(data, 4, seed=0)
    for _ in range(5):
        sampler.next_batch()
    state = sampler.state_dict()
    changed = BatchSampler(data[:-1], 4, seed=0)
    changed.load_state_dict(state)
    assert "dataset" in changed.warning and changed.position == 5
    changed.next_batch()
    with pytest.raises(TrainingError, match="batch size"):
        BatchSampler(data, 2, seed=0).load_state_dict(state, strict=True)
    with pytest.raises(TrainingError, match="damaged"):
        BatchSampler(data, 4).load_state_dict({"epoch": "x"})


def test_empty_dataset_and_bad_batch_size_are_clear_errors():
    with pytest.raises(TrainingError, match="no training samples"):
        BatchSampler([], 4)
    with pytest.raises(TrainingError, match="batch_size"):
        epoch_batches(samples(), 0, 0, 0)
