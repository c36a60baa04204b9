"""Diff-CL training engine: ``DiffCLTrainer``, Algorithm 1 of the paper (plus a mean teacher) as a MONAI ``Trainer``.

Its iteration (eq. 5-9, 11-22) fires the standard ignite / MONAI events, so stock MONAI handlers (StatsHandler,
TensorBoardStatsHandler, ValidationHandler, CheckpointSaver) attach to it. It reads the batches of
``diffcl_algo.data.iteration`` (one item per iteration, a pure function of ``(seed, iteration)``), and every other
random choice of an iteration (timesteps, noise, memory-bank sampling, unlabeled-feature sampling, dropout) is drawn
from generators seeded by ``(seed, iteration, rank)``. Resuming therefore needs only the iteration counter plus the
model / optimizer / memory-bank state (``train_state()`` / ``load_train_state()``).

A variant is a subclass that overrides a hook (nnU-Net's trainer variants): :meth:`DiffCLTrainer.supervised_loss`,
:meth:`~DiffCLTrainer.cs_pseudo_labels`, :meth:`~DiffCLTrainer.noised_labels`, :meth:`~DiffCLTrainer.ds_pseudo_labels`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from torch import nn
from torch.optim.swa_utils import AveragedModel

from diffcl_algo.contrastive import ContrastiveLabelPropagation
from diffcl_algo.data.iteration import IterationSampler
from diffcl_algo.diffusion import GaussianDiffusion
from diffcl_algo.losses import DiceCELoss, class_argmax
from diffcl_algo.schedules import DEFAULT_HYPERPARAMS, DiffCLHyperParams, continuous_epoch, gaussian_ramp
from diffcl_algo.training.checkpoint import unwrap
from diffcl_algo.training.handlers import RunLog
from diffcl_algo.utils import SeedStream, derive_seed, rank_world

__all__ = ["AMP_DTYPES", "LOSS_KEYS", "OUTPUT_KEYS", "DiffCLTrainer"]

#: Loss terms of the engine output (``engine.state.output``), each a Python float.
LOSS_KEYS = (
    "loss_sup_cs",
    "loss_sup_ds",
    "loss_cps_cs",
    "loss_cps_ds",
    "loss_cl",
    "ramp",
    "loss_cs",
    "loss_ds",
    "loss",
)
#: Keys of the engine output: the loss terms and the learning rates of the iteration (first parameter group).
OUTPUT_KEYS = (*LOSS_KEYS, "lr_cs", "lr_ds")
#: ``DiffCLTrainer(amp=...)`` precisions on CUDA (``True`` is bfloat16).
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class DiffCLTrainer(Trainer):
    """Diff-CL semi-supervised trainer: Algorithm 1, one call of ``_iteration`` per line-2 loop step.

    Per iteration ``i`` (0-based; ``engine.state.iteration = i + 1`` during it), with ``b_l`` labeled and
    ``b_u`` unlabeled images in ``batch["image"]`` (labeled first) and labels ``batch["label"]``:

    1. CS forward on all images -> logits ``P^`` and CS decoder features (Alg. 1 line 4).
    2. ``Y^u``, the CS pseudo-labels (:meth:`cs_pseudo_labels`: the mean teacher's, or the CS's own without one);
       ``Y_0`` = one-hot ``y^l`` / one-hot ``Y^u`` (line 5).
    3. ``t ~ U{1..T}``, ``Y_t = q_sample(Y_0, t, eps)`` (eq. 5, line 6, :meth:`noised_labels`); DS forward
       ``(x, Y_t, t)`` -> ``P~`` and DS features (line 7).
    4. ``L_s^c = D(P^l, y) + beta2 E`` (eq. 19), ``L_s^d = D(P~l, y) + beta1 E`` (eq. 18),
       ``beta = beta_c * lambda(t)`` with ``lambda`` the Gaussian ramp of the continuous epoch ``i / epoch_length``
       (:meth:`supervised_loss`).
    5. ``L_p^c = D(P^u, argmax P~u) + lambda2 E`` (eq. 7), ``L_p^d = D(P~u, argmax P^u) + lambda1 E`` (eq. 6).
    6. ``L_cl`` (eq. 11-15) with its memory-bank update: :class:`~diffcl_algo.contrastive.ContrastiveLabelPropagation`
       on the DS logits / features of the labeled images and the CS features of the unlabeled ones. ``L_cl`` enters
       only the CS loss (eq. 17, 22).
    7. ``L^d = L_s^d + mu1 L_p^d`` (eq. 16); ``L^c = L_s^c + mu2 (L_p^c + eta L_cl)`` (eq. 17, 22).
    8. ``(L^c + L^d).backward()`` (the two losses share no parameters: pseudo-labels and ``Y_0`` are detached),
       then the CS optimizer and the DS optimizer step (lines 14-15), then the mean teacher's update.

    Ablation switches (paper Table 6): ``use_cps=False`` -> ``L_p^c = L_p^d = 0`` exactly and the unlabeled
    images skip the DS (and, without ``contrastive``, the CS); ``contrastive=None`` -> ``L_cl = 0``; HF-Mamba on/off
    is a property of the CS network (``hfm_stages``), chosen by the builder. With neither ``use_cps`` nor
    ``contrastive`` (the supervised-only row) nothing reaches the CS from the DS, so the DS is not run at all: the row
    costs one V-Net on the labeled images (``loss_sup_ds = 0``, the DS keeps its initial weights).

    Output (``engine.state.output``): ``{key: float}`` for every key of ``OUTPUT_KEYS``. With cross
    pseudo-supervision, ``engine.state.pseudo_labels`` holds this iteration's ``(Y^u, Y~u)`` (b_u, 1, *S) for
    handlers such as :class:`~diffcl_algo.training.handlers.PseudoLabelMonitor` (None otherwise).

    Outputs and logs are handlers (``train_handlers``, the bundle's ``train#handlers``): validation
    (``GuardedValidationHandler``), ``model.pt`` / ``train_state.pt`` (:mod:`diffcl_algo.training.checkpoint`,
    resuming included), console / TensorBoard / ``train.log`` lines and the progress bar
    (:mod:`diffcl_algo.training.handlers`).

    Args:
        device: training device.
        max_iterations: total iterations (ignite ``max_iters``).
        train_data_loader: yields ``IterationBatchDataset`` items; with an ``IterationSampler`` it is restarted
            at the resumed iteration. Each batch's ``"iteration"`` must equal the engine's iteration.
        epoch_length: iterations per epoch (``schedules.epoch_length``: one pass over the unlabeled cases).
        cs_network: CS net, ``cs_network(x, return_features=True) -> (logits, features)`` (``VNet``).
        ds_network: DS net, ``ds_network(x, y_t, t, return_features=True) -> (logits, features)``
            (``DiffusionSegNet``).
        cs_optimizer: optimizer of the CS network (and CS projection head).
        ds_optimizer: optimizer of the DS network (and DS projection head).
        num_classes: classes incl. background.
        diffusion: ``GaussianDiffusion``; default ``GaussianDiffusion(1000, "cosine")``.
        contrastive: the contrastive label propagation term (eq. 11-15) with its heads and memory bank; None: no
            ``L_cl`` (Table 6's rows without it).
        hyperparams: the loss weights, resolved once (``schedules.resolve_hyperparams``: the Table 2 row of
            ``dataset_name`` / ``num_labeled`` with any overrides); default ``schedules.DEFAULT_HYPERPARAMS``.
        t_max: length (epochs) of the Gaussian ramp ``lambda(t) = 2 exp(-5 (1 - t / t_max)^2)``.
        unsup_ramp: also warm up the unsupervised terms: ``mu1`` and ``mu2`` (eq. 16-17) are multiplied by
            ``lambda(t) / 2`` (from ``exp(-5)`` to 1), the usual consistency ramp-up of the field (UA-MT, CPS). False:
            the paper as printed (Table 2 ramps only the supervised CE weights). See docs/training.md.
        use_cps: cross pseudo-supervision (eq. 6-7); False: ``L_p^c = L_p^d = 0``.
        cs_ema: None (the paper) or an exponential moving average of the CS weights
            (``torch.optim.swa_utils.AveragedModel`` of :func:`~diffcl_algo.training.ema.weight_ema`; not in the
            paper), updated from the CS after each optimizer step. It is the mean teacher that makes the CS
            pseudo-labels ``Y^u`` (in train mode, as UA-MT and BCP run their teachers); the bundle (``ema_decay``)
            validates it and saves it as ``model.pt``; it is stored in ``train_state.pt``.
        seed: base seed of every random choice.
        amp: mixed precision on CUDA (``torch.autocast``): False, True (bfloat16) or a key of :data:`AMP_DTYPES`
            (float16 adds a ``GradScaler``); ignored with a warning on CPU.
        train_handlers: ignite handlers attached in order at the end of construction (a ``TrainStateLoader`` among
            them resumes the run there).
        max_epochs: optional, for MONAI bundle property checks (``train#trainer#max_epochs``); must equal
            ``ceil(max_iterations / epoch_length)``, the value always used (training length is ``max_iterations``).
    """

    #: peak of the Gaussian ramp ``lambda(t)`` (Table 2's beta_c are per unit of it)
    RAMP_PEAK = 2.0

    def __init__(
        self,
        device: Union[str, torch.device],
        max_iterations: int,
        train_data_loader: Iterable,
        epoch_length: int,
        cs_network: nn.Module,
        ds_network: nn.Module,
        cs_optimizer: torch.optim.Optimizer,
        ds_optimizer: torch.optim.Optimizer,
        num_classes: int = 2,
        diffusion: Optional[GaussianDiffusion] = None,
        contrastive: Optional[ContrastiveLabelPropagation] = None,
        hyperparams: Optional[DiffCLHyperParams] = None,
        t_max: float = 300.0,
        unsup_ramp: bool = False,
        use_cps: bool = True,
        cs_ema: Optional[AveragedModel] = None,
        seed: int = 0,
        amp: Union[bool, str] = False,
        train_handlers: Optional[Sequence] = None,
        max_epochs: Optional[int] = None,
    ) -> None:
        for name, value in (("max_iterations", max_iterations), ("epoch_length", epoch_length)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if max_epochs is not None and int(max_epochs) != math.ceil(max_iterations / epoch_length):
            raise ValueError(
                f"max_epochs={max_epochs} disagrees with ceil(max_iterations / epoch_length) = "
                f"ceil({max_iterations} / {epoch_length}); leave it out, it is derived."
            )
        super().__init__(
            device=device,
            max_epochs=math.ceil(max_iterations / epoch_length),
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=None,
            amp=False,
            decollate=False,
        )
        self.state.max_iters = int(max_iterations)
        self.state.pseudo_labels = None
        self.max_iterations = int(max_iterations)
        self.cs_network, self.ds_network, self.cs_ema = cs_network, ds_network, cs_ema
        self.cs_optimizer, self.ds_optimizer = cs_optimizer, ds_optimizer
        self.contrastive = contrastive
        self.diffusion = diffusion if diffusion is not None else GaussianDiffusion()
        self.num_classes = int(num_classes)
        self.hparams = hyperparams if hyperparams is not None else DEFAULT_HYPERPARAMS
        self.t_max, self.unsup_ramp, self.use_cps = float(t_max), bool(unsup_ramp), bool(use_cps)
        self.use_cl = contrastive is not None
        self.dice_ce = DiceCELoss(include_background=True, batch=True)
        self.seed = int(seed)
        if amp not in (False, None, True, *AMP_DTYPES):
            raise ValueError(f"amp must be false, true (bfloat16) or one of {list(AMP_DTYPES)}, got {amp!r}.")
        self.amp_enabled = amp not in (False, None) and self.state.device.type == "cuda"
        if amp not in (False, None) and not self.amp_enabled:
            warnings.warn("amp is ignored: mixed precision is only used on CUDA devices.", stacklevel=2)
        self.amp_dtype = AMP_DTYPES["bfloat16" if amp is True else amp] if amp not in (False, None) else torch.float32
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_enabled and self.amp_dtype == torch.float16 else None
        self.train_handlers = list(train_handlers or [])
        self._register_handlers(self.train_handlers)

    def close(self) -> None:
        """Close what the run's handlers hold open (:class:`~diffcl_algo.training.handlers.RunLog`: ``train.log`` and
        the TensorBoard writer); the bundles' ``finalize``."""
        for handler in self.train_handlers:
            if isinstance(handler, RunLog):
                handler.close()

    # ------------------------------------------------------------------ running / resuming
    def run(self) -> None:  # type: ignore[override]
        """Run (or continue) training up to ``max_iterations``; the data sampler restarts at the current iteration."""
        if self.state.iteration >= self.max_iterations:
            self.logger.info(f"Nothing to do: iteration {self.state.iteration} >= max_iterations.")
            return
        sampler = getattr(self.data_loader, "sampler", None)
        if isinstance(sampler, IterationSampler):
            sampler.start, sampler.stop = int(self.state.iteration), self.max_iterations
        elif self.state.iteration > 0:
            warnings.warn("train_data_loader has no IterationSampler: resumed data order is not exact.", stacklevel=2)
        Engine.run(self, data=self.data_loader)

    def learning_rates(self) -> dict[str, float]:
        """Current learning rates ``{"lr_cs": ..., "lr_ds": ...}`` (first parameter group of each optimizer)."""
        return {"lr_cs": self.cs_optimizer.param_groups[0]["lr"], "lr_ds": self.ds_optimizer.param_groups[0]["lr"]}

    def _contrastive_parts(self) -> dict[str, Optional[nn.Module]]:
        """The modules of ``L_cl`` under their ``train_state.pt`` names (None without ``contrastive``)."""
        cl = self.contrastive
        return {
            "cs_head": None if cl is None else cl.cs_head,
            "ds_head": None if cl is None else cl.ds_head,
            "memory_bank": None if cl is None else cl.memory_bank,
        }

    def train_state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors and primitive containers only)."""

        def sd(m: Optional[nn.Module]) -> Optional[dict]:
            return None if m is None else unwrap(m).state_dict()

        return {
            "cs_network": sd(self.cs_network),
            "ds_network": sd(self.ds_network),
            **{name: sd(module) for name, module in self._contrastive_parts().items()},
            "cs_ema": None if self.cs_ema is None else self.cs_ema.state_dict(),  # its module's weights, n_averaged
            "cs_optimizer": self.cs_optimizer.state_dict(),
            "ds_optimizer": self.ds_optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "iteration": int(self.state.iteration),
            "epoch": int(self.state.iteration // self.state.epoch_length),
            "seed": self.seed,
        }

    def load_train_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``train_state()`` output; the next ``run()`` continues at ``state["iteration"]``."""
        iteration = int(state["iteration"])
        if iteration > self.max_iterations:
            raise ValueError(f"Checkpoint iteration {iteration} exceeds max_iterations={self.max_iterations}.")
        if int(state["seed"]) != self.seed:
            warnings.warn(f"Resuming with the checkpoint's seed {int(state['seed'])}, not {self.seed}.", stacklevel=2)
            self.seed = int(state["seed"])
        modules = {"cs_network": self.cs_network, "ds_network": self.ds_network, **self._contrastive_parts()}
        for name, module in modules.items():
            if module is not None and state.get(name) is not None:
                unwrap(module).load_state_dict(state[name])
        if self.cs_ema is not None:
            if state.get("cs_ema") is None:
                raise ValueError("Cannot resume with ema_decay: the train state holds no EMA of the CS weights.")
            self.cs_ema.load_state_dict(state["cs_ema"])
        self.cs_optimizer.load_state_dict(state["cs_optimizer"])
        self.ds_optimizer.load_state_dict(state["ds_optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state.iteration = iteration
        self.state.epoch = iteration // self.state.epoch_length

    # ------------------------------------------------------------------ one iteration (Algorithm 1)
    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, float]:  # type: ignore[override]
        gen = self._seed_iteration(engine, batchdata)
        x = batchdata["image"].to(engine.state.device).float()
        y = batchdata["label"].to(engine.state.device).long()
        y = y.unsqueeze(1) if y.ndim == x.ndim - 1 else y
        nl, hp, i = y.shape[0], self.hparams, engine.state.iteration - 1
        ramp = gaussian_ramp(continuous_epoch(i, engine.state.epoch_length), self.t_max, self.RAMP_PEAK)
        use_ds = self.use_cps or self.use_cl
        x_cs = x if use_ds else x[:nl]  # the unlabeled images reach the CS only when something uses them
        x_ds = x if self.use_cps else x[:nl]
        for m in (self.cs_network, self.ds_network, self.contrastive):
            if m is not None:
                m.train()

        with self._autocast():
            cs_logits, cs_feat = self.cs_network(x_cs, return_features=True)  # Alg. 1 line 4
            if use_ds:
                pseudo_cs = self.cs_pseudo_labels(x_ds[nl:], cs_logits[nl : x_ds.shape[0]])  # Y^u, line 5
                y_t, t = self.noised_labels(torch.cat([y, pseudo_cs]), gen)  # eq. 5, line 6
                ds_logits, ds_feat = self.ds_network(x_ds, y_t, t, return_features=True)  # line 7
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        zero = cs_logits.new_zeros((), dtype=torch.float32)
        loss_sup_cs = self.supervised_loss(cs_logits[:nl], y, hp.beta2(ramp))  # eq. 19 (line 8)
        loss_sup_ds = self.supervised_loss(ds_logits[:nl], y, hp.beta1(ramp)) if use_ds else zero  # eq. 18 (line 9)
        loss_cps_cs = loss_cps_ds = zero
        engine.state.pseudo_labels = None
        if self.use_cps:
            pseudo_ds = self.ds_pseudo_labels(ds_logits[nl:])  # Y~u
            loss_cps_cs = self.dice_ce(cs_logits[nl:], pseudo_ds, hp.lambda2)  # eq. 7 (line 10)
            loss_cps_ds = self.dice_ce(ds_logits[nl:], pseudo_cs, hp.lambda1)  # eq. 6 (line 11)
            engine.state.pseudo_labels = (pseudo_cs, pseudo_ds)
        loss_cl = zero
        if self.contrastive is not None:  # eq. 15 (line 12)
            loss_cl = self.contrastive(ds_logits[:nl], ds_feat[:nl], y, cs_feat[nl:], gen, autocast=self._autocast)
        unsup = ramp / self.RAMP_PEAK if self.unsup_ramp else 1.0
        loss_ds = loss_sup_ds + hp.mu1 * unsup * loss_cps_ds  # eq. 16
        loss_cs = loss_sup_cs + hp.mu2 * unsup * (loss_cps_cs + hp.eta * loss_cl)  # eq. 17 with eq. 22 (line 13)
        loss = loss_cs + loss_ds
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        self._step(engine, loss, use_ds)  # lines 14-15, then the mean teacher
        values = (loss_sup_cs, loss_sup_ds, loss_cps_cs, loss_cps_ds, loss_cl, ramp, loss_cs, loss_ds, loss)
        out = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in zip(LOSS_KEYS, values)}
        return {**out, **self.learning_rates()}

    # ------------------------------------------------------------------ hooks (variants override these)
    def supervised_loss(self, logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
        """Supervised loss of one network on the labeled images (eq. 18-19): ``D(P, y) + beta E(P, y)``.

        Args:
            logits: (b_l, C, *S) logits of the labeled images.
            y: (b_l, 1, *S) labels.
            beta: the CE weight of this iteration (``beta1`` / ``beta2`` times the ramp).
        """
        return self.dice_ce(logits, y, beta)

    def cs_pseudo_labels(self, x_u: torch.Tensor, cs_logits_u: torch.Tensor) -> torch.Tensor:
        """``Y^u`` (b_u, 1, *S), no gradient: the mean teacher's argmax (``cs_ema``), else this step's CS output's.

        The teacher runs in train mode, as in UA-MT and BCP: batch statistics, as the CS's own forward uses them (its
        running statistics are the CS's again at the next update). In eval mode (running statistics) it made Diff-CL
        collapse on a short run (docs/results.md, "What was tried").

        Args:
            x_u: (b_u, C_in, *S) unlabeled images.
            cs_logits_u: (b_u, C, *S) the CS's logits of them.
        """
        if self.cs_ema is None or x_u.shape[0] == 0:
            return class_argmax(cs_logits_u.detach().float().softmax(1))
        teacher = self.cs_ema.module
        bottleneck = [s // getattr(teacher, "downsampling", 1) for s in x_u.shape[2:]]
        if x_u.shape[0] * math.prod(bottleneck) <= 1:
            raise ValueError(
                f"ema_decay: the mean teacher labels the unlabeled batch in train mode, and one patch of "
                f"{list(x_u.shape[2:])} leaves one value per channel at its bottleneck {bottleneck} for batch norm; "
                "use unlabeled_batch_size >= 2, a larger patch_size, or ema_decay 0."
            )
        teacher.train()
        with torch.no_grad(), self._autocast():
            return class_argmax(teacher(x_u).float().softmax(1))

    def noised_labels(self, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The DS input ``Y_t`` and its timesteps ``t`` (eq. 5), no gradient.

        Args:
            labels: (B, 1, *S) the class maps of ``Y_0``: labels of the labeled images, ``Y^u`` of the unlabeled ones.
            gen: the iteration's generator (``t ~ U{1..T}``, then ``eps``).

        Returns:
            ``(Y_t, t)``: (B, C, *S) and (B,) long.
        """
        with torch.no_grad():
            y0 = F.one_hot(labels[:, 0], self.num_classes).movedim(-1, 1).float()
            t = self.diffusion.sample_timesteps(labels.shape[0], labels.device, generator=gen)
            noise = torch.randn(y0.shape, generator=gen, device=labels.device)
            return self.diffusion.q_sample(y0, t, noise), t

    def ds_pseudo_labels(self, ds_logits_u: torch.Tensor) -> torch.Tensor:
        """``Y~u = argmax P~u`` (b_u, 1, *S), the DS's pseudo-labels for the CS (eq. 7), no gradient."""
        return class_argmax(ds_logits_u.detach().float().softmax(1))

    # ------------------------------------------------------------------ plumbing of an iteration
    def _seed_iteration(self, engine: Engine, batchdata: Mapping[str, Any]) -> torch.Generator:
        """Check the batch is this iteration's, seed torch's global generator and return the iteration's own."""
        i = int(engine.state.iteration) - 1
        if "iteration" in batchdata and int(batchdata["iteration"]) != i:
            raise RuntimeError(
                f"Data loader out of sync: batch of iteration {int(batchdata['iteration'])} at engine iteration {i}."
            )
        rank, _ = rank_world()
        torch.manual_seed(derive_seed(self.seed, SeedStream.GLOBAL_RNG, i, rank))  # dropout, any global-RNG use
        gen = torch.Generator(device=engine.state.device)
        gen.manual_seed(derive_seed(self.seed, SeedStream.GENERATOR, i, rank))
        return gen

    def _autocast(self):
        return torch.autocast(device_type=self.state.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled)

    def _step(self, engine: Engine, loss: torch.Tensor, use_ds: bool) -> None:
        """Backward, the CS and (when it ran) DS optimizer steps, the mean teacher's update; fires the events."""
        self.cs_optimizer.zero_grad(set_to_none=True)
        self.ds_optimizer.zero_grad(set_to_none=True)
        optimizers = (self.cs_optimizer, self.ds_optimizer) if use_ds else (self.cs_optimizer,)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        for optimizer in optimizers:
            optimizer.step() if self.scaler is None else self.scaler.step(optimizer)
        if self.scaler is not None:
            self.scaler.update()
        if self.cs_ema is not None:
            self.cs_ema.update_parameters(unwrap(self.cs_network))
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
