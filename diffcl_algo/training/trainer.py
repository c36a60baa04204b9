"""Diff-CL training engine: ``DiffCLTrainer``, Algorithm 1 of the paper as a ``monai.engines.Trainer``.

Its iteration (eq. 5-9, 11-22) fires the standard ignite / MONAI events, so stock MONAI handlers (StatsHandler,
TensorBoardStatsHandler, ValidationHandler, LrScheduleHandler, CheckpointSaver) attach to it. It reads the batches of
``diffcl_algo.data.iteration`` (one item per iteration, a pure function of ``(seed, iteration)``), and every other
random choice of an iteration (timesteps, noise, memory-bank sampling, unlabeled-feature sampling, dropout) is drawn
from generators seeded by ``(seed, iteration, rank)``. Resuming therefore needs only the iteration counter plus the
model / optimizer / memory-bank state (``train_state()`` / ``load_train_state()``).
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
from diffcl_algo.data.transforms import HIDDEN_LABEL
from diffcl_algo.diffusion import GaussianDiffusion
from diffcl_algo.evaluation.metrics import foreground_dice
from diffcl_algo.losses import DiceCELoss, class_argmax
from diffcl_algo.schedules import DEFAULT_HYPERPARAMS, DiffCLHyperParams, continuous_epoch, gaussian_ramp, poly_lr
from diffcl_algo.training.checkpoint import unwrap
from diffcl_algo.training.handlers import RunLog
from diffcl_algo.utils import SeedStream, derive_seed, rank_world

__all__ = ["LOSS_KEYS", "OUTPUT_KEYS", "SUP_LOSS_FORMS", "DiffCLTrainer"]

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

#: ``DiffCLTrainer(sup_loss=...)`` choices: the paper's ``D + beta E`` or the field's ``0.5 (E + D_fg)``.
SUP_LOSS_FORMS = ("paper", "field")


class DiffCLTrainer(Trainer):
    """Diff-CL semi-supervised trainer: Algorithm 1, one call of ``_iteration`` per line-2 loop step.

    Per iteration ``i`` (0-based; ``engine.state.iteration = i + 1`` during it), with ``b_l`` labeled and
    ``b_u`` unlabeled images in ``batch["image"]`` (labeled first) and labels ``batch["label"]``:

    1. CS forward on all images -> logits ``P^`` and CS decoder features (Alg. 1 line 4).
    2. ``Y^u = argmax P^u`` (detached); ``Y_0`` = one-hot ``y^l`` / one-hot ``Y^u`` (line 5).
    3. ``t ~ U{1..T}``, ``Y_t = q_sample(Y_0, t, eps)`` (eq. 5, line 6); DS forward ``(x, Y_t, t)`` -> ``P~`` and
       DS features (line 7).
    4. ``L_s^c = D(P^l, y) + beta2 E`` (eq. 19), ``L_s^d = D(P~l, y) + beta1 E`` (eq. 18),
       ``beta = beta_c * lambda(t)`` with ``lambda`` the Gaussian ramp of the continuous epoch ``i / epoch_length``.
    5. ``L_p^c = D(P^u, argmax P~u) + lambda2 E`` (eq. 7), ``L_p^d = D(P~u, argmax P^u) + lambda1 E`` (eq. 6).
    6. ``L_cl`` (eq. 11-15) with its memory-bank update: :class:`~diffcl_algo.contrastive.ContrastiveLabelPropagation`
       on the DS logits / features of the labeled images and the CS features of the unlabeled ones. ``L_cl`` enters
       only the CS loss (eq. 17, 22).
    7. ``L^d = L_s^d + mu1 L_p^d`` (eq. 16); ``L^c = L_s^c + mu2 (L_p^c + eta L_cl)`` (eq. 17, 22).
    8. ``(L^c + L^d).backward()`` (the two losses share no parameters: pseudo-labels and ``Y_0`` are detached),
       then the CS optimizer and the DS optimizer step (lines 14-15).

    Ablation switches (paper Table 6): ``use_cps=False`` -> ``L_p^c = L_p^d = 0`` exactly and the unlabeled
    images skip the DS (and, without ``contrastive``, the CS); ``contrastive=None`` (``use_cl: false``) ->
    ``L_cl = 0``;
    HF-Mamba on/off is a property of the CS network (``hfm_stages``), chosen by the builder. With neither
    ``use_cps`` nor ``use_cl`` (the supervised-only row) nothing reaches the CS from the DS, so the DS is not run at
    all: the row costs one V-Net on the labeled images (``loss_sup_ds = 0``, the DS keeps its initial weights).

    Supervised loss form (``sup_loss``, eq. 18-19): ``"paper"`` = ``D + beta E`` (Dice over all classes, CE weight
    ``beta = beta_c lambda(t)``, Table 2); ``"field"`` = ``0.5 (E + D_fg)``, the field's supervised V-Net recipe
    (foreground Dice with squared denominators, fixed weights; docs/results.md measures both). The cross
    pseudo-supervision terms keep the paper's form.

    Output (``engine.state.output``): ``{key: float}`` for every key of ``OUTPUT_KEYS`` (the loss terms of
    ``LOSS_KEYS``, ``loss = loss_cs + loss_ds``, and the learning rates ``lr_cs``, ``lr_ds``).
    With cross pseudo-supervision and a batch carrying ``"hidden_label"`` (``monitor_pseudo_labels``), also
    ``pseudo_dice_cs`` / ``pseudo_dice_ds``: the foreground Dice of this iteration's CS / DS pseudo-labels of the
    unlabeled patches against their hidden labels (logged only; nothing is trained on them).

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
        ds_network: DS net, ``ds_network(x, y_t, t, return_features=True) -> (logits, features)``. Built with
            ``self_condition=True`` (``DiffusionSegNet``), every forward also gets ``self_cond``: on a random half of
            the iterations the DS's own no-gradient first estimate from the same ``Y_t``, otherwise zeros
            (Analog Bits' training; :meth:`_self_cond`).
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
            the paper as printed (Table 2 ramps only the supervised CE weights, the cross pseudo-supervision is at
            full weight from the first iteration). See docs/training.md.
        use_cps: cross pseudo-supervision (eq. 6-7); False: ``L_p^c = L_p^d = 0``.
        sup_loss: ``"paper"`` or ``"field"``, the form of the supervised losses (above).
        ds_pseudo_steps: 0 (default): the DS pseudo-labels of eq. 7 are the argmax of this iteration's DS output,
            whose input is the noised CS pseudo-label; ``k >= 1``: they come from ``k`` DDIM steps started from pure
            noise (``GaussianDiffusion.ddim_sample``, no gradient), as the DS would segment at inference.
        unlabeled_t_min: 0 (the paper): the DS forward of the unlabeled images draws ``t ~ U{1..T}`` like the labeled
            ones; ``f`` in (0, 1]: it draws ``t ~ U{ceil(f T)..T}``, so ``Y_t`` keeps little of the CS pseudo-label and
            the DS must segment the image itself (``f = 1``: ``t = T``, pure noise); its output is then a pseudo-label
            of its own for the CS, at no extra cost (docs/training.md measures it).
        ds_recycling: 0 (the paper): the DS input is the noised label (ground truth / CS pseudo-label); ``p`` in
            (0, 1]: with probability ``p`` per iteration it is the noised DS prediction from pure noise instead
            (ImgX-DiffSeg's recycling, :meth:`_recycled`), for every image; the targets are unchanged.
        cps_confidence: 0 (the paper): every voxel of the cross pseudo-supervision counts; ``c`` in (0, 1): only the
            voxels whose pseudo-label has probability ``>= c`` under the network that made it (eq. 6-7 on a mask).
        copy_paste: 0 (the paper): the unlabeled images enter as they are; ``r`` in (0, 1): bidirectional copy-paste
            (BCP, Bai et al. CVPR 2023; not in the paper): each unlabeled slot becomes a mix of an unlabeled and a
            labeled image, a cube of side ``r`` x the patch from one pasted into the other (even slots: the unlabeled
            cube into the labeled image, odd slots: the labeled cube into the unlabeled image; :meth:`_copy_paste`).
            Both networks see the mixed images; the pasted labeled voxels are supervised by their ground truth (added
            to eq. 18-19 with a mask) and as the known part of ``Y_0``, the cross pseudo-supervision covers the rest.
            Needs ``use_cps``.
        cs_ema: None (the paper) or an exponential moving average of the CS weights
            (``torch.optim.swa_utils.AveragedModel`` of :func:`~diffcl_algo.training.ema.weight_ema`; not in the
            paper), updated from the CS after each optimizer step. The bundle (``ema_decay``) validates it
            and saves it as ``model.pt``; it is stored in ``train_state.pt``.
        ema_pseudo_labels: False: the CS pseudo-labels ``Y^u`` (DS target of eq. 6 and the signal of ``Y_0``) are the
            argmax of this iteration's CS output; True (needs ``cs_ema``): of the EMA CS in train mode, no gradient
            (the mean teacher of UA-MT / BCP; not in the paper).
        poly_lr_power: None (paper: constant lr) or ``p`` for ``lr = lr0 (1 - i / max_iterations)^p`` (SSL4MIS
            uses 0.9), set each iteration from the iteration number (so it resumes exactly).
        seed: base seed of every random choice.
        amp: mixed precision on CUDA (``torch.autocast``); ignored with a warning on CPU.
        amp_dtype: ``"bfloat16"`` or ``"float16"`` (the latter with a ``GradScaler``).
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
        sup_loss: str = "paper",
        ds_pseudo_steps: int = 0,
        unlabeled_t_min: float = 0.0,
        ds_recycling: float = 0.0,
        cps_confidence: float = 0.0,
        copy_paste: float = 0.0,
        cs_ema: Optional[AveragedModel] = None,
        ema_pseudo_labels: bool = False,
        poly_lr_power: Optional[float] = None,
        seed: int = 0,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
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
        self.max_iterations = int(max_iterations)
        self.cs_network = cs_network
        self.ds_network = ds_network
        self.cs_optimizer = cs_optimizer
        self.ds_optimizer = ds_optimizer
        self.contrastive = contrastive
        self.diffusion = diffusion if diffusion is not None else GaussianDiffusion()
        self.num_classes = int(num_classes)
        self.hparams = hyperparams if hyperparams is not None else DEFAULT_HYPERPARAMS
        self.t_max = float(t_max)
        self.unsup_ramp = bool(unsup_ramp)
        self.use_cps = bool(use_cps)
        self.use_cl = contrastive is not None
        self.dice_ce = DiceCELoss(include_background=True, batch=True)
        if sup_loss not in SUP_LOSS_FORMS:
            raise ValueError(f"sup_loss must be one of {SUP_LOSS_FORMS}, got {sup_loss!r}.")
        self.sup_loss = sup_loss
        self.field_dice_ce = DiceCELoss(include_background=False, batch=True, squared_pred=True)
        if int(ds_pseudo_steps) < 0:
            raise ValueError(f"ds_pseudo_steps must be >= 0, got {ds_pseudo_steps}.")
        self.ds_pseudo_steps = int(ds_pseudo_steps)
        if not 0.0 <= float(unlabeled_t_min) <= 1.0:
            raise ValueError(f"unlabeled_t_min must be in [0, 1] (a fraction of T), got {unlabeled_t_min}.")
        if not 0.0 <= float(ds_recycling) <= 1.0:
            raise ValueError(f"ds_recycling must be in [0, 1] (a probability per iteration), got {ds_recycling}.")
        self.ds_recycling = float(ds_recycling)
        self.ds_self_condition = bool(getattr(unwrap(ds_network), "self_condition", False))
        if not 0.0 <= float(cps_confidence) < 1.0:
            raise ValueError(f"cps_confidence must be in [0, 1), got {cps_confidence}.")
        self.cps_confidence = float(cps_confidence)
        if not 0.0 <= float(copy_paste) < 1.0:
            raise ValueError(f"copy_paste must be in [0, 1) (the pasted cube's side as a fraction of the patch), got "
                             f"{copy_paste}.")
        if float(copy_paste) > 0 and not use_cps:
            raise ValueError("copy_paste needs use_cps: without cross pseudo-supervision no unlabeled image is used.")
        if ema_pseudo_labels and cs_ema is None:
            raise ValueError(
                "ema_pseudo_labels needs an EMA of the CS: set ema_decay in (0, 1), or ema_pseudo_labels false."
            )
        self.cs_ema = cs_ema
        self.ema_pseudo_labels = bool(ema_pseudo_labels)
        self.copy_paste = float(copy_paste)
        self.unlabeled_t_low = max(1, math.ceil(float(unlabeled_t_min) * self.diffusion.timesteps))
        self.poly_lr_power = poly_lr_power
        self.seed = int(seed)
        for opt in (cs_optimizer, ds_optimizer):
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.amp_enabled = bool(amp) and self.state.device.type == "cuda"
        if amp and not self.amp_enabled:
            warnings.warn("amp=True is ignored: mixed precision is only used on CUDA devices.", stacklevel=2)
        if amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16', got {amp_dtype!r}.")
        self.amp_dtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.amp_enabled and self.amp_dtype == torch.float16 else None
        )
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
    def _autocast(self):
        return torch.autocast(device_type=self.state.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled)

    def _set_lr(self, iteration: int) -> None:
        if self.poly_lr_power is None:
            return
        for opt in (self.cs_optimizer, self.ds_optimizer):
            for group in opt.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], iteration, self.max_iterations, self.poly_lr_power)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, float]:  # type: ignore[override]
        i = int(engine.state.iteration) - 1
        if "iteration" in batchdata and int(batchdata["iteration"]) != i:
            raise RuntimeError(
                f"Data loader out of sync: batch of iteration {int(batchdata['iteration'])} at engine iteration {i}."
            )
        device = engine.state.device
        rank, _ = rank_world()
        torch.manual_seed(derive_seed(self.seed, SeedStream.GLOBAL_RNG, i, rank))  # dropout, any global-RNG use
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, SeedStream.GENERATOR, i, rank))
        self._set_lr(i)

        x = batchdata["image"].to(device).float()
        y = batchdata["label"].to(device).long()
        if y.ndim == x.ndim - 1:
            y = y.unsqueeze(1)
        nl = y.shape[0]
        ramp = gaussian_ramp(continuous_epoch(i, engine.state.epoch_length), self.t_max, self.RAMP_PEAK)
        hp = self.hparams
        beta1, beta2 = hp.beta1(ramp), hp.beta2(ramp)
        use_ds = self.use_cps or self.use_cl
        pasted = None  # (b_u, 1, *S) True where an unlabeled slot holds labeled voxels (copy_paste)
        if self.copy_paste > 0 and x.shape[0] > nl:
            x, pasted, y_pasted = self._copy_paste(x, y, gen)
        x_cs = x if use_ds else x[:nl]
        x_ds = x if self.use_cps else x[:nl]
        for m in (self.cs_network, self.ds_network, self.contrastive):
            if m is not None:
                m.train()

        with self._autocast():
            cs_logits, cs_feat = self.cs_network(x_cs, return_features=True)  # Alg. 1 line 4
            if use_ds:
                with torch.no_grad():
                    probs_cs = self._cs_pseudo_probs(x_ds[nl:], cs_logits[nl : x_ds.shape[0]])
                    pseudo_cs = class_argmax(probs_cs)  # Y^u, line 5
                    if pasted is not None:  # the pasted labeled voxels are known
                        pseudo_cs = torch.where(pasted, y_pasted, pseudo_cs)
                    one_hot = F.one_hot(torch.cat([y, pseudo_cs])[:, 0], self.num_classes).movedim(-1, 1).float()
                    y0 = self.diffusion.encode(one_hot)
                    t = self.diffusion.sample_timesteps(x_ds.shape[0], device, generator=gen)
                    if self.unlabeled_t_low > 1 and x_ds.shape[0] > nl:
                        low = self.unlabeled_t_low
                        t[nl:] = self.diffusion.sample_timesteps(x_ds.shape[0] - nl, device, generator=gen, low=low)
                    noise = torch.randn(y0.shape, generator=gen, device=device)
                    if self.ds_recycling > 0:  # the draw only then: the paper's random streams stay as they were
                        if float(torch.rand((), generator=gen, device=device)) < self.ds_recycling:
                            y0 = self._recycled(x_ds, gen)
                    y_t = self.diffusion.q_sample(y0, t, noise)  # eq. 5, line 6
                    ds_extra = {"self_cond": self._self_cond(x_ds, y_t, t, gen)} if self.ds_self_condition else {}
                ds_logits, ds_feat = self.ds_network(x_ds, y_t, t, return_features=True, **ds_extra)  # line 7
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        zero = cs_logits.new_zeros((), dtype=torch.float32)
        loss_sup_cs = self._supervised(cs_logits[:nl], y, beta2)  # eq. 19 (line 8)
        loss_sup_ds = self._supervised(ds_logits[:nl], y, beta1) if use_ds else zero  # eq. 18 (line 9)
        if pasted is not None:  # eq. 18-19 on the pasted labeled voxels of the mixed images
            loss_sup_cs = loss_sup_cs + self.dice_ce(cs_logits[nl:], y_pasted, beta2, mask=pasted)
            loss_sup_ds = loss_sup_ds + self.dice_ce(ds_logits[nl:], y_pasted, beta1, mask=pasted)
        loss_cps_cs = loss_cps_ds = zero
        if self.use_cps:
            probs_ds = self._ds_pseudo_probs(x[nl:], ds_logits[nl:], gen)
            pseudo_ds = class_argmax(probs_ds)  # Y~u
            mask_cs, mask_ds = self._confident(probs_ds), self._confident(probs_cs)
            if pasted is not None:  # cross pseudo-supervision on the unlabeled voxels only
                mask_cs, mask_ds = (~pasted if m is None else m & ~pasted for m in (mask_cs, mask_ds))
            loss_cps_cs = self.dice_ce(cs_logits[nl:], pseudo_ds, hp.lambda2, mask=mask_cs)  # eq. 7 (line 10)
            loss_cps_ds = self.dice_ce(ds_logits[nl:], pseudo_cs, hp.lambda1, mask=mask_ds)  # eq. 6 (line 11)
        loss_cl = zero
        if self.contrastive is not None:  # eq. 15 (line 12)
            pseudo_u = None  # cl_select: pseudo_label chooses positives among the voxels of Y^u's class
            if unwrap(self.contrastive).selection == "pseudo_label":
                if x_ds.shape[0] > nl:
                    pseudo_u = pseudo_cs
                else:  # without CPS the DS saw the labeled images only: Y^u of the unlabeled ones here
                    with torch.no_grad():
                        pseudo_u = class_argmax(self._cs_pseudo_probs(x[nl:], cs_logits[nl:]))
            loss_cl = self.contrastive(
                ds_logits[:nl], ds_feat[:nl], y, cs_feat[nl:], gen, autocast=self._autocast, pseudo_labels_u=pseudo_u
            )
        unsup = ramp / self.RAMP_PEAK if self.unsup_ramp else 1.0
        loss_ds = loss_sup_ds + hp.mu1 * unsup * loss_cps_ds  # eq. 16
        loss_cs = loss_sup_cs + hp.mu2 * unsup * (loss_cps_cs + hp.eta * loss_cl)  # eq. 17 with eq. 22 (line 13)
        loss = loss_cs + loss_ds
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        self.cs_optimizer.zero_grad(set_to_none=True)
        self.ds_optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.scaler.step(self.cs_optimizer)  # line 14
            if use_ds:
                self.scaler.step(self.ds_optimizer)  # line 15
            self.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.cs_optimizer.step()  # line 14
            if use_ds:
                self.ds_optimizer.step()  # line 15
        if self.cs_ema is not None:
            self.cs_ema.update_parameters(unwrap(self.cs_network))
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        values = (loss_sup_cs, loss_sup_ds, loss_cps_cs, loss_cps_ds, loss_cl, ramp, loss_cs, loss_ds, loss)
        out = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in zip(LOSS_KEYS, values)}
        out.update(self.learning_rates())
        if HIDDEN_LABEL in batchdata and self.use_cps:
            hidden = batchdata[HIDDEN_LABEL].to(device).long()
            if pasted is not None:  # the unlabeled voxels of the mixed images only
                hidden, pseudo_cs, pseudo_ds = (torch.where(pasted, 0, v) for v in (hidden, pseudo_cs, pseudo_ds))
            out["pseudo_dice_cs"] = foreground_dice(pseudo_cs, hidden)
            out["pseudo_dice_ds"] = foreground_dice(pseudo_ds, hidden)
        return out

    def _copy_paste(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bidirectional copy-paste (BCP) of the unlabeled slots of a batch with the labeled ones.

        Unlabeled slot ``j`` pairs with labeled image ``j mod b_l``; a cube of side ``copy_paste`` x the patch (per
        axis, at a random place) is the region that the unlabeled image gives to the labeled one (``j`` even) or
        takes from it (``j`` odd), as BCP mixes each pair both ways.

        Args:
            x: (b_l + b_u, C, *S) images, labeled first.
            y: (b_l, 1, *S) labels of the labeled images.
            gen: the iteration's generator (cube places).

        Returns:
            ``(x_mixed, pasted, y_pasted)``: the batch with its unlabeled slots mixed; (b_u, 1, *S) True where a slot
            holds labeled voxels; (b_u, 1, *S) the labels of its labeled image (valid where ``pasted``).
        """
        nl, spatial = y.shape[0], x.shape[2:]
        pair = torch.arange(x.shape[0] - nl, device=x.device) % nl
        cube = torch.zeros((len(pair), 1, *spatial), dtype=torch.bool, device=x.device)
        for j in range(len(pair)):
            box = []
            for size in spatial:
                side = max(1, round(self.copy_paste * size))
                start = int(torch.randint(0, size - side + 1, (), generator=gen, device=x.device))
                box.append(slice(start, start + side))
            cube[(j, 0, *box)] = True
        odd = (torch.arange(len(pair), device=x.device) % 2 == 1).view(-1, *[1] * (cube.ndim - 1))
        pasted = torch.where(odd, cube, ~cube)
        mixed = torch.where(pasted, x[pair], x[nl:])
        return torch.cat([x[:nl], mixed]), pasted, y[pair]

    def _recycled(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The DS's own prediction from pure noise (``t = T``), as the signal to noise instead of ``Y_0``.

        ImgX-DiffSeg's recycling: trained on noised versions of its own predictions, the DS learns to correct a
        segmentation it made from the image rather than to return the label it is given; no gradient.
        """
        t = torch.full((x.shape[0],), self.diffusion.timesteps, dtype=torch.long, device=x.device)
        y_T = torch.randn((x.shape[0], self.num_classes, *x.shape[2:]), generator=gen, device=x.device)
        return self.diffusion.encode(self.ds_network(x, y_T, t).float().softmax(1))

    def _self_cond(self, x: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The self-conditioning input of a self-conditioned DS (B, C, *S): with probability 1/2 its own first
        estimate of the clean signal from the same ``Y_t`` (no gradient), otherwise zeros, as Analog Bits trains it
        (Chen et al., ICLR 2023), so that it serves both the first DDIM step (zeros) and the later ones."""
        if float(torch.rand((), generator=gen, device=x.device)) < 0.5:
            return self.diffusion.encode(self.ds_network(x, y_t, t, self_cond=torch.zeros_like(y_t)).float().softmax(1))
        return torch.zeros_like(y_t)

    def _cs_pseudo_probs(self, x_u: torch.Tensor, cs_logits_u: torch.Tensor) -> torch.Tensor:
        """Class probabilities (b_u, C, *S) behind ``Y^u``: this step's CS output, or (``ema_pseudo_labels``) the
        EMA CS's (a mean teacher: its pseudo-labels change slowly, so a bad step of the CS does not at once become the
        DS's target); no gradient. The teacher runs in train mode, as in UA-MT and BCP: batch statistics, as the CS's
        own forward uses them (its running statistics are the CS's again at the next update). In eval mode (running
        statistics) it made Diff-CL collapse on the demo's short run even at ``ema_decay`` 0.5 (docs/results.md)."""
        if not self.ema_pseudo_labels or x_u.shape[0] == 0:
            return cs_logits_u.detach().float().softmax(1)
        teacher = self.cs_ema.module
        bottleneck = [s // getattr(teacher, "downsampling", 1) for s in x_u.shape[2:]]
        if x_u.shape[0] * math.prod(bottleneck) <= 1:
            raise ValueError(
                f"ema_pseudo_labels: the mean teacher labels the unlabeled batch in train mode, and one patch of "
                f"{list(x_u.shape[2:])} leaves one value per channel at its bottleneck {bottleneck} for batch norm; "
                "use unlabeled_batch_size >= 2, a larger patch_size, or ema_pseudo_labels false."
            )
        teacher.train()
        with torch.no_grad(), self._autocast():
            return teacher(x_u).float().softmax(1)

    def _ds_pseudo_probs(self, x_u: torch.Tensor, ds_logits_u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Class probabilities (b_u, C, *S) behind ``Y~u``: this step's DS output, or (``ds_pseudo_steps > 0``) DDIM.

        The training forward's DS input holds ``Y_t``, the noised CS pseudo-label, so at small ``t`` its prediction
        mostly returns the CS's own pseudo-label to the CS. Sampling from pure noise (eq. 2-3) gives a DS
        pseudo-label that depends on the image alone, as at the DS's inference; no gradient.
        """
        if self.ds_pseudo_steps == 0:
            return ds_logits_u.detach().float().softmax(1)
        with torch.no_grad(), self._autocast():
            probs = self.diffusion.ddim_sample(
                self.ds_network, x_u, self.num_classes, steps=self.ds_pseudo_steps, generator=gen
            )
        return probs.float()

    def _confident(self, probs: torch.Tensor) -> Optional[torch.Tensor]:
        """(b_u, 1, *S) mask of the pseudo-labels whose class probability reaches ``cps_confidence`` (None: all)."""
        if self.cps_confidence <= 0:
            return None
        return probs.amax(dim=1, keepdim=True) >= self.cps_confidence

    def _supervised(self, logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
        """Supervised loss of one network on the labeled images: eq. 18 / 19 (``"paper"``) or the field's form."""
        if self.sup_loss == "field":
            return self.field_dice_ce(logits, y, ce_weight=0.5, dice_weight=0.5)
        return self.dice_ce(logits, y, beta)
