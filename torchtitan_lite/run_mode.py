"""What a build of the trainer does for real, decided once.

A training run (:class:`RunMode`) runs on the configured device, writes its run folder,
initializes or loads real weights and builds each batch's mask for its kernel. The dry run
(``torchtitan_lite.dry_run.DryRunMode``) overrides exactly these decisions — fake tensors on
the CPU, nothing written, nothing loaded, the sdpa kernel, the precision of the simulated
GPU — so the build sequence in ``Trainer.__init__`` is one sequence for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from torchtitan_lite.components.memory import check_step_fits
from torchtitan_lite.components.run_folder import make_run_folder
from torchtitan_lite.config import JobConfig
from torchtitan_lite.errors import ConfigError
from torchtitan_lite.hardware import keep_freed_host_memory, resolve_param_dtype
from torchtitan_lite.logging import init_logger
from torchtitan_lite.models.attention import resolve_backend

# Models up to this size are initialized whole, then sharded: the initial weights are then the
# same for every world size (a 1- and a 2-process run start identically). Larger ones are
# initialized shard by shard on their device (use a seed checkpoint to reproduce them).
_INIT_WHOLE_MAX_PARAMS = 500_000_000


class RunMode:
    """A training run."""

    #: The fake-tensor mode the model and optimizer are built under (None: real tensors).
    fake_mode = None
    #: Whether the run writes anything (run folder, log file, metrics, checkpoints).
    writes = True
    #: Whether each batch's attention mask is built for the kernel (else: causal, None).
    builds_masks = True

    def device(self, choice: str) -> torch.device:
        if choice == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if choice == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "Config key 'training.device' is 'cuda', but no CUDA device is "
                'available. Fix: set training.device = "auto" or "cpu".'
            )
        return torch.device(choice)

    def host_memory(self, device: torch.device, reuse_freed: bool) -> str:
        """CPU steps reuse the memory the previous step freed (no page faults on fresh
        pages); returns what was done, for the banner."""
        if device.type == "cpu" and reuse_freed:
            return keep_freed_host_memory()[1]
        return "left to the C library (training.cpu_reuse_freed_memory = false)"

    def param_dtype(self, choice: str, device: torch.device) -> tuple[str, str]:
        """bf16 only where the device computes in it natively (auto), else fp32."""
        return resolve_param_dtype(choice, device)

    def run_folder(self, config: JobConfig, rank: int) -> Path:
        """The run folder, created and checked; the log goes to its train.log (rank 0)."""
        folder = make_run_folder(config, rank)
        init_logger(folder / "train.log" if rank == 0 else None)
        return folder

    def check_step_fits(self, model_args, device: torch.device, **step) -> None:
        """Refuse a step that cannot fit before anything is allocated."""
        check_step_fits(model_args, device, **step)

    def attn_backend(self, choice: str, device: torch.device) -> str:
        return resolve_backend(choice, device)

    def tensors(self):
        """The context the model's and optimizer's tensors are created in."""
        return contextlib.nullcontext()

    def materialize(
        self,
        model: torch.nn.Module,
        parallelize: Callable[[torch.nn.Module], torch.nn.Module],
        device: torch.device,
        num_params: int,
    ) -> torch.nn.Module:
        """A model on the meta device (of ``num_params`` parameters) → parallelized, on
        ``device``, initialized. A small one is initialized whole, then sharded: identical
        weights for any world size; a large one shard by shard, on the device."""
        whole = num_params <= _INIT_WHOLE_MAX_PARAMS
        if whole:
            _initialize(model, device)
        model = parallelize(model)
        if not whole:
            _initialize(model, device)
        return model

    def load_start(self, trainer) -> None:
        """Load the weights the run starts from (``trainer.start``)."""
        trainer.load_start()


def _initialize(model: torch.nn.Module, device: torch.device) -> None:
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
