"""Python entry point to the bundles' training graph: ``build_trainer`` / ``train`` from plain arguments.

There is one object graph, ``bundles/base/configs/train.yaml`` (MONAI bundle config):

    datalists (diffcl_algo.data.build_datalists, data#check) -> IterationBatchDataset -> DataLoader(IterationSampler)
    CS = VNet(hfm_stages=(5,) if use_hfm else ()), DS = DiffusionSegNet, heads = ProjectionHead, bank
    two SGD optimizers (CS + CS head, DS + DS head) -> DiffCLTrainer
    SupervisedEvaluator(CS only, DiffCLSlidingWindowInferer, medpy metrics) <- ValidationHandler
    ModelSaver (model.pt), TrainStateSaver (train_state.pt), StatsHandler (train.log), TensorBoard,
    IterationProgressBar (over max_iterations)

``build_trainer(...)`` turns its arguments into config overrides of that file and instantiates ``train#setup``
(:func:`setup_trainer`: the trainer with its checkpoint, logging and resume handlers attached); ``train(...)``
builds, runs and closes it. The dataset bundles (``bundles/<dataset>/configs``) use the same file through macros.
:func:`build_networks` (CS, DS, heads from plain arguments) serves benchmarks that need the networks alone.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.bundle.utils import ID_SEP_KEY

from diffcl_algo.checkpoint import ModelSaver, TrainStateSaver
from diffcl_algo.checkpoint import resume as resume_training
from diffcl_algo.engine import LOSS_KEYS, DiffCLTrainer
from diffcl_algo.networks.diffusion_seg import DiffusionSegNet
from diffcl_algo.networks.heads import ProjectionHead
from diffcl_algo.networks.vnet import VNet
from diffcl_algo.progress import IterationProgressBar
from diffcl_algo.schedules import DiffCLHyperParams

__all__ = [
    "attach_file_logger",
    "check_settings",
    "build_networks",
    "build_trainer",
    "close_trainer",
    "config_error_cause",
    "detach_file_logger",
    "find_bundles",
    "init_distributed",
    "resume_path",
    "setup_trainer",
    "train",
]

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
_FILE_HANDLERS: dict[str, logging.Handler] = {}


def attach_file_logger(output_dir: Union[str, os.PathLike]) -> logging.Handler:
    """Append the ``LOG_NAMES`` loggers (INFO) to ``<output_dir>/train.log``; returns the file handler."""
    key = str(Path(output_dir).resolve())
    detach_file_logger(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(output_dir) / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in LOG_NAMES:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)
    _FILE_HANDLERS[key] = handler
    return handler


def detach_file_logger(output_dir: Union[str, os.PathLike]) -> None:
    """Remove and close the ``train.log`` handler of ``output_dir`` (no-op when none is attached)."""
    handler = _FILE_HANDLERS.pop(str(Path(output_dir).resolve()), None)
    if handler is not None:
        for name in LOG_NAMES:
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def resume_path(resume: Union[bool, str, os.PathLike, None], default: Union[str, os.PathLike]) -> Optional[Path]:
    """The ``train_state.pt`` to resume from: ``default`` for true-ish values, None for false-ish, else ``resume``.

    Accepts the strings a command line gives (``"true"``, ``"false"``, ``"1"``, ``"0"``, ...) as well as booleans.
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        return Path(default)
    text = str(resume).strip()
    if text.lower() in ("1", "true", "yes", "on"):
        return Path(default)
    if text.lower() in ("", "0", "false", "no", "off", "none", "null"):
        return None
    return Path(text)


def setup_trainer(
    trainer: DiffCLTrainer,
    output_dir: Union[str, os.PathLike],
    model_saver: ModelSaver,
    train_state_saver: TrainStateSaver,
    evaluator: Optional[Engine] = None,
    handlers: Sequence[Any] = (),
    val_handlers: Sequence[Any] = (),
    summary_writer: Any = None,
    progress: bool = False,
    resume: Union[bool, str, os.PathLike, None] = None,
    train_state_path: Union[str, os.PathLike, None] = None,
) -> DiffCLTrainer:
    """Finish a trainer built by the bundle config (``train#setup`` of ``bundles/base/configs/train.yaml``).

    Attaches, in this order (after the trainer's own handlers, so the ``ValidationHandler`` runs first):
    ``model_saver`` (best ``model.pt`` per ``evaluator``'s key metric, or the last weights), ``train_state_saver``,
    ``handlers`` (trainer handlers that refer to the trainer, e.g. the learning-rate TensorBoard logger),
    ``val_handlers`` to the evaluator (validation loggers indexed by the trainer iteration), the ``train.log`` file
    and a progress bar (both on rank 0), then resumes from ``train_state.pt`` when asked.

    Args:
        trainer: the ``DiffCLTrainer``.
        output_dir: run directory (created): ``train.log``.
        model_saver, train_state_saver: checkpoint handlers (``diffcl_algo.checkpoint``).
        evaluator: the validation evaluator, None without validation.
        handlers: extra trainer handlers (``attach(trainer)``).
        val_handlers: extra evaluator handlers (``attach(evaluator)``), ignored without an evaluator.
        summary_writer: the TensorBoard writer shared by the handlers (closed by :func:`close_trainer`).
        progress: tqdm progress bar of the loss terms.
        resume: see :func:`resume_path` (``True``: ``train_state_path``).
        train_state_path: default file to resume from.

    Returns:
        ``trainer`` with attributes ``evaluator``, ``model_saver``, ``train_state_saver``, ``summary_writer``,
        ``output_dir`` and ``log_handler`` (rank 0, else None).
    """
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    model_saver.attach(trainer, evaluator)
    train_state_saver.attach(trainer)
    for handler in handlers:
        handler.attach(trainer)
    for handler in val_handlers if evaluator is not None else ():
        handler.attach(evaluator)
    trainer.log_handler = attach_file_logger(output_dir) if main else None
    if progress and main:
        IterationProgressBar(trainer.max_iterations, LOSS_KEYS).attach(trainer)
    trainer.evaluator, trainer.model_saver, trainer.train_state_saver = evaluator, model_saver, train_state_saver
    trainer.summary_writer, trainer.output_dir = summary_writer, str(output_dir)
    path = resume_path(resume, train_state_path or Path(output_dir) / "train_state.pt")
    if path is not None:
        resume_training(trainer, path, model_saver)
    return trainer


def find_bundles(bundles_dir: Union[str, os.PathLike, None] = None) -> Path:
    """The repository's ``bundles/`` folder: ``bundles_dir`` if given, else ``$DIFFCL_BUNDLES``, else
    ``<package>/../bundles`` (source checkout or editable install).

    Raises:
        FileNotFoundError: the chosen folder has no ``base/configs/train.yaml`` (the message names it).
    """
    if bundles_dir is not None:
        path, source = Path(bundles_dir), "bundles_dir"
    elif os.environ.get("DIFFCL_BUNDLES"):
        path, source = Path(os.environ["DIFFCL_BUNDLES"]), "$DIFFCL_BUNDLES"
    else:
        path, source = Path(__file__).resolve().parents[1] / "bundles", "the folder next to the diffcl_algo package"
    path = path.resolve()
    if not (path / "base" / "configs" / "train.yaml").is_file():
        raise FileNotFoundError(
            f"The MONAI bundles were not found: {path} ({source}) has no base/configs/train.yaml. They live in the "
            "repository's bundles/ folder: use a source checkout (pip install -e .), or pass bundles_dir / set "
            "DIFFCL_BUNDLES to that folder."
        )
    return path


def check_settings(patch_size: Sequence[int], val_interval: int, factor: int = 16) -> None:
    """Refuse settings that would fail later or silently mean something else (run before any data is read).

    Args:
        patch_size: training patch; every axis must be divisible by ``factor`` (the V-Net halves it 4 times).
        val_interval: iterations between validations; 0 means never, a negative value is an error.
        factor: the network's total downsampling factor.

    Raises:
        ValueError: naming the setting and the rule it breaks.
    """
    if int(val_interval) < 0:
        raise ValueError(f"val_interval must be >= 0 (0: never validate), got {val_interval}.")
    if any(int(p) < factor or int(p) % factor for p in patch_size):
        raise ValueError(
            f"patch_size {tuple(int(p) for p in patch_size)} must be divisible by {factor} (and >= {factor}) on "
            f"every axis: the V-Net downsamples {factor.bit_length() - 1} times by 2."
        )


def build_trainer(
    dataset_dir: Optional[str],
    num_labeled: int,
    patch_size: Sequence[int] = (112, 112, 80),
    strides: Union[Sequence[int], int] = (18, 18, 4),
    n_filters: int = 16,
    max_iterations: int = 6000,
    val_interval: int = 200,
    val_error: str = "raise",
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
    unsup_ramp: bool = False,
    sup_loss: str = "paper",
    residual: bool = True,
    dropout: float = 0.0,
    normalize_intensity: bool = False,
    monitor_pseudo_labels: bool = False,
    channels_last: bool = False,
    ds_pseudo_steps: int = 0,
    sw_batch_size: int = 1,
    spacing: Optional[Sequence[float]] = None,
    progress: bool = True,
    bundles_dir: Optional[str] = None,
    **hyperparams: Optional[float],
) -> DiffCLTrainer:
    """Build the training graph of ``bundles/base/configs/train.yaml`` from plain arguments (one graph, no copy).

    The arguments become config overrides (``dataset`` -> ``dataset_name``,
    ``device`` -> the device picked by :func:`init_distributed`); under ``torchrun`` (``WORLD_SIZE > 1``)
    ``bundles/base/configs/multi_gpu_train.yaml`` is merged on top, as for the bundles. The config's
    ``initialize`` expressions run (seeding), then ``train#setup`` is instantiated: the trainer with every handler
    attached, not yet run. The data are checked first (``data#check``: every case is read once).

    Args:
        dataset_dir: dataset root (h5 layouts of ``diffcl_algo.data``) or base of a JSON ``datalist``.
        num_labeled: the first ``num_labeled`` training cases keep their labels.
        patch_size: training patch and sliding-window size.
        strides: sliding-window strides of validation (the paper's per dataset).
        n_filters: V-Net width (paper 16).
        max_iterations: total training iterations.
        val_interval: validate every ``val_interval`` iterations (0: never, ``model.pt`` = last weights; < 0: error).
        val_error: a validation round that raises: ``"raise"`` stops training, ``"continue"`` logs it and skips the
            round (``diffcl_algo.engine.GuardedValidationHandler``).
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
        unsup_ramp: also ramp the unsupervised weights (``DiffCLTrainer``'s ``unsup_ramp``).
        sup_loss: supervised loss form, ``"paper"`` or ``"field"`` (``DiffCLTrainer``'s ``sup_loss``).
        residual, dropout: CS V-Net options (``VNet``).
        normalize_intensity: z-score each image volume in training and validation.
        monitor_pseudo_labels: log the pseudo-labels' Dice against the unlabeled cases' hidden labels.
        channels_last: train the CS and DS V-Nets in channels-last (``torch.channels_last_3d``) memory order.
        ds_pseudo_steps: DS pseudo-labels from this step's output (0) or from k DDIM steps from noise.
        sw_batch_size: sliding-window batch of validation.
        spacing: voxel spacing for reading h5 files and for hd95/asd (None: voxel units).
        progress: show a tqdm progress bar.
        bundles_dir: the repository's ``bundles/`` folder (see :func:`find_bundles`).
        hyperparams: overrides of Table 2 (``mu1, mu2, beta1_c, beta2_c, lambda1, lambda2, eta, hf``).

    Returns:
        the trainer; ``trainer.evaluator`` (or None), ``trainer.model_saver``, ``trainer.train_state_saver``.
    """
    config = {k: v for k, v in locals().items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}
    config.update(hyperparams)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    unknown = set(hyperparams) - set(DiffCLHyperParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"build_trainer got unknown argument(s) {sorted(unknown)}.")
    dev, _, world = init_distributed(device)
    base = find_bundles(bundles_dir) / "base" / "configs"
    overrides = dict(
        dataset_dir=None if dataset_dir is None else str(dataset_dir),
        num_labeled=num_labeled,
        patch_size=[int(p) for p in patch_size],
        strides=strides if isinstance(strides, int) else [int(s) for s in strides],
        n_filters=n_filters,
        max_iterations=max_iterations,
        val_interval=val_interval,
        val_error=val_error,
        output_dir=str(output_dir),
        dataset_name=dataset,
        datalist=None if datalist is None else str(datalist),
        layout=layout,
        val_list=val_list,
        num_classes=num_classes,
        use_cps=bool(use_cps),
        use_hfm=bool(use_hfm),
        use_cl=bool(use_cl),
        hfm_stages=[int(s) for s in hfm_stages],
        seed=seed,
        resume=False if resume is None else (resume if isinstance(resume, bool) else str(resume)),
        device=dev,
        labeled_batch_size=labeled_batch_size,
        unlabeled_batch_size=unlabeled_batch_size,
        num_workers=num_workers,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        poly_lr_power=poly_lr_power,
        ckpt_interval=ckpt_interval,
        amp=bool(amp),
        amp_dtype=amp_dtype,
        norm=norm,
        head_dim=head_dim,
        timesteps=timesteps,
        noise_schedule=noise_schedule,
        cl_num_anchors=cl_num_anchors,
        cl_num_unlabeled=cl_num_unlabeled,
        cl_top_k=cl_top_k,
        cl_tau=cl_tau,
        bank_capacity=bank_capacity,
        bank_samples_per_class=bank_samples_per_class,
        t_max=t_max,
        unsup_ramp=bool(unsup_ramp),
        sup_loss=sup_loss,
        residual=bool(residual),
        dropout=float(dropout),
        normalize_intensity=bool(normalize_intensity),
        monitor_pseudo_labels=bool(monitor_pseudo_labels),
        channels_last=bool(channels_last),
        ds_pseudo_steps=int(ds_pseudo_steps),
        sw_batch_size=sw_batch_size,
        spacing=None if spacing is None else [float(s) for s in spacing],
        progress=bool(progress),
        **hyperparams,
    )
    overrides["train#train_state_saver#config"] = config
    files = [str(base / "train.yaml")] + ([str(base / "multi_gpu_train.yaml")] if world > 1 else [])
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    parser.parse()
    try:
        for i in range(len(parser["initialize"])):
            parser.get_parsed_content(f"initialize{ID_SEP_KEY}{i}")
        parser.get_parsed_content("data#check")
        return parser.get_parsed_content("train#setup")
    except RuntimeError as e:
        raise config_error_cause(e) from None


def config_error_cause(error: BaseException) -> BaseException:
    """The exception a MONAI config wrapped (``"Failed to instantiate ..."`` / ``"Failed to evaluate ..."``).

    MONAI re-raises every error of a config item as a ``RuntimeError`` naming the item; this follows
    ``__cause__`` through those wrappers to the original error (e.g. the ``DataError`` naming a missing file).
    """
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith(("Failed to instantiate", "Failed to evaluate"))
        and error.__cause__ is not None
    ):
        error = error.__cause__
    return error


def close_trainer(trainer: DiffCLTrainer) -> None:
    """Close the TensorBoard writer and detach the log file of a trainer from :func:`setup_trainer`."""
    if getattr(trainer, "summary_writer", None) is not None:
        trainer.summary_writer.close()
    if getattr(trainer, "output_dir", None) is not None:
        detach_file_logger(trainer.output_dir)


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
