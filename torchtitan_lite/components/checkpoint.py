"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

A checkpoint is a folder ``<job.dump_folder>/<checkpoint.folder>/step-N/`` holding the DCP
shards of the model, optimizer, LR scheduler, train state (step, tokens seen, RNG) and each
rank's data-loader state, plus ``ids_manifest.json`` (tokenizer hash, vocab, bos/eos/pad,
mask type, and every file's size and checksum) and ``config.toml``. It is written as
``step-N.tmp/`` and renamed only once every rank has finished, so a ``step-N/`` folder is
always complete; loading takes the newest complete one (or ``checkpoint.load_step``) whose
files match their checksums and whose contents load, else the one before it. Nothing is
unpickled without an allow-list (:mod:`~torchtitan_lite.components.dcp_io`).

Nothing this run did not write is deleted: a folder in the way of a save (one that failed to
load, one without a manifest, a later step of a run resumed from an earlier one) is moved
aside under a name that says why, and pruning removes only checkpoints whose manifest reads
and that did not fail to load. Nothing in the way loses a trained step either: what cannot
be removed or moved is kept, and the save goes beside it
(:mod:`~torchtitan_lite.components.save_placement`).

``torch.distributed.checkpoint`` is imported where a save or load needs it: a run that does
neither (the debug run) does not pay for the import at start-up.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_lite.components.dcp_format import (
    MANIFEST,
    UNSEALED,
    CheckpointError,
    is_complete,
    list_checkpoints,
    read_manifest,
    seal_step_folder,
    step_folders,
    verify_step_folder,
)
from torchtitan_lite.components.hf_base import read_hf_base, verify_export
from torchtitan_lite.components.integrity import IntegrityError
from torchtitan_lite.components.optimizer import load_lr_scheduler
from torchtitan_lite.components.run_start import Candidate, Start, unusable_initial
from torchtitan_lite.components.save_placement import clear_unfinished, new_tmp, put_in_place
from torchtitan_lite.components.train_state import (
    ModelWrapper,
    OptimizerWrapper,
    from_bytes,
    to_bytes,
)
from torchtitan_lite.config import JobConfig, to_toml
from torchtitan_lite.distributed.parallel_dims import dp_rank
from torchtitan_lite.ids import MANIFEST_ID_KEYS, WEIGHT_ID_KEYS, IdPolicy, check_recorded_ids
from torchtitan_lite.logging import logger

#: The checkpoint entry of the data stream's position.
DATA_KEY = "dataloader"


class CheckpointManager:
    def __init__(
        self,
        *,
        config: JobConfig,
        dump_folder: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        dataloader,
        manifest: dict,
        id_policy: IdPolicy,
        mesh: DeviceMesh,
    ) -> None:
        """``manifest`` is written into every checkpoint (ids, RoPE); the run's lineage — the
        weights it started from and the data of every stage — is added at each save.
        ``id_policy``: the run's, under which the checkpoints it loads are compared. ``mesh``
        (the run's device mesh) says which data-loader state this rank saves and loads: its
        data-parallel rank's."""
        cc = config.checkpoint
        self.config, self.cc = config, cc
        self.folder = dump_folder / cc.folder
        self.model, self.optimizer = model, optimizer
        self.lr_scheduler, self.dataloader = lr_scheduler, dataloader
        self.manifest, self.id_policy = manifest, id_policy
        self.rank, self.dp_rank = mesh.get_rank(), dp_rank(mesh)
        # A save in flight: (future or None, writer, tmp folder, final folder, step).
        self._pending = None
        # Steps of this folder that failed to load, and why: set aside, never pruned.
        self.unusable: dict[int, str] = {}
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
            "data": config.data.summary(),
            "format": config.data.mixture()[0].format,
        }

    # ------------------------------------------------------------------ save

    def _state(self, step: int, tokens_seen: int, model_only: bool) -> dict[str, Any]:
        state: dict[str, Any] = {"model": ModelWrapper(self.model)}
        if model_only:
            return state
        state["optimizer"] = OptimizerWrapper(self.model, self.optimizer)
        state["lr_scheduler"] = to_bytes(self.lr_scheduler.state_dict())
        state["train_state"] = to_bytes(
            {"step": step, "tokens_seen": tokens_seen, "rng": torch.get_rng_state()}
        )
        # The data stream's global position: the same on every rank, stored once.
        state[DATA_KEY] = to_bytes(self.dataloader.state_dict())
        return state

    def should_save(self, step: int, last_step: int) -> bool:
        return self.cc.enable and (step % self.cc.interval == 0 or step == last_step)

    def save(self, step: int, tokens_seen: int, model_only: bool = False) -> Path:
        """Write ``step-N`` atomically (tmp folder, then rename after every rank is done);
        returns where it is (where it will be, for a save still in flight)."""
        from torchtitan_lite.components import dcp_io

        self.wait()
        final = self.folder / f"step-{step}"
        tmp = self._on_rank_0(lambda: new_tmp(self.folder, step), step)
        state = self._state(step, tokens_seen, model_only)
        if model_only and self.cc.export_dtype != "float32":
            dtype = getattr(torch, self.cc.export_dtype)
            state = {"model": {k: v.to(dtype) for k, v in state["model"].state_dict().items()}}
        background = self.cc.async_mode == "async"
        writer, future = dcp_io.save(state, tmp, self.pg, background=background)
        self._pending = (future, writer, tmp, final, step)
        return final if background else self.wait()

    def wait(self) -> Path | None:
        """Finish a save in flight (an async one: before the next save and at the end): every
        rank's checksums go into the manifest, written last; then the folder is renamed.
        Returns where the save is (None: none was in flight)."""
        if self._pending is None:
            return None
        future, writer, tmp, final, step = self._pending
        self._pending = None
        if future is not None:
            future.result()
        files = {}
        for checksums in self._gather(writer.checksums):
            files.update(checksums)
        manifest = {
            **self.manifest,
            "step": step,
            "lineage": [*self.lineage, {**self.stage, "steps": step}],
            **self.base,
        }

        def seal_and_place() -> Path:
            seal_step_folder(tmp, manifest, files, to_toml(self.config))
            saved = put_in_place(tmp, final, step, self.unusable.get(step))
            self._prune()
            logger.info(f"checkpoint: saved step {step} to {saved}")
            return saved

        return self._on_rank_0(seal_and_place, step)

    def _on_rank_0(self, decide: Callable[[], Path], step: int) -> Path:
        """``decide()`` (a save's folder work) on rank 0, its result on every rank of the
        checkpoint group; when it fails, every rank raises the same one-paragraph error
        (none is left waiting for a rank that stopped)."""
        outcome: tuple[Path | None, str | None] = (None, None)
        if self.rank == 0:
            try:
                outcome = (decide(), None)
            except CheckpointError as e:
                outcome = (None, str(e))
            except OSError as e:
                outcome = (
                    None,
                    f"The save of step {step} failed in {self.folder}: {e.strerror or e} "
                    f"({e.filename or self.folder}). Fix: free space there or make it "
                    "writable; the checkpoints already saved there are kept.",
                )
        saved, error = self._gather(outcome)[0]
        if error is not None:
            raise CheckpointError(error)
        return saved

    def _gather(self, value: Any) -> list[Any]:
        """``value`` from every rank of the checkpoint group, in rank order."""
        if self.pg is None or dist.get_world_size(self.pg) == 1:
            return [value]
        values: list[Any] = [None] * dist.get_world_size(self.pg)
        dist.all_gather_object(values, value, group=self.pg)
        return values

    def _barrier(self) -> None:
        if self.pg is not None and dist.get_world_size(self.pg) > 1:
            dist.barrier(group=self.pg)

    def _prune(self) -> None:
        """Keep the newest ``keep_latest_k``; a checkpoint that failed to load or whose
        manifest does not read is not counted, and never deleted."""
        k = self.cc.keep_latest_k
        if k <= 0:
            return
        intact, folders = [], step_folders(self.folder)
        for step in list_checkpoints(self.folder):
            try:
                read_manifest(folders[step], verify=False)
            except IntegrityError:
                continue
            if step not in self.unusable:
                intact.append(step)
        for step in intact[:-k]:
            try:
                shutil.rmtree(folders[step])
            except OSError as e:
                logger.warning(
                    f"checkpoint: could not remove step {step} (keep_latest_k = {k}): "
                    f"{e.strerror or e} ({e.filename or folders[step]}); what is left of "
                    f"{folders[step]} stays"
                )
            else:
                logger.info(f"checkpoint: removed step {step} (keep_latest_k = {k})")

    # ------------------------------------------------------------------ load

    def remove_stale(self) -> None:
        """Delete ``step-N.tmp`` folders left by a run killed while saving (and say so only
        where that worked), and report step folders that are not complete checkpoints (rank
        0; those are kept)."""
        if self.rank == 0 and self.folder.is_dir():
            clear_unfinished(self.folder)
            for step, path in sorted(step_folders(self.folder).items()):
                if not is_complete(path):
                    logger.warning(
                        f"checkpoint: {path} is not a complete checkpoint (no .metadata or "
                        f"{MANIFEST}): not loaded, and kept (moved aside if this run saves "
                        f"step {step} again)"
                    )
        self._barrier()

    def load(self, start: Start, tokenizer) -> tuple[dict[str, Any], Candidate]:
        """Load the run's own checkpoint that ``start`` names (:func:`resolve_start`: the
        newest complete one, or ``checkpoint.load_step``); returns its train state and the
        candidate that loaded.

        A checkpoint whose manifest does not read, whose files differ from their recorded
        sizes and checksums, that holds anything the safe unpickler refuses, or that fails to
        load is reported with its path and the next older one is used (unless
        ``checkpoint.load_step`` chose it). Every rank takes the same decision."""
        self.remove_stale()
        for candidate in start.candidates:
            if not candidate.was_read:  # an older one, read only when falling back to it
                candidate = candidate.read(self.cc.verify_checksums)
            path, step, manifest = candidate.path, candidate.step, candidate.manifest
            error = candidate.error
            if manifest is not None:
                self._check_manifest(path, manifest, tokenizer)
                error = self._verify(path, manifest)
            if error is None:
                train_state, error = self._attempt(self._load, path, step, manifest)
            if error is None:
                self._inherit(manifest, own=True)
                return train_state, candidate
            if self.cc.load_step > 0 or step == start.candidates[-1].step:
                raise CheckpointError(
                    f"Checkpoint {path} cannot be loaded ({error}). Fix: "
                    + (
                        "set checkpoint.verify_checksums = false if its storage is trusted, "
                        if UNSEALED in error
                        else ""
                    )
                    + "move that folder away to fall back to an older checkpoint, or start "
                    "without one."
                )
            self.unusable[step] = error
            logger.warning(
                f"checkpoint: {path} is corrupt or incomplete ({error}); it is kept, and an "
                "older checkpoint is loaded"
            )
        raise AssertionError("unreachable: the oldest candidate loads or raises")

    def _verify(self, path: Path, manifest: dict) -> str | None:
        """A step folder's files against its manifest's sizes (and checksums, unless
        ``checkpoint.verify_checksums`` is off); returns what differs, or None. (The data
        files its ``.metadata`` names are compared with the manifest's where it is read.)"""
        problems = self._shared_check(verify_step_folder, path, manifest, self.cc.verify_checksums)
        return "; ".join(problems) if problems else None

    def _shared_check(self, check: Callable[..., list[str]], *args: Any) -> list[str]:
        """``check(*args, part=(rank, ranks))`` on every rank of the checkpoint group, each
        reading its share of the files; returns what all of them found."""
        world = dist.get_world_size(self.pg) if self.pg is not None else 1
        problems = check(*args, part=(self.rank % world, world))
        return sorted(p for rank_problems in self._gather(problems) for p in rank_problems)

    def _attempt(self, load: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
        """(``load(*args)``, None), or (None, why it failed on the first rank that failed). DCP's
        load is collective; what a load does around it is per rank; the verdict is shared, so
        every rank falls back (or stops) together."""
        from torchtitan_lite.components.dcp_io import LOAD_ERRORS, failure_reason

        try:
            result, error = load(*args), None
        except LOAD_ERRORS as e:
            result, error = None, failure_reason(e)
        errors = [e for e in self._gather(error) if e is not None]
        return (result, None) if not errors else (None, errors[0])

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

    def load_initial(self, start: Start, tokenizer, model_args) -> None:
        """Start from the weights ``start`` names (:func:`resolve_start`): the step folder of
        ``checkpoint.initial_load_path`` or the Hugging Face folder of
        ``checkpoint.initial_load_hf``, as step 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from torchtitan_lite.components import dcp_io

        path = start.path
        if start.kind == "checkpoint":
            self._check_manifest(path, start.manifest, tokenizer, WEIGHT_ID_KEYS)
            error = self._verify(path, start.manifest)
            if error is None:
                weights = {"model": ModelWrapper(self.model)}
                _, error = self._attempt(
                    lambda: dcp_io.load(
                        weights, path, dcp_io.read_metadata(path, start.manifest), self.pg
                    )
                )
            if error is not None:
                raise unusable_initial(path, error)
            self._inherit(start.manifest, own=False)
        else:
            # The ranks share checking an exported folder against its checksums; every rank
            # checks the rest of the folder (so all fail alike); only rank 0 reads the weights,
            # which are then broadcast and sharded: one copy of the model in host memory.
            problems = self._shared_check(verify_export, path, self.cc.verify_checksums)
            if problems:
                raise CheckpointError(
                    f"The Hugging Face folder {path} (checkpoint.initial_load_hf) is not what "
                    f"was exported: {'; '.join(problems)}. Fix: export it again or "
                    "restore it from a copy."
                )
            broadcast = dist.is_initialized() and dist.get_world_size() > 1
            load_weights = self.rank == 0 or not broadcast
            weights = read_hf_base(
                path, start.hf_config, start.base, tokenizer, model_args, load_weights
            )
            options = StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=broadcast, strict=True
            )
            set_model_state_dict(self.model, weights, options=options)
            self.base = dict(start.base)
        self.stage["start"] = start.describe()
        logger.info(f"checkpoint: starting from the weights of {path} (step 0)")

    def _check_manifest(
        self, path: Path, manifest: dict, tokenizer, id_keys: tuple[str, ...] = MANIFEST_ID_KEYS
    ) -> None:
        """The checkpoint's RoPE settings, and its ids and tokenizer file under the run's id
        policy (the tokenizer's own ids were checked at start-up, under the same policy)."""
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
        for warning in check_recorded_ids(
            tokenizer,
            manifest,
            what=f"the checkpoint {path}",
            policy=self.id_policy,
            keys=id_keys,
        ):
            logger.warning(f"checkpoint: {warning}")

    def _load(self, path: Path, step: int, manifest: dict) -> dict[str, Any]:
        from torchtitan_lite.components import dcp_io

        metadata = dcp_io.read_metadata(path, manifest)  # its files: the manifest's
        keys = {k.split(".")[0] for k in metadata.state_dict_metadata}
        model_only = "optimizer" not in keys
        state = self._state(step, 0, model_only)
        stored = metadata.state_dict_metadata
        # An earlier version stored each rank's position in its own shard of the documents.
        data_key = DATA_KEY if DATA_KEY in stored else "dataloader.dp_rank_0"
        if not model_only:
            state[data_key] = state.pop(DATA_KEY)
            if data_key not in stored:
                state.pop(data_key)
        dcp_io.load(state, path, metadata, process_group=self.pg)
        logger.info(
            f"checkpoint: loaded step {step} from {path}"
            + (" (model weights only)" if model_only else "")
        )
        if model_only:
            return {"step": 0, "tokens_seen": 0}
        load_lr_scheduler(self.lr_scheduler, from_bytes(state["lr_scheduler"]))
        train_state = from_bytes(state["train_state"])
        torch.set_rng_state(train_state.pop("rng"))
        if data_key in state:
            self.dataloader.load_state_dict(from_bytes(state[data_key]))
        else:
            logger.warning(
                f"checkpoint: {path} holds no data-stream position: the data starts from its "
                "first row. Model, optimizer and schedule are resumed exactly."
            )
        return train_state
