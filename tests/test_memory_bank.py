"""Tests of diffcl_algo.contrastive: FIFO order, capacity, sampling, state_dict round trip."""

from __future__ import annotations

import torch

from diffcl_algo.contrastive import ClassMemoryBank, all_gather_variable


def test_fifo_and_capacity():
    bank = ClassMemoryBank(num_classes=2, dim=3, capacity=4)
    f = torch.arange(18, dtype=torch.float32).reshape(6, 3)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    bank.enqueue(f, labels)
    assert bank.count.tolist() == [4, 1] and bank.ptr.tolist() == [0, 1]
    assert torch.equal(bank.features[0], f[[1, 2, 4, 5]])  # 5 class-0 rows > capacity: the newest 4 kept
    assert torch.equal(bank.features[1, 0], f[3])
    # two more class-0 rows overwrite the two oldest (FIFO)
    g = torch.full((2, 3), -1.0)
    bank.enqueue(g, torch.tensor([0, 0]))
    assert bank.count.tolist() == [4, 1] and bank.ptr.tolist() == [2, 1]
    assert torch.equal(bank.features[0], torch.stack([g[0], g[1], f[4], f[5]]))
    # more than capacity at once: only the newest survive
    h = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    bank.enqueue(h, torch.ones(10, dtype=torch.long))
    assert bank.count[1] == 4
    assert {tuple(r) for r in bank.features[1].tolist()} == {tuple(r) for r in h[-4:].tolist()}


def test_enqueue_detaches():
    bank = ClassMemoryBank(2, 2, 8)
    f = torch.randn(3, 2, requires_grad=True)
    bank.enqueue(f * 2, torch.tensor([0, 1, 1]))
    assert not bank.features.requires_grad


def test_sample():
    bank = ClassMemoryBank(3, 2, capacity=16)
    f = torch.randn(10, 2)
    bank.enqueue(f, torch.tensor([0] * 8 + [1] * 2))
    gen = torch.Generator().manual_seed(0)
    out = bank.sample(4, generator=gen)
    assert out[2] is None
    assert out[0].shape == (4, 2) and out[1].shape == (4, 2)
    rows = {tuple(r) for r in f[:8].tolist()}
    assert all(tuple(r) in rows for r in out[0].tolist())
    assert len({tuple(r) for r in out[0].tolist()}) == 4  # without replacement
    assert bank.sample(4, min_count=3)[1] is None  # too few entries
    again = bank.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out[0])  # deterministic in the generator


def test_state_dict_round_trip():
    bank = ClassMemoryBank(2, 4, capacity=8)
    bank.enqueue(torch.randn(11, 4), torch.randint(0, 2, (11,)))
    sd = bank.state_dict()
    assert set(sd) == {"features", "ptr", "count"}
    other = ClassMemoryBank(2, 4, capacity=8)
    other.load_state_dict(sd)
    for k in sd:
        assert torch.equal(getattr(other, k), getattr(bank, k))
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for a, b in zip(bank.sample(5, gen_a), other.sample(5, gen_b)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_all_gather_identity_without_distributed():
    x = torch.randn(3, 2)
    assert all_gather_variable(x) is x
