"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

A checkpoint is a folder ``<job.dump_folder>/<checkpoint.folder>/step-N/`` holding the DCP
shards of the model, optimizer, LR scheduler, train state (step, tokens seen, RNG) and each
rank's data-loader state, plus ``ids_manifest.json`` (tokenizer hash, vocab, bos/eos/pad,
mask type) and ``config.toml``. It is written as ``step-N.tmp/`` and renamed only once every
rank has finished, so a ``step-N/`` folder is always complete; loading takes the newest
complete one (or ``checkpoint.load_step``). Model weights load with DCP (tensors only) or
safetensors, never with unrestricted pickle.

``torch.distributed.checkpoint`` is imported where a save or load needs it: a run that does
neither (the debug run) does not pay for the import at start-up.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_lite.components.dcp_format import MANIFEST, is_complete
from torchtitan_lite.components.optimizer import load_lr_scheduler
from torchtitan_lite.config import JobConfig, to_toml
from torchtitan_lite.data import load_loader_state
from torchtitan_lite.distributed.parallel_dims import dp_rank
from torchtitan_lite.errors import UserError
from torchtitan_lite.ids import (
    MANIFEST_ID_KEYS,
    WEIGHT_ID_KEYS,
    IdMismatchError,
    check_special_ids,
)
from torchtitan_lite.logging import logger

_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete or corrupt."""


class ModelWrapper:
    """The model's full state dict (sharded DTensors stay sharded) as a DCP ``Stateful``
    (a protocol: DCP checks for ``state_dict`` and ``load_state_dict``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(self.model, state, options=StateDictOptions(strict=True))


class OptimizerWrapper:
    """The optimizer's state keyed by parameter names, as a DCP ``Stateful``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state)


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def list_checkpoints(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        match = _STEP.match(child.name)
        if match and is_complete(child):
            steps.append(int(match.group(1)))
    return sorted(steps)


class CheckpointManager:
    def __init__(
        self,
        config: JobConfig,
        dump_folder: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        dataloader,
        manifest: dict,
        mesh: DeviceMesh,
    ) -> None:
        """``manifest`` is written into every checkpoint (ids, RoPE); the run's lineage — the
        weights it started from and the data of every stage — is added at each save. ``mesh``
        (the run's device mesh) says which data-loader state this rank saves and loads: its
        data-parallel rank's."""
        cc = config.checkpoint
        self.config, self.cc = config, cc
        self.folder = dump_folder / cc.folder
        self.model, self.optimizer = model, optimizer
        self.lr_scheduler, self.dataloader = lr_scheduler, dataloader
        self.manifest = manifest
        self.rank, self.dp_rank = mesh.get_rank(), dp_rank(mesh)
        self._pending = None  # (future, tmp folder, final folder) of an async save
        # Checkpoint collectives get a gloo group of their own (every rank creates it here, in
        # the same order): CPU-side, so an async save can run them from its background thread
        # on CUDA runs too, never interleaved with the training collectives of the default
        # group, and under the default long timeout rather than the short training one.
        # (A dry run's world is a fake process group: its checkpoint group is fake too.)
        backend = "fake" if dist.is_initialized() and dist.get_backend() == "fake" else "gloo"
        self.pg = dist.new_group(backend=backend) if dist.is_initialized() else None
        # Where this run's weights came from: earlier stages (from the initial checkpoint),
        # then this run's own stage; the stop ids of a Hugging Face base model.
        self.lineage: list[dict] = []
        self.base = {"base_stop_ids": [], "base_context_length": 0}
        self.stage = {
            "start": "random initialization",
            "data": config.data.path,
            "format": config.data.format,
        }

    # ------------------------------------------------------------------ save

    def _state(self, step: int, tokens_seen: int, model_only: bool) -> dict[str, Any]:
        state: dict[str, Any] = {"model": ModelWrapper(self.model)}
        if model_only:
            return state
        state["optimizer"] = OptimizerWrapper(self.model, self.optimizer)
        state["lr_scheduler"] = _to_bytes(self.lr_scheduler.state_dict())
        state["train_state"] = _to_bytes(
            {"step": step, "tokens_seen": tokens_seen, "rng": torch.get_rng_state()}
        )
        state[f"dataloader.dp_rank_{self.dp_rank}"] = _to_bytes(self.dataloader.state_dict())
        return state

    def should_save(self, step: int, last_step: int) -> bool:
        return self.cc.enable and (step % self.cc.interval == 0 or step == last_step)

    def save(self, step: int, tokens_seen: int, model_only: bool = False) -> Path:
        """Write ``step-N`` atomically (tmp folder, then rename after every rank is done)."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = self.folder / f"step-{step}"
        tmp = self.folder / f"step-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        state = self._state(step, tokens_seen, model_only)
        if model_only and self.cc.export_dtype != "float32":
            dtype = getattr(torch, self.cc.export_dtype)
            state = {"model": {k: v.to(dtype) for k, v in state["model"].state_dict().items()}}
        if self.cc.async_mode == "async":
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.pg)
            self._pending = (future, tmp, final, step)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self.pg)
            self._finalize(tmp, final, step)
        return final

    def _finalize(self, tmp: Path, final: Path, step: int) -> None:
        self._barrier()
        if self.rank == 0:
            # File sizes let a later load detect a truncated or partly copied checkpoint.
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {
                **self.manifest,
                "step": step,
                "files": files,
                "lineage": [*self.lineage, {**self.stage, "steps": step}],
                **self.base,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / "config.toml").write_text(to_toml(self.config))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)  # atomic: step-N/ appears complete or not at all
            self._prune()
            logger.info(f"checkpoint: saved step {step} to {final}")
        self._barrier()

    def _barrier(self) -> None:
        if self.pg is not None and dist.get_world_size(self.pg) > 1:
            dist.barrier(group=self.pg)

    def wait(self) -> None:
        """Finish an async save in flight (before the next save and at the end)."""
        if self._pending is not None:
            future, tmp, final, step = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, final, step)

    def _prune(self) -> None:
        k = self.cc.keep_latest_k
        if k > 0:
            for step in list_checkpoints(self.folder)[:-k]:
                shutil.rmtree(self.folder / f"step-{step}", ignore_errors=True)
                logger.info(f"checkpoint: removed step {step} (keep_latest_k = {k})")

    # ------------------------------------------------------------------ load

    def remove_stale(self) -> None:
        """Delete ``step-N.tmp`` folders left by a run killed while saving (rank 0)."""
        if self.rank == 0 and self.folder.is_dir():
            for tmp in sorted(self.folder.glob("step-*.tmp")):
                shutil.rmtree(tmp, ignore_errors=True)
                logger.warning(
                    f"checkpoint: removed {tmp}, an unfinished save of an earlier "
                    "run (it was never complete)"
                )
        self._barrier()

    def load(self, tokenizer, allow_id_change: bool = False) -> dict[str, Any] | None:
        """Load the chosen (or newest complete) checkpoint; returns its train state or None.

        A checkpoint that fails its size check or cannot be read is reported with its path and
        the next older one is used (unless ``checkpoint.load_step`` chose it)."""
        from torch.distributed.checkpoint.api import CheckpointException

        self.remove_stale()
        steps = list_checkpoints(self.folder)
        if self.cc.load_step > 0:
            if self.cc.load_step not in steps:
                raise CheckpointError(
                    f"Config key 'checkpoint.load_step' is {self.cc.load_step}, but "
                    f"{self.folder} holds complete checkpoints for steps {steps or 'none'}. "
                    "Fix: choose one of them, or -1 for the newest."
                )
            steps = [self.cc.load_step]
        for step in reversed(steps):
            path = self.folder / f"step-{step}"
            manifest = json.loads((path / MANIFEST).read_text())
            self._check_manifest(path, manifest, tokenizer, allow_id_change)
            self._inherit(manifest, own=True)
            try:
                _verify_files(path, manifest)
                return self._load(path, step)
            except (
                RuntimeError,
                ValueError,
                OSError,
                pickle.UnpicklingError,
                KeyError,
                CheckpointError,
                CheckpointException,
            ) as e:
                if self.cc.load_step > 0 or step == steps[0]:
                    raise CheckpointError(
                        f"Checkpoint {path} cannot be loaded ({_reason(e)}). Fix: delete or "
                        "move that folder to fall back to an older checkpoint, or start "
                        "without one."
                    ) from None
                logger.warning(
                    f"checkpoint: {path} is corrupt or incomplete ({_reason(e)}); falling "
                    "back to an older one"
                )
        return None

    def _inherit(self, manifest: dict, own: bool) -> None:
        """Take over the lineage of a loaded checkpoint: all of it when resuming this run's
        own checkpoint, its finished stages when starting a new stage from its weights."""
        lineage = manifest.get("lineage", [])
        self.base = {key: manifest.get(key, value) for key, value in self.base.items()}
        if own and lineage:  # this run's stage: its starting weights; its data is the config's
            *self.lineage, last = lineage
            self.stage["start"] = last["start"]
        elif not own:
            self.lineage = lineage

    def load_initial(self, tokenizer, model_args) -> None:
        """Start from the weights of ``checkpoint.initial_load_path`` (a DCP step folder) or
        ``checkpoint.initial_load_hf`` (a Hugging Face folder), as step 0."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from torchtitan_lite.components.safe_load import SafeLoadPlanner
        from torchtitan_lite.export.hf import read_hf_base

        if self.cc.initial_load_path:
            path = Path(self.cc.initial_load_path)
            if not is_complete(path):
                raise CheckpointError(
                    f"Config key 'checkpoint.initial_load_path' is {str(path)!r}, which is not a "
                    f"complete checkpoint step folder (no .metadata or {MANIFEST}). Fix: point it "
                    "at a step folder such as outputs/debug_model/checkpoint/step-10."
                )
            manifest = json.loads((path / MANIFEST).read_text())
            self._check_manifest(
                path,
                manifest,
                tokenizer,
                self.cc.allow_id_change,
                WEIGHT_ID_KEYS,
            )
            self._inherit(manifest, own=False)
            state = {"model": ModelWrapper(self.model)}
            try:
                dcp.load(
                    state, checkpoint_id=str(path), planner=SafeLoadPlanner(), process_group=self.pg
                )
            except (RuntimeError, ValueError, OSError, CheckpointException) as e:
                raise CheckpointError(
                    f"Checkpoint {path} (checkpoint.initial_load_path) cannot be loaded into "
                    f"this model ({_reason(e)}). Fix: use a checkpoint of the same model.flavor "
                    "and vocabulary."
                ) from None
            self.stage["start"] = f"checkpoint {path}"
        else:
            path = Path(self.cc.initial_load_hf)
            # Every rank checks the folder (so all fail alike); only rank 0 reads the weights,
            # which are then broadcast and sharded: one copy of the model in host memory.
            broadcast = dist.is_initialized() and dist.get_world_size() > 1
            weights, self.base = read_hf_base(
                path, tokenizer, model_args, load_weights=self.rank == 0 or not broadcast
            )
            options = StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=broadcast, strict=True
            )
            set_model_state_dict(self.model, weights, options=options)
            self.stage["start"] = f"Hugging Face model {path}"
        logger.info(f"checkpoint: starting from the weights of {path} (step 0)")

    def _check_manifest(
        self,
        path: Path,
        manifest: dict,
        tokenizer,
        allow: bool,
        id_keys: tuple[str, ...] = MANIFEST_ID_KEYS,
    ) -> None:
        saved_rope, rope = manifest.get("rope"), self.manifest.get("rope")
        if saved_rope is not None and rope is not None and saved_rope != rope:
            differ = ", ".join(
                f"model.{k} = {saved_rope[k]} there, {rope.get(k)} here"
                for k in saved_rope
                if saved_rope[k] != rope.get(k)
            )
            raise CheckpointError(
                f"Checkpoint {path} was trained with other RoPE settings than this run "
                f"({differ}); its weights would compute different attention here. Fix: set "
                "those keys to the checkpoint's values, or leave model.rope_theta and "
                "model.rope_scaling_factor at -1 to take the checkpoint's."
            )
        try:
            for w in check_special_ids(tokenizer, manifest=manifest, manifest_keys=id_keys):
                logger.warning(w)
        except IdMismatchError as e:
            if not allow:
                raise IdMismatchError(
                    f"{e} (checkpoint {path}; to change the ids deliberately, set "
                    "checkpoint.allow_id_change = true)"
                ) from None
            logger.warning(f"checkpoint: loading despite an id change (allowed): {e}")

    def _load(self, path: Path, step: int) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        from torchtitan_lite.components.safe_load import SafeLoadPlanner

        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        keys = {k.split(".")[0] for k in metadata.state_dict_metadata}
        model_only = "optimizer" not in keys
        state = self._state(step, 0, model_only)
        data_key = f"dataloader.dp_rank_{self.dp_rank}"
        if not model_only and data_key not in metadata.state_dict_metadata:
            state.pop(data_key)
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner(), process_group=self.pg)
        logger.info(
            f"checkpoint: loaded step {step} from {path}"
            + (" (model weights only)" if model_only else "")
        )
        if model_only:
            return {"step": 0, "tokens_seen": 0}
        load_lr_scheduler(self.lr_scheduler, _from_bytes(state["lr_scheduler"]))
        train_state = _from_bytes(state["train_state"])
        torch.set_rng_state(train_state.pop("rng"))
        if data_key in state:
            load_loader_state(self.dataloader, _from_bytes(state[data_key]))
        else:
            logger.warning(
                f"checkpoint: {path} holds no data-loader state for data-parallel rank "
                f"{self.dp_rank} (it was written by fewer ranks): this rank starts its data "
                "shard from the beginning. Model, optimizer and schedule are resumed exactly."
            )
        return train_state


def _reason(e: BaseException) -> str:
    """One line on why a load failed (DCP wraps per-rank failures)."""
    text = str(e).strip()
    for line in text.splitlines():
        if "Error" in line or "Exception" in line:
            text = line
            break
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _verify_files(path: Path, manifest: dict) -> None:
    for name, size in manifest.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise CheckpointError(f"file {name} has {actual} bytes, the manifest says {size}")
