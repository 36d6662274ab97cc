"""The dry run: size a job for N GPUs on a laptop, with the trainer itself.

``python train.py --config FILE --dry_run.world_size N [--dry_run.gpu h100]`` joins a fake
process group of N ranks (torch's ``fake`` backend: collectives return at once), builds the
real :class:`~torchtitan_lite.trainer.Trainer` — parallel layout and mesh at N ranks,
tokenizer, data, model on meta, AC → FSDP2, optimizer, checkpoint manager, with every check a
real run makes — with the model and optimizer as fake tensors (shapes, no memory), and runs
one forward + backward + optimizer step of a real batch under torch's ``FSDPMemTracker``.
It reports what one rank holds, the step's FLOPs and communication, and a roofline estimate
of the step time on the named GPU (:mod:`torchtitan_lite.roofline`); the last line says
whether it fits, and what to change when it does not. Because it is the trainer, it cannot
drift from what training does.

Under context parallelism the fake step is a CP rank's: its ``S / cp`` tokens of the row (the
layout the trainer deals from the batch's documents), the keys and values all-gathered to
``S`` in every layer and held for the backward as the GPU kernel holds them; its FLOPs are
the busiest rank's share of the mask-kept pairs.

A model's blocks are identical, so once the step's peak lies where each block adds to it,
every figure grows by the same bytes with each block. The fake step runs on the first ``d``
blocks, then ``d + k``, ``d + 2k``, ... (``k``: the period of the activation-checkpointing
pattern, 1 but for "every k-th block") until two periods in a row add the same bytes to every
figure, and extrapolates from there to the model's depth (a shallow model is measured whole).
``tests/integration/test_dry_run.py`` compares the result with a step of the whole model.
The rest of the build is the whole model's: its args, parameter count, layout checks and
per-block communication.

Two settings differ from the real run, and say why: ``torch.compile`` is off (graphs are not
traced on fake tensors, so the activations are those of the eager model; compiled blocks
usually save less) and AdamW runs its ``for-loop`` kernels (the same state; under fake
tensors the ``foreach`` kernels allocate temporaries the real ones do not). The optimizer
step's memory is then added for the configured kernels: what is live before it, state
included, and its temporaries. The step measured is the second one, as in steady state:
AdamW creates its state lazily, and from then on holds it through forward and backward.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

from torchtitan_lite.components.metrics import attention_pairs
from torchtitan_lite.config import JobConfig
from torchtitan_lite.data import IGNORE_INDEX
from torchtitan_lite.distributed.parallelize import ac_period
from torchtitan_lite.distributed.utils import clip_grad_norm_
from torchtitan_lite.logging import init_logger, logger
from torchtitan_lite.roofline import estimate, print_report
from torchtitan_lite.run_mode import RunMode


class DryRunMode(RunMode):
    """The dry run's build: the trainer's sequence at the fake process group's world size,
    with the model and optimizer as fake tensors on the CPU; nothing written (but
    ``dry_run.json``), nothing loaded, no weights initialized. Its fake step runs the sdpa
    path causally (a CP rank's queries against all keys): the same shapes, no S×S tensor
    either way, one fake kernel call per layer (the FLOPs are counted from the real mask).
    The start is still resolved, so the model
    has the RoPE settings of the weights a real run would load."""

    writes = False
    builds_masks = False

    def __init__(self, fake_mode, period: int = 1, whole: bool = False) -> None:
        """``period``: the activation-checkpointing pattern's, in blocks; ``whole``: measure
        the whole model (no extrapolation)."""
        self.fake_mode, self.period, self.whole = fake_mode, period, whole
        self.sample = 0  # which depth the fake step runs on (:func:`sample_depth`)
        self.n_layers = self.depth = 0  # set by materialize

    def device(self, choice: str) -> torch.device:
        return torch.device("cpu")

    def host_memory(self, device: torch.device, reuse_freed: bool) -> str:
        return "left as it is (a dry run allocates no real tensors)"

    def param_dtype(self, choice: str, device: torch.device) -> tuple[str, str]:
        """A dry run simulates GPUs, all of which compute in bf16."""
        if choice == "auto":
            return "bfloat16", "auto: the simulated GPU has bf16 tensor cores"
        return super().param_dtype(choice, device)

    def run_folder(self, config: JobConfig, rank: int) -> Path:
        init_logger(None)
        return Path(config.job.dump_folder)

    def check_step_fits(self, model_args, device: torch.device, **step) -> None:
        """The dry run measures the step instead of bounding it."""

    def attn_backend(self, choice: str, device: torch.device) -> str:
        return "sdpa"

    def tensors(self):
        return self.fake_mode

    def materialize(self, model, parallelize, device: torch.device, num_params: int):
        """The first blocks of the sample's depth (the model's args and parameter count stay
        the whole model's), as fake shards: no memory, no initialization."""
        self.n_layers = len(model.layers)
        self.depth = (
            self.n_layers if self.whole else sample_depth(self.n_layers, self.period, self.sample)
        )
        for name in list(model.layers)[self.depth :]:
            del model.layers[name]
        model = parallelize(model)
        with self.fake_mode:
            model.to_empty(device=device)
        return model

    def load_start(self, trainer) -> None:
        """A dry run measures; it starts from no weights."""


def local_bytes(tensors) -> int:
    """Bytes one rank holds for these tensors (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _tracker(model, optimizer):
    """torch's ``FSDPMemTracker``, keeping only the overall peak: its per-module peaks walk
    every tracked module on every op (most of a large model's dry run). Where the hook
    is not there (another torch version), the tracker is used as it is."""
    from torch.distributed._tools import mem_tracker
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class PeakTracker(FSDPMemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mem_tracker._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mem_tracker._TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    usable = hasattr(FSDPMemTracker, "_update_peak_stats") and hasattr(mem_tracker, "_TOTAL_KEY")
    return (PeakTracker if usable else FSDPMemTracker)(model, optimizer)


def _reset_peak(tracker) -> None:
    """Start the measured step: clear the per-module statistics (the tracker follows one
    iteration at a time) and forget the peak so far (the first step's). Without the private
    field (another torch version) the peak stays the maximum over both steps, which the
    second step sets anyway unless the first step's optimizer kernels peak higher."""
    tracker.reset_mod_stats()
    if isinstance(getattr(tracker, "_peak_mem", None), dict):
        tracker._peak_mem.clear()


def measure_step(trainer, optimizer_kind: str = "") -> dict[str, float]:
    """A steady-state training step of a real batch under ``FSDPMemTracker``, fake (dry run)
    or real. AdamW creates its state lazily, at its first step; from the second step on the
    state is held through forward and backward. So the optimizer first steps once on zero
    gradients (creating its state without a forward and backward, which in a dry run of a
    large model take most of its time), then the measured step runs. Returns the bytes this
    rank holds for parameters, gradients and optimizer state (exact) and the tracker's peaks.

    A real step's peak is measured whole. A dry run measures forward, backward and clipping,
    and adds the optimizer step by what its kernels allocate (``optimizer_kind``, default the
    trainer's ``optimizer.implementation``): under fake tensors the optimizer kernels
    allocate what the real ones do not."""
    step = next(iter(trainer.dataloader))
    batch = {"input": step["input"][0], "labels": step["labels"][0]}  # one micro-batch
    # The mask and the target count come from the host batch, outside the fake mode.
    mask = trainer.attention_mask(batch)
    docs, a, cp = trainer.documents(batch), trainer.model_args, trainer.context_parallel
    # context parallel: the busiest rank's share of the kept pairs sets the step (its layout,
    # read on the host here, is the one the fake step takes)
    busiest = None if cp is None else cp.busiest_pairs(docs)
    targets = max(int((batch["labels"] != IGNORE_INDEX).sum()), 1)
    params = list(trainer.model.parameters())
    figures: dict[str, float] = {"parameters": local_bytes(params)}

    def forward_backward() -> None:
        trainer.forward_backward_step(batch, 1 / targets, mask)
        clip_grad_norm_(params, trainer.config.training.max_norm)

    with trainer.mode.tensors():
        tracker = _tracker(trainer.model, trainer.optimizer)
        with tracker:
            with torch.no_grad():  # the optimizer's state, from a step on zero gradients
                for p in params:
                    p.grad = torch.zeros_like(p)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            _reset_peak(tracker)
            forward_backward()  # the measured step
            figures["gradients"] = local_bytes(p.grad for p in params if p.grad is not None)
            backward = _by_kind(tracker.get_tracker_snapshot("peak")[trainer.device])
            live = _by_kind(tracker.get_tracker_snapshot("current")[trainer.device])["Total"]
            if trainer.mode.fake_mode is None:  # a dry run adds the step's kernels by formula
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
        whole = _by_kind(tracker.get_tracker_snapshot("peak")[trainer.device])
    figures["optimizer"] = local_bytes(
        v
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    figures["activations"] = backward.get("ACT", 0)
    figures["backward_peak"] = backward["Total"]
    if trainer.mode.fake_mode is None:
        figures["peak"] = whole["Total"]
    else:  # the optimizer step: what is live (state included) and its kernels' temporaries
        kind = optimizer_kind or trainer.config.optimizer.implementation
        figures["live"] = live
        figures["temporaries"] = _optimizer_temporaries(kind, params)
        figures["peak"] = _fake_peak(figures)
    figures["tokens"] = batch["input"].numel()
    figures["pairs"] = attention_pairs(batch["input"], a.eos_id, a.attn_mask_type, docs)
    figures["busiest_pairs"] = figures["pairs"] if busiest is None else busiest
    return figures


def _fake_peak(figures: dict[str, float]) -> float:
    """A fake step's peak: the forward/backward's, or the optimizer step's (what is live,
    state included, and its kernels' temporaries), whichever is higher."""
    return max(figures["backward_peak"], figures["live"] + figures["temporaries"])


#: The figures of a fake step that grow with each block (the batch's are the same at any
#: depth).
PER_BLOCK = (
    "parameters",
    "gradients",
    "optimizer",
    "activations",
    "backward_peak",
    "live",
    "temporaries",
)


def sample_depth(n_layers: int, period: int, sample: int) -> int:
    """The depth of a dry run's ``sample``-th fake step: ``d + sample · period`` blocks with
    ``d ≡ n_layers (mod period)``, at least two periods; the whole model where the three
    samples extrapolation needs at least would measure as many blocks (a shallow model)."""
    first = 2 * period + n_layers % period
    if 3 * first + 3 * period > n_layers:
        return n_layers
    return min(first + sample * period, n_layers)


def extrapolate(measured: list[tuple[int, dict]], n_layers: int) -> dict | None:
    """The figures at ``n_layers`` blocks from steps measured at increasing depths, once the
    last two periods added the same bytes to each of :data:`PER_BLOCK` (the peak follows
    from them); None before that."""
    if len(measured) < 3:
        return None
    (_, a), (d, b), (e, c) = measured[-3:]
    growth = {key: c[key] - b[key] for key in PER_BLOCK}
    if any(b[key] - a[key] != growth[key] for key in PER_BLOCK):
        return None
    periods = (n_layers - e) // (e - d)
    figures = {**c, **{key: c[key] + periods * growth[key] for key in PER_BLOCK}}
    figures["peak"] = _fake_peak(figures)
    return figures


def _by_kind(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot keyed by plain names (``ACT``, ``OPT``, ..., ``Total``)."""
    return {str(k).rsplit(".", 1)[-1]: v for k, v in snapshot.items()}


def _optimizer_temporaries(kind: str, params) -> int:
    """Bytes AdamW allocates for one step besides its state: ``foreach`` one fp32 copy of
    all parameter shards at once (the denominator), ``for-loop`` one of the largest shard,
    ``fused`` none (measured on CPU against real steps: see tests/integration/test_dry_run)."""
    if kind == "fused":
        return 0
    sizes = [local_bytes([p]) for p in params]
    return sum(sizes) if kind == "foreach" else max(sizes, default=0)


@contextlib.contextmanager
def _quiet():
    """No log lines (the build sets the logger's level itself)."""
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = False


def fake_step(config: JobConfig, config_path: str | None, whole: bool = False):
    """The dry run's trainer and the figures of its fake step (in the fake process group the
    caller joined): measured on the first blocks at a few depths and extrapolated, or
    (``whole``) on the whole model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchtitan_lite.trainer import Trainer

    sim = copy.deepcopy(config)
    sim.compile.enable = False
    sim.optimizer.implementation = "for-loop"  # the fake step; the estimate uses the real one
    sim.data.num_workers = 0
    ac, kind = config.activation_checkpoint, config.optimizer.implementation
    mode = DryRunMode(
        FakeTensorMode(allow_non_fake_inputs=True),
        period=ac_period(ac.mode, ac.selective_ac_option),
        whole=whole,
    )
    trainer = Trainer(sim, config_path, mode=mode)
    measured = [(mode.depth, measure_step(trainer, kind))]
    while mode.depth < mode.n_layers:
        extrapolated = extrapolate(measured, mode.n_layers)
        if extrapolated is not None:
            depths = ", ".join(str(d) for d, _ in measured)
            logger.info(
                f"dry run: the step measured on {depths} of the model's {mode.n_layers} "
                "identical blocks, extrapolated to all of them"
            )
            return trainer, extrapolated
        mode.sample += 1
        with _quiet():  # the same build, deeper: its log lines once are enough
            trainer.build_model()
            measured.append((mode.depth, measure_step(trainer, kind)))
    return trainer, measured[-1][1]


def dry_run(config: JobConfig, config_path: str | None) -> int:
    """Run the dry run; returns the exit status (0 fits, 3 does not)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=config.dry_run.world_size)
    try:
        trainer, figures = fake_step(config, config_path)
        report = estimate(trainer, figures, config.dry_run.gpu)
    finally:
        dist.destroy_process_group()
    print_report(report)
    out = Path(config.job.dump_folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dry_run.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["fits"] else 3
