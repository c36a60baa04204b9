"""DDP on CPU: 2 gloo processes run 2 Diff-CL iterations (with validation); ranks agree on the weights and on
the memory bank (its enqueue is gathered across ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_settings import SMALL_TRAIN, handler_of

from diffcl_algo.convert.synthetic import make_synthetic_dataset

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, data_dir: str, out_dir: str, result_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from diffcl_algo.bundle.run import build_trainer
    from diffcl_algo.training.checkpoint import unwrap
    from diffcl_algo.training.handlers import GuardedValidationHandler

    trainer = build_trainer(dataset_dir=data_dir, max_iterations=2, val_interval=2, output_dir=out_dir, **SMALL_TRAIN)
    trainer.run()
    trainer.close()
    validator = handler_of(trainer, GuardedValidationHandler).validator
    result = {"val_mean_dice": torch.tensor(validator.state.metrics["val_mean_dice"])}
    cl = trainer.contrastive
    modules = {"cs_network": trainer.cs_network, "ds_network": trainer.ds_network, "cs_head": cl.cs_head,
               "ds_head": cl.ds_head}
    for name, module in modules.items():
        for k, p in unwrap(module).named_parameters():
            result[f"{name}.{k}"] = p.detach().clone()
    for k, b in cl.memory_bank.state_dict().items():
        result[f"bank.{k}"] = b.clone()
    result["image"] = next(iter(trainer.data_loader))["image"]  # each rank reads its own slice
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_agree(tmp_path):
    data_dir = str(make_synthetic_dataset(tmp_path / "la", num_cases=6, shape=(36, 34, 20), seed=0, num_test=2))
    mp.spawn(_worker, args=(_free_port(), data_dir, str(tmp_path / "out"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert not torch.equal(r0.pop("image"), r1.pop("image"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert int(r0["bank.count"].sum()) > 0
    assert (tmp_path / "out" / "model.pt").is_file() and (tmp_path / "out" / "train_state.pt").is_file()
