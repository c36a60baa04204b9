"""Python-level builder: everything of a Diff-CL run from plain arguments (no YAML needed).

``build_trainer(...)`` returns a ready ``DiffCLTrainer`` (attributes ``evaluator``, ``model_saver``,
``train_state_saver`` attached for convenience); ``train(...)`` builds, runs and closes it. The object graph is
the one the bundle configs mirror:

    datalists (diffcl_algo.data.build_datalists) -> IterationBatchDataset -> DataLoader(IterationSampler)
    CS = VNet(hfm_stages=(5,) if use_hfm else ()), DS = DiffusionSegNet, heads = ProjectionHead, bank
    two SGD optimizers (CS + CS head, DS + DS head) -> DiffCLTrainer
    SupervisedEvaluator(CS only, DiffCLSlidingWindowInferer, medpy metrics) <- ValidationHandler
    ModelSaver (model.pt), TrainStateSaver (train_state.pt), StatsHandler (train.log), TensorBoard, ProgressBar
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from ignite.handlers import ProgressBar
from monai.engines import SupervisedEvaluator
from monai.handlers import StatsHandler, TensorBoardStatsHandler, ValidationHandler, from_engine
from monai.transforms import AsDiscreted, Compose
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from diffcl_algo.checkpoint import ModelSaver, TrainStateSaver, unwrap
from diffcl_algo.checkpoint import resume as resume_from_file
from diffcl_algo.data.io import LIST_NAMES, build_datalists, detect_layout
from diffcl_algo.data.transforms import train_transforms, val_transforms
from diffcl_algo.diffusion import GaussianDiffusion
from diffcl_algo.engine import LOSS_KEYS, DiffCLTrainer, IterationBatchDataset, make_iteration_loader
from diffcl_algo.handlers import MedpyASD, MedpyDice, MedpyHD95, MedpyJaccard
from diffcl_algo.inference import DiffCLSlidingWindowInferer
from diffcl_algo.memory_bank import ClassMemoryBank
from diffcl_algo.networks.diffusion_seg import DiffusionSegNet
from diffcl_algo.networks.heads import ProjectionHead
from diffcl_algo.networks.vnet import VNet
from diffcl_algo.schedules import epoch_length as compute_epoch_length
from diffcl_algo.schedules import resolve_hyperparams

__all__ = ["init_distributed", "build_networks", "build_trainer", "train", "close_trainer"]

LOGGER_NAME = "diffcl_algo"


def init_distributed(device: str = "auto") -> tuple[torch.device, int, int]:
    """Initialise ``torch.distributed`` from torchrun's env vars (``WORLD_SIZE > 1``), else single process.

    Backend ``nccl`` on CUDA, ``gloo`` on CPU; the CUDA device is ``cuda:$LOCAL_RANK``.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        ``(device, rank, world_size)``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        return dev, dist.get_rank(), dist.get_world_size()
    return dev, 0, 1


def build_networks(
    num_classes: int = 2,
    in_channels: int = 1,
    n_filters: int = 16,
    norm: str = "batch",
    dropout: float = 0.0,
    use_hfm: bool = True,
    hfm_stages: Sequence[int] = (5,),
    hf: float = 0.7,
    head_dim: int = 64,
    time_embed_dim: int = 128,
) -> dict[str, torch.nn.Module]:
    """CS (``VNet``; HF-Mamba at ``hfm_stages`` when ``use_hfm``, none otherwise), DS, and the two heads.

    Returns:
        ``{"cs_network", "ds_network", "cs_head", "ds_head"}``.
    """
    cs = VNet(3, in_channels, num_classes, n_filters, norm, dropout, tuple(hfm_stages) if use_hfm else (), hf)
    ds = DiffusionSegNet(3, in_channels, num_classes, n_filters, norm, dropout, time_embed_dim)
    return {
        "cs_network": cs,
        "ds_network": ds,
        "cs_head": ProjectionHead(3, cs.feature_channels, head_dim),
        "ds_head": ProjectionHead(3, ds.feature_channels, head_dim),
    }


# MONAI's StatsHandler loggers do not propagate, so the log file is attached to each of them
LOG_NAMES = (LOGGER_NAME, f"{LOGGER_NAME}.train", f"{LOGGER_NAME}.val")


def _file_logger(output_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(output_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in LOG_NAMES:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)
    return handler


def build_trainer(
    dataset_dir: Optional[str],
    num_labeled: int,
    patch_size: Sequence[int] = (112, 112, 80),
    strides: Union[Sequence[int], int] = (18, 18, 4),
    n_filters: int = 16,
    max_iterations: int = 6000,
    val_interval: int = 200,
    output_dir: str = "./runs/diffcl",
    dataset: Optional[str] = None,
    datalist: Optional[str] = None,
    layout: Optional[str] = None,
    val_list: Optional[str] = None,
    num_classes: int = 2,
    use_cps: bool = True,
    use_hfm: bool = True,
    use_cl: bool = True,
    hfm_stages: Sequence[int] = (5,),
    seed: int = 0,
    resume: Union[bool, str, None] = None,
    device: str = "auto",
    labeled_batch_size: int = 2,
    unlabeled_batch_size: int = 2,
    num_workers: int = 0,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 3e-5,
    poly_lr_power: Optional[float] = None,
    ckpt_interval: int = 1000,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    norm: str = "batch",
    head_dim: int = 64,
    timesteps: int = 1000,
    noise_schedule: str = "cosine",
    cl_num_anchors: int = 64,
    cl_num_unlabeled: int = 4096,
    cl_top_k: int = 256,
    cl_tau: float = 0.1,
    bank_capacity: int = 2048,
    bank_samples_per_class: int = 256,
    t_max: float = 300.0,
    sw_batch_size: int = 1,
    spacing: Optional[Sequence[float]] = None,
    progress: bool = True,
    **hyperparams: Optional[float],
) -> DiffCLTrainer:
    """Build data, networks, optimizers, trainer, validation and all handlers from plain arguments.

    Args:
        dataset_dir: dataset root (h5 layouts of ``diffcl_algo.data``) or base of a JSON ``datalist``.
        num_labeled: the first ``num_labeled`` training cases keep their labels.
        patch_size: training patch and sliding-window size.
        strides: sliding-window strides of validation (the paper's per dataset).
        n_filters: V-Net width (paper 16).
        max_iterations: total training iterations.
        val_interval: validate every ``val_interval`` iterations (``<= 0``: never; ``model.pt`` = last weights).
        output_dir: ``model.pt``, ``train_state.pt``, ``train.log`` and TensorBoard events go here.
        dataset: Table 2 dataset name for the loss weights (``"LA"``, ``"Pancreas"``, ``"BraTS"``; None: defaults).
        datalist, layout, val_list: see ``diffcl_algo.data.build_datalists``; ``val_list`` defaults to the layout's
            second list (``test.list`` / BraTS ``val.txt``) or the JSON key ``"validation"``.
        num_classes: classes incl. background.
        use_cps, use_hfm, use_cl: ablation switches (Table 6).
        hfm_stages: CS encoder stages with HF-Mamba when ``use_hfm`` (default the deepest).
        seed: seed of initialisation and of every random choice of training.
        resume: True -> ``output_dir/train_state.pt``; a path -> that file; None/False -> fresh start.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        labeled_batch_size, unlabeled_batch_size: per-rank batch (paper 2 + 2).
        num_workers: data-loader processes.
        lr, momentum, weight_decay: SGD (paper 0.01, 0.9, 3e-5).
        poly_lr_power: None (paper: constant lr) or the field's poly decay power (0.9).
        ckpt_interval: iterations between ``train_state.pt`` saves.
        amp, amp_dtype: CUDA mixed precision.
        norm, head_dim, timesteps, noise_schedule: network / diffusion options.
        cl_num_anchors, cl_num_unlabeled, cl_top_k, cl_tau: ``p``, ``q``, ``k``, ``tau`` of eq. 11-15.
        bank_capacity, bank_samples_per_class: memory bank size and per-iteration enqueue per class.
        t_max: ramp length in epochs (paper 300).
        sw_batch_size: sliding-window batch of validation.
        spacing: voxel spacing for reading h5 files and for hd95/asd (None: voxel units).
        progress: show a tqdm progress bar.
        hyperparams: overrides of Table 2 (``mu1, mu2, beta1_c, beta2_c, lambda1, lambda2, eta, hf``).

    Returns:
        the trainer; ``trainer.evaluator`` (or None), ``trainer.model_saver``, ``trainer.train_state_saver``.
    """
    config = {k: v for k, v in locals().items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}
    config.update(hyperparams)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    dev, rank, world = init_distributed(device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    hp = resolve_hyperparams(dataset, num_labeled if dataset is not None else None, **hyperparams)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    # data
    labeled, unlabeled = build_datalists(dataset_dir, datalist=datalist, num_labeled=num_labeled, layout=layout)
    patch = tuple(int(p) for p in patch_size)
    train_ds = IterationBatchDataset(
        labeled,
        unlabeled,
        train_transforms(patch, spacing=spacing),
        train_transforms(patch, labeled=False, spacing=spacing),
        labeled_batch_size,
        unlabeled_batch_size,
        seed=seed,
        max_iterations=max_iterations,
        rank=rank,
        world_size=world,
    )
    loader = make_iteration_loader(train_ds, num_workers=num_workers, pin_memory=dev.type == "cuda")
    iters_per_epoch = compute_epoch_length(len(unlabeled), unlabeled_batch_size, world)

    # networks and optimizers
    nets = build_networks(num_classes, 1, n_filters, norm, 0.0, use_hfm, hfm_stages, hp.hf, head_dim)
    nets = {k: v.to(dev) for k, v in nets.items()}
    bank = ClassMemoryBank(num_classes, head_dim, bank_capacity).to(dev) if use_cl else None
    sgd = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    cs_opt = torch.optim.SGD([*nets["cs_network"].parameters(), *nets["cs_head"].parameters()], **sgd)
    ds_opt = torch.optim.SGD([*nets["ds_network"].parameters(), *nets["ds_head"].parameters()], **sgd)
    if world > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        for key in ("cs_network", "ds_network") + (("cs_head",) if use_cl else ()):
            nets[key] = DistributedDataParallel(nets[key], device_ids=ids)

    trainer = DiffCLTrainer(
        device=dev,
        max_iterations=max_iterations,
        train_data_loader=loader,
        cs_network=nets["cs_network"],
        ds_network=nets["ds_network"],
        cs_optimizer=cs_opt,
        ds_optimizer=ds_opt,
        epoch_length=iters_per_epoch,
        num_classes=num_classes,
        cs_head=nets["cs_head"],
        ds_head=nets["ds_head"],
        memory_bank=bank,
        diffusion=GaussianDiffusion(timesteps, noise_schedule),
        dataset=dataset,
        num_labeled=num_labeled if dataset is not None else None,
        t_max=t_max,
        use_cps=use_cps,
        use_cl=use_cl,
        cl_tau=cl_tau,
        cl_top_k=cl_top_k,
        cl_num_anchors=cl_num_anchors,
        cl_num_unlabeled=cl_num_unlabeled,
        bank_samples_per_class=bank_samples_per_class,
        poly_lr_power=poly_lr_power,
        seed=seed,
        amp=amp,
        amp_dtype=amp_dtype,
        **{k: v for k, v in hp.as_dict().items() if k != "hf"},
    )

    # validation (CS only), run on every rank over its share of the cases; metrics are gathered
    evaluator = None
    if val_interval > 0:
        layout_name = None if datalist is not None else (layout or detect_layout(dataset_dir))
        list_name = val_list or ("validation" if datalist is not None else LIST_NAMES.get(layout_name, ("", ""))[1])
        val_cases, _ = build_datalists(dataset_dir, datalist=datalist, list_name=list_name, layout=layout_name)
        val_cases = val_cases[rank::world]
        if not val_cases:
            raise ValueError(f"Rank {rank}/{world} gets no validation case of {list_name!r}: fewer cases than ranks.")
        val_loader = DataLoader(
            _ListDataset(val_cases, val_transforms(spacing=spacing)), batch_size=1, num_workers=num_workers
        )
        metric_io = from_engine(["pred", "label"])
        evaluator = SupervisedEvaluator(
            device=dev,
            val_data_loader=val_loader,
            network=unwrap(nets["cs_network"]),
            inferer=DiffCLSlidingWindowInferer(patch, strides, sw_batch_size=sw_batch_size),
            postprocessing=Compose([AsDiscreted(keys="pred", argmax=True)]),
            key_val_metric={"val_mean_dice": MedpyDice(output_transform=metric_io)},
            additional_metrics={
                "val_jaccard": MedpyJaccard(output_transform=metric_io),
                "val_hd95": MedpyHD95(spacing=spacing, output_transform=metric_io),
                "val_asd": MedpyASD(spacing=spacing, output_transform=metric_io),
            },
        )
        ValidationHandler(interval=val_interval, validator=evaluator, epoch_level=False).attach(trainer)

    model_saver = ModelSaver(nets["cs_network"], str(out))
    model_saver.attach(trainer, evaluator)
    state_saver = TrainStateSaver(str(out), ckpt_interval, model_saver=model_saver, config=config)
    state_saver.attach(trainer)  # after ValidationHandler: a save at a validation iteration includes its best
    trainer.evaluator, trainer.model_saver, trainer.train_state_saver = evaluator, model_saver, state_saver
    trainer.log_handler, trainer.summary_writer = None, None

    if rank == 0:  # observability
        from torch.utils.tensorboard import SummaryWriter

        writer = trainer.summary_writer = SummaryWriter(log_dir=str(out))
        StatsHandler(name=LOG_NAMES[1], output_transform=lambda o: o, epoch_log=False).attach(trainer)
        TensorBoardStatsHandler(writer, output_transform=lambda o: o, epoch_log=False).attach(trainer)
        TensorBoardStatsHandler(
            writer, output_transform=lambda _: trainer.learning_rates(), epoch_log=False
        ).attach(trainer)
        if evaluator is not None:
            step = lambda _: trainer.state.iteration  # noqa: E731
            StatsHandler(
                name=LOG_NAMES[2], output_transform=lambda _: None, iteration_log=False, global_epoch_transform=step
            ).attach(evaluator)
            TensorBoardStatsHandler(
                writer, output_transform=lambda _: None, iteration_log=False, global_epoch_transform=step
            ).attach(evaluator)
        trainer.log_handler = _file_logger(out)
        if progress:
            ProgressBar(persist=True).attach(trainer, output_transform=lambda o: {k: o[k] for k in LOSS_KEYS})

    if resume:
        path = out / "train_state.pt" if resume is True else Path(resume)
        resume_from_file(trainer, path, model_saver)
    return trainer


class _ListDataset(torch.utils.data.Dataset):
    """Transform-on-read list dataset (full validation volumes)."""

    def __init__(self, data: Sequence[dict], transform: Any) -> None:
        self.data, self.transform = list(data), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        return self.transform(dict(self.data[i]))


def close_trainer(trainer: DiffCLTrainer) -> None:
    """Close the TensorBoard writer and detach the log file of a ``build_trainer`` trainer."""
    if getattr(trainer, "summary_writer", None) is not None:
        trainer.summary_writer.close()
    if getattr(trainer, "log_handler", None) is not None:
        for name in LOG_NAMES:
            logging.getLogger(name).removeHandler(trainer.log_handler)
        trainer.log_handler.close()


def train(**kwargs: Any) -> dict[str, Any]:
    """``build_trainer(**kwargs)``, run to ``max_iterations``, close; returns a summary.

    Returns:
        ``{"iteration", "best_metric", "best_iteration", "model_path", "train_state_path", "output"}``.
    """
    trainer = build_trainer(**kwargs)
    try:
        trainer.run()
    finally:
        close_trainer(trainer)
    best = trainer.model_saver.best_metric
    return {
        "iteration": int(trainer.state.iteration),
        "best_metric": None if math.isinf(best) else best,
        "best_iteration": trainer.model_saver.best_iteration,
        "model_path": str(trainer.model_saver.path),
        "train_state_path": str(trainer.train_state_saver.path),
        "output": trainer.state.output,
    }
