"""The Trainer: ``__init__`` is the build sequence, read top to bottom; then the step and loop."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchtitan_lite.components.banner import log_banner
from torchtitan_lite.components.checkpoint import CheckpointManager, list_checkpoints
from torchtitan_lite.components.dcp_format import read_manifest
from torchtitan_lite.components.gc_control import GarbageCollection
from torchtitan_lite.components.integrity import IntegrityError
from torchtitan_lite.components.memory import check_step_fits
from torchtitan_lite.components.metrics import MetricsLogger, attention_pairs, peak_tflops
from torchtitan_lite.components.optimizer import build_lr_scheduler, build_optimizer
from torchtitan_lite.components.profiling import maybe_profile
from torchtitan_lite.components.stop_signals import stop_signals
from torchtitan_lite.config import JobConfig, to_toml
from torchtitan_lite.config.loader import all_keys, tomllib
from torchtitan_lite.data import IGNORE_INDEX, build_dataloader, build_validation_loader
from torchtitan_lite.distributed.parallel_dims import (
    ParallelDims,
    check_tensor_parallel,
    dp_rank,
    tp_mesh,
)
from torchtitan_lite.distributed.parallelize import parallelize
from torchtitan_lite.distributed.utils import (
    all_reduce_sum,
    any_rank,
    clip_grad_norm_,
    init_distributed,
    keep_freed_host_memory,
    local_device,
    rank_sums,
    resolve_param_dtype,
    set_collective_timeout,
    set_seed,
)
from torchtitan_lite.errors import ConfigError, UserError
from torchtitan_lite.ids import args_from_tokenizer, check_special_ids, ids_manifest
from torchtitan_lite.logging import init_logger, logger
from torchtitan_lite.models.attention import (
    build_attention_mask,
    document_positions,
    resolve_backend,
)
from torchtitan_lite.models.llama3.args import (
    ROPE_KEYS,
    ffn_hidden_dim,
    model_args_for,
    rope_settings,
)
from torchtitan_lite.models.llama3.model import Transformer
from torchtitan_lite.models.loss import cross_entropy_sum
from torchtitan_lite.tokenizer import load_tokenizer

# Models up to this size are initialized whole, then sharded: the initial weights are then the
# same for every world size (a 1- and a 2-process run start identically). Larger ones are
# initialized shard by shard on their device (use a seed checkpoint to reproduce them).
_INIT_WHOLE_MAX_PARAMS = 500_000_000


class Trainer:
    def __init__(self, config: JobConfig, config_path: str | None = None, fake_mode=None) -> None:
        """``fake_mode`` (a ``FakeTensorMode``; the dry run's): build everything as a real run
        would, at the world size of the fake process group already joined, but with fake
        tensors for the model and optimizer, on the CPU, writing nothing and loading no
        checkpoint."""
        self.config = config
        self.fake_mode = fake_mode
        dry = fake_mode is not None
        tc, mc = config.training, config.model

        # 1. Device, process group, parallel layout and mesh.
        self.device = torch.device("cpu") if dry else _device(tc.device)
        self.rank, self.world_size = init_distributed(self.device, config.comm.init_timeout_seconds)
        self.device = local_device(self.device)
        # CPU steps reuse the memory the previous step freed (no page faults on fresh pages).
        self.host_memory = "left to the C library (training.cpu_reuse_freed_memory = false)"
        if self.device.type == "cpu" and tc.cpu_reuse_freed_memory and not dry:
            self.host_memory = keep_freed_host_memory()[1]
        # bf16 only where the device computes in it natively (auto), else fp32. A dry run
        # simulates GPUs, all of which compute in bf16.
        self.param_dtype, self.param_dtype_reason = (
            ("bfloat16", "auto: the simulated GPU has bf16 tensor cores")
            if dry and tc.mixed_precision_param == "auto"
            else resolve_param_dtype(tc.mixed_precision_param, self.device)
        )
        pc = config.parallelism
        self.parallel_dims = ParallelDims(
            pc.data_parallel_replicate_degree,
            pc.data_parallel_shard_degree,
            self.world_size,
            pc.tensor_parallel_degree,
        )
        self.mesh = self.parallel_dims.build_mesh(self.device.type)
        # Which data this rank reads: the ranks of one tensor-parallel group read the same.
        self.dp_rank = dp_rank(self.mesh)
        config.validate(data_parallel=self.parallel_dims.dp)  # the rules that need the world

        # 2. The run folder: everything the run writes lands here (a dry run writes nothing).
        self.dump_folder = (
            Path(config.job.dump_folder) if dry else _make_dump_folder(config.job.dump_folder)
        )
        init_logger(self.dump_folder / "train.log" if self.rank == 0 and not dry else None)
        if self.rank == 0 and not dry:
            (self.dump_folder / "config.toml").write_text(
                f"{RUN_CONFIG_MARK}\n{to_toml(config)}", encoding="utf-8"
            )

        # 3. Seed: the same on every rank, so initial weights agree before sharding.
        set_seed(tc.seed, tc.deterministic)

        # 4. The tokenizer first: its special ids are the single source of truth.
        tk = config.tokenizer
        self.tokenizer = load_tokenizer(tk.path, tk.eos_token, tk.pad_token, tk.extra_stop_tokens)

        # 5. Data: this rank's shard of the packed stream, with gradient accumulation.
        rows = tc.local_batch_size * self.parallel_dims.dp  # one step without accumulation
        global_batch = tc.global_batch_size if tc.global_batch_size > 0 else rows
        self.grad_accum_steps = global_batch // rows  # validate() checked it divides
        self.dataloader = build_dataloader(
            config.data,
            self.tokenizer,
            tc.seq_len,
            tc.local_batch_size,
            self.dp_rank,
            self.parallel_dims.dp,
            config.validation,
        )
        # Chat data renders with the tokenizer's chat template (its ids were checked there).
        self.chat_template = getattr(self.dataloader.dataset, "template", None)

        # 6. Model args from the tokenizer, then the startup id check over every part.
        self.rope_source, source_rope = _starting_rope(config, self.dump_folder)
        rope = {key: getattr(mc, key) for key in ROPE_KEYS}
        if mc.rope_theta == -1 and "rope_theta" in source_rope:
            rope["rope_theta"] = source_rope["rope_theta"]
        if mc.rope_scaling_factor == -1:  # the factor and, with it, its band
            rope.update({k: v for k, v in source_rope.items() if k != "rope_theta"})
        self.model_args = model_args_for(
            mc.flavor,
            max_seq_len=tc.seq_len,
            attn_mask_type=mc.attn_mask_type,
            flex_compile_mode=config.compile.flex_mode,
            **rope,
        )
        self.model_args = args_from_tokenizer(
            self.model_args,
            self.tokenizer,
            vocab_size=mc.vocab_size,
            vocab_size_multiple_of=mc.vocab_size_multiple_of,
            eos_id=mc.eos_id,
        )
        check_tensor_parallel(
            self.parallel_dims.tp,
            self.model_args.n_heads,
            self.model_args.n_kv_heads or self.model_args.n_heads,
            self.model_args.vocab_size,
            ffn_hidden_dim(
                self.model_args.dim, self.model_args.multiple_of, self.model_args.ffn_dim_multiplier
            ),
            tc.seq_len,
        )
        if not dry:  # refuse a step that cannot fit before anything is allocated
            check_step_fits(
                self.model_args,
                self.device,
                seq_len=tc.seq_len,
                local_batch_size=tc.local_batch_size,
                ac_mode=config.activation_checkpoint.mode,
                param_dtype=self.param_dtype,
                shards=self.parallel_dims.dp_shard,
                tp=self.parallel_dims.tp,
            )
        for warning in check_special_ids(
            self.tokenizer,
            model_args=self.model_args,
            data_eos_id=self.dataloader.dataset.eos_id,
            allow_eot_boundary=tk.allow_eot_boundary,
        ):
            logger.warning(warning)
        # The fake step of a dry run runs the sdpa path: same shapes, no S×S tensor either way.
        self.attn_backend = "sdpa" if dry else resolve_backend(mc.attn_backend, self.device)

        # 7. The model: on the meta device (no memory), initialized, parallelized
        #    (TP → AC → compile → FSDP2), materialized on the device.
        with torch.device("meta"):
            model = Transformer(self.model_args)
        self.num_params = sum(p.numel() for p in model.parameters())
        init_whole = self.num_params <= _INIT_WHOLE_MAX_PARAMS and not dry
        if init_whole:  # 7a. whole, then sharded: identical weights for any world size
            model.to_empty(device=self.device)
            with torch.no_grad():
                model.init_weights(buffer_device=self.device)
        self.model = parallelize(model, self.mesh, config, self.attn_backend, self.param_dtype)
        with fake_mode or contextlib.nullcontext():  # a dry run: fake shards, no memory
            if not init_whole:  # 7b. shard by shard, on the device (a dry run keeps them empty)
                self.model.to_empty(device=self.device)
                if not dry:
                    with torch.no_grad():
                        self.model.init_weights(buffer_device=self.device)
            self.model.train()

            # 8. Optimizer and learning-rate schedule.
            self.optimizer = build_optimizer(self.model, config.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, tc.steps, config.lr_scheduler)

        # 9. Checkpoints: resume from the newest complete one when there is one.
        self.step, self.tokens_seen, self.epoch = 0, 0, 0
        self.skipped_steps: list[int] = []
        self.checkpointer = CheckpointManager(
            config,
            self.dump_folder,
            self.model,
            self.optimizer,
            self.lr_scheduler,
            self.dataloader,
            {
                **ids_manifest(self.tokenizer, mc.attn_mask_type),
                "rope": rope_settings(self.model_args),
            },
            self.mesh,
        )
        cc = config.checkpoint
        state = None
        if cc.enable and not cc.create_seed_checkpoint and not dry:
            state = self.checkpointer.load(self.tokenizer, cc.allow_id_change)
            if state is not None:
                self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if dry:
            pass  # a dry run measures; it starts from no weights
        elif state is None and (cc.initial_load_path or cc.initial_load_hf):
            self.checkpointer.load_initial(self.tokenizer, self.model_args)
        elif state is None and config.data.format.startswith("chat"):
            logger.warning(
                "chat fine-tuning from randomly initialized weights: set "
                "checkpoint.initial_load_path (a pretraining checkpoint) or "
                "checkpoint.initial_load_hf (a Hugging Face model) to fine-tune a trained model"
            )

        # 10. Metrics.
        mx = config.metrics
        write_tb = mx.enable_tensorboard and (self.rank == 0 or not mx.rank_0_only) and not dry
        tb = self.dump_folder / mx.save_tb_folder
        if write_tb and not mx.rank_0_only:
            tb = tb / f"rank_{self.rank}"
        peak, self.peak_source = peak_tflops(self.device, mx.peak_tflops)
        self.metrics = MetricsLogger(
            self.model_args,
            self.device,
            peak,
            tb if write_tb else None,
            self.dump_folder / "metrics.jsonl" if self.rank == 0 and not dry else None,
            show_trained=self.chat_template is not None,
            devices_per_batch=self.parallel_dims.tp,
        )
        log_banner(self, config_path, global_batch)

    # ------------------------------------------------------------------ steps

    def forward_backward_step(
        self, batch: dict[str, torch.Tensor], scale: float, mask=None
    ) -> torch.Tensor:
        """One micro-batch: the mask (once, shared by all layers; built here unless given),
        forward, backward.

        Returns the summed token loss (a device tensor, not read here); backpropagates
        ``loss_sum × scale``. With loss parallelism the backward runs in its context too.
        """
        with self.loss_context():
            loss_sum = self.loss_sum(batch, mask)
            (loss_sum * scale).backward()
        return loss_sum.detach()

    def loss_context(self):
        """``loss_parallel`` under tensor parallelism with ``parallelism.loss_parallel``: the
        cross-entropy (and its backward) on vocabulary-sharded logits."""
        if tp_mesh(self.mesh) is not None and self.config.parallelism.loss_parallel:
            return loss_parallel()
        return contextlib.nullcontext()

    def attention_mask(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor | None = None):
        """The batch's mask, built once and shared by all layers: flex builds its BlockMask on
        the device (from ``tokens``, the batch's tokens already there, when given); sdpa cuts
        its segments on the host copy of the tokens (no device→host read), placing their
        small masks on the device.

        A dry run's fake step attends causally (None): no S×S either way, as with
        FlexAttention on the GPU; the dry run counts the FLOPs from the real mask; and one
        fake kernel call per layer replaces one per document."""
        if self.fake_mode is not None:
            return None
        if self.attn_backend != "flex":
            tokens = batch["input"]
        elif tokens is None:
            tokens = batch["input"].to(self.device, non_blocking=True)
        return build_attention_mask(
            tokens,
            self.model_args.eos_id,
            self.model_args.attn_mask_type,
            self.attn_backend,
            device=self.device,
        )

    def loss_sum(self, batch: dict[str, torch.Tensor], mask=None) -> torch.Tensor:
        """Summed token loss of one micro-batch (its mask built here unless given), then the
        forward; training, validation and the dry run all go through here."""
        inputs = batch["input"].to(self.device, non_blocking=True)  # (B, S)
        labels = batch["labels"].to(self.device, non_blocking=True)  # (B, S)
        mask = self.attention_mask(batch, inputs) if mask is None else mask
        eos_id = self.model_args.eos_id
        positions = (
            document_positions(inputs, eos_id) if self.config.data.reset_position_ids else None
        )
        if tp_mesh(self.mesh) is None:  # the model computes the loss chunk by chunk
            return self.model(inputs, mask, positions=positions, labels=labels)
        # Tensor parallel: vocabulary-sharded logits (loss parallel), or gathered ones. Loss
        # parallel returns the loss as a DTensor replicated over the TP ranks: its local value
        # is the whole loss (and stays differentiable).
        loss = cross_entropy_sum(self.model(inputs, mask, positions=positions), labels)
        return loss.to_local() if isinstance(loss, DTensor) else loss

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and perplexity over the validation data (``validation.steps`` batches per rank,
        or all of it), normalized like training: by the global count of valid targets.

        Every rank runs the same number of forwards (FSDP's collectives need it): a rank whose
        share ran out feeds fully padded batches until every rank is done."""
        vc, tc = self.config.validation, self.config.training
        rows = vc.local_batch_size if vc.local_batch_size > 0 else tc.local_batch_size
        loader = build_validation_loader(
            self.config.data,
            vc,
            self.tokenizer,
            tc.seq_len,
            rows,
            self.dp_rank,
            self.parallel_dims.dp,
        )
        data_iter = iter(loader)
        pad_id = self.dataloader.dataset.pad_id
        loss_sum = torch.zeros((), device=self.device)
        valid = batches = 0
        self.model.eval()
        try:
            while vc.steps < 0 or batches < vc.steps:
                try:
                    batch, failed = next(data_iter, None), None
                except UserError as e:  # bad validation data: every rank stops, none waits
                    batch, failed = None, e
                more, failures = rank_sums(batch is not None, failed is not None)
                if failures:
                    raise failed or UserError(
                        "Validation data could not be read on another rank; its log says why."
                    )
                if not more:
                    break
                if batch is None:
                    batch = {"input": torch.full((0, tc.seq_len), pad_id, dtype=torch.long)}
                    batch["labels"] = torch.full_like(batch["input"], IGNORE_INDEX)
                batch.pop("epoch", None)
                batch = _pad_rows(batch, rows, pad_id)
                valid += host_count(batch["labels"] != IGNORE_INDEX)
                with self.loss_context():
                    loss_sum += self.loss_sum(batch)
                batches += 1
        finally:
            self.model.train()
        global_valid = host_count(self._data_sum(torch.tensor([valid])))
        if global_valid == 0:
            raise UserError(
                f"Validation data ({self.config.validation.path or self.config.data.path}) has "
                "no trained targets on any rank. Fix: point validation.path at data with "
                "text (or assistant turns), or raise validation.split_fraction."
            )
        loss = self._data_sum(loss_sum).item() / global_valid
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 80.0)),
            "targets": global_valid,
            "batches": batches,
        }

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over the micro-batches; returns (loss, grad norm).

        The loss is normalized by the number of valid targets over all micro-batches and all
        ranks, so accumulation and data parallelism give the gradient of one big batch. That
        count comes from the host copies of the labels and is summed over ranks on the CPU
        backend, so the device queue never waits for it; the step reads the device once.
        """
        valid = sum(host_count(b["labels"] != IGNORE_INDEX) for b in micro_batches)
        global_valid = max(host_count(self._data_sum(torch.tensor([valid]))), 1)
        # FSDP averages gradients over the data-parallel ranks; undo that mean.
        scale = self.parallel_dims.dp / global_valid
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            loss_sum += self.forward_backward_step(batch, scale)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.config.training.max_norm)
        loss = self._data_sum(loss_sum) / global_valid
        # The one device→host sync of the step: the divergence guard must see the loss and
        # the norm before the optimizer applies the update. Both come back in one transfer.
        loss_value, norm_value = torch.stack([loss, grad_norm.float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            # Every rank sees the same global loss and norm, so all skip.
            self._skip_nonfinite(loss_value, norm_value)
            return loss_value, norm_value
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return loss_value, norm_value

    def _data_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks. The ranks of a tensor-parallel group read the same
        batch and hold the same loss, so the sum over the world counts each ``tp`` times."""
        total = all_reduce_sum(value)
        tp = self.parallel_dims.tp
        return total // tp if not total.is_floating_point() else total / tp

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Divergence guard: drop this step's gradients, or stop after too many such steps."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps.append(self.step)
        limit = self.config.training.skip_nonfinite_steps
        if len(self.skipped_steps) > limit:
            raise DivergenceError(
                f"Training diverged: loss {loss} / grad norm {grad_norm} at step {self.step}"
                f"; non-finite steps so far: {self.skipped_steps} (more than "
                f"training.skip_nonfinite_steps = {limit}). Nothing was saved after the "
                "divergence, so the newest checkpoint is the last good state. Fix: lower "
                "optimizer.lr or raise lr_scheduler.warmup_steps, check the data, and "
                "restart (it resumes from that checkpoint)."
            )
        logger.warning(
            f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}; "
            f"update skipped ({len(self.skipped_steps)} of at most {limit})"
        )

    def train(self) -> list[float]:
        """Run ``training.steps`` optimizer steps; returns the loss of every step.

        SIGTERM / SIGINT (what schedulers send before pre-emption) end the run at the next
        step boundary with a checkpoint, exit status 0; a second signal exits at once.
        """
        with (
            stop_signals() as stop_requested,
            GarbageCollection(self.config.training.gc_freq) as gc,
        ):
            return self._train(stop_requested, gc)

    def _next_micro_batch(self, data_iter) -> dict[str, torch.Tensor] | None:
        """The next batch of this rank (None when a finite dataset is exhausted), with its
        host-side metrics recorded; a short last batch is padded to the full batch shape."""
        start = time.perf_counter()
        try:
            batch = next(data_iter)
        except StopIteration:
            return None
        except UserError as e:  # raised in a loader worker: drop its traceback
            raise type(e)(_original_message(str(e))) from None
        a = self.model_args
        self.metrics.add_batch(
            batch["input"],
            attention_pairs(batch["input"], a.eos_id, a.attn_mask_type),
            time.perf_counter() - start,
            trained=host_count(batch["labels"] != IGNORE_INDEX),
        )
        self.epoch = host_count(batch.pop("epoch").max())
        # every input position (a padded short last batch is not counted; chat padding is)
        self.tokens_seen += batch["input"].numel() * self.parallel_dims.dp
        pad_id = self.dataloader.dataset.pad_id
        return _pad_rows(batch, self.config.training.local_batch_size, pad_id)

    def _train(self, stop_requested, gc: GarbageCollection) -> list[float]:
        data_iter = iter(self.dataloader)
        try:
            return self._train_loop(data_iter, stop_requested, gc)
        finally:
            # Stop the loader's worker processes now. After a failed step the iterator lives
            # on in the traceback until a later garbage collection, whose shutdown then waits
            # seconds on each worker (torch's loader iterators have no public close).
            shutdown = getattr(data_iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _train_loop(self, data_iter, stop_requested, gc: GarbageCollection) -> list[float]:
        tc = self.config.training
        losses: list[float] = []
        first_step = self.step + 1
        logger.info(f"training {tc.steps} steps")
        self.metrics.reset()
        with maybe_profile(self.config, self.dump_folder, self.rank) as profiler:
            while self.step < tc.steps:
                lr = self.lr_scheduler.get_last_lr()[0]
                micro_batches = []
                for _ in range(self.grad_accum_steps):
                    batch = self._next_micro_batch(data_iter)
                    if batch is None:
                        logger.info(
                            f"data exhausted after step {self.step} "
                            "(data.infinite = false); stopping"
                        )
                        return losses
                    micro_batches.append(batch)
                self.step += 1
                gc.step(self.step)
                loss, grad_norm = self.train_step(micro_batches)
                losses.append(loss)
                if self.step == first_step:
                    # Start-up (compilation, loading, warm-up) is over: hung ranks now fail fast.
                    set_collective_timeout(self.config.comm.train_timeout_seconds)
                if self.step % self.config.metrics.log_freq == 0 or self.step == tc.steps:
                    self.metrics.log(self.step, loss, grad_norm, lr, self.epoch)
                if profiler is not None:
                    profiler.step()
                vc = self.config.validation
                if vc.enable and (self.step % vc.freq == 0 or self.step == tc.steps):
                    start = time.perf_counter()
                    result = self.validate()
                    self.metrics.log_validation(self.step, result, time.perf_counter() - start)
                saved = False
                diverging = bool(self.skipped_steps) and self.skipped_steps[-1] == self.step
                if self.checkpointer.should_save(self.step, tc.steps) and not diverging:
                    model_only = (
                        self.step == tc.steps and self.config.checkpoint.last_save_model_only
                    )
                    self.checkpointer.save(self.step, self.tokens_seen, model_only=model_only)
                    saved = True
                if self.step < tc.steps and any_rank(stop_requested()):
                    if self.config.checkpoint.enable and not saved and not diverging:
                        self.checkpointer.save(self.step, self.tokens_seen)
                    logger.warning(
                        f"stopping at step {self.step} on a signal"
                        + (
                            "; checkpoint saved, the same command resumes here"
                            if self.config.checkpoint.enable
                            else " (checkpoint.enable is off: nothing saved)"
                        )
                    )
                    return losses
        logger.info(f"training done: {self.step} steps")
        return losses

    def save_seed_checkpoint(self) -> None:
        """Write the freshly initialized weights as step 0 (one process only)."""
        if self.world_size != 1:
            raise ConfigError(
                "checkpoint.create_seed_checkpoint runs on one process (the weights are then "
                f"resharded on load), but this run has {self.world_size}. Fix: run it with "
                "plain `python train.py` or NGPU=1."
            )
        path = self.checkpointer.save(0, 0, model_only=True)
        logger.info(f"seed checkpoint written to {path}")

    def close(self) -> None:
        self.checkpointer.wait()
        self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class DivergenceError(UserError):
    """The loss or gradient norm stayed non-finite."""


def _original_message(message: str) -> str:
    """A loader worker re-raises with its traceback inside the message: keep the last line,
    the original message."""
    if "Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _starting_rope(config: JobConfig, dump_folder: Path) -> tuple[str, dict]:
    """Where the run's weights come from, and the RoPE settings they were trained with: the
    run's own checkpoint (resume; the newest whose manifest reads), ``checkpoint.
    initial_load_path`` or ``initial_load_hf``. Config keys left unset (-1) take them, so a
    Llama 3.1 base keeps its scaling. A manifest that does not read is skipped here; the
    checkpoint manager reports it when it loads."""
    cc = config.checkpoint
    own = dump_folder / cc.folder
    steps = list_checkpoints(own) if cc.enable and not cc.create_seed_checkpoint else []
    if cc.load_step in steps:
        steps = [cc.load_step]
    folders = [own / f"step-{step}" for step in reversed(steps)]
    if cc.initial_load_path:
        folders.append(Path(cc.initial_load_path))
    for folder in folders:
        try:
            return f"checkpoint {folder}", read_manifest(folder, verify=False).get("rope", {})
        except IntegrityError:
            continue
    if cc.initial_load_hf:
        from torchtitan_lite.export.hf import hf_rope_settings

        return f"Hugging Face model {cc.initial_load_hf}", hf_rope_settings(
            Path(cc.initial_load_hf)
        )
    return f"flavor {config.model.flavor}", {}


def host_count(tensor: torch.Tensor) -> int:
    """Sum of a host (CPU) tensor as a Python int. Read through numpy, which refuses device
    tensors, so a host read here can never hide a device→host sync."""
    return int(tensor.numpy().sum())


def _pad_rows(batch: dict[str, torch.Tensor], rows: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A short last batch (``data.infinite = false``) grows to ``rows`` rows of pad tokens
    whose labels are all ignored: the loss is unchanged, and compiled graphs keep the one
    static shape they were built for instead of compiling another."""
    missing = rows - batch["input"].shape[0]
    if missing <= 0:
        return batch
    width = batch["input"].shape[1]
    return {
        "input": torch.cat([batch["input"], batch["input"].new_full((missing, width), pad_id)]),
        "labels": torch.cat(
            [batch["labels"], batch["labels"].new_full((missing, width), IGNORE_INDEX)]
        ),
    }


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "Config key 'training.device' is 'cuda', but no CUDA device is "
            'available. Fix: set training.device = "auto" or "cpu".'
        )
    return torch.device(choice)


#: The first line of the resolved config a run writes into its folder. A ``config.toml``
#: there is overwritten only when it starts with this line: any other file of that name (a
#: user's own config, say) makes the run stop instead.
RUN_CONFIG_MARK = "# torchtitan_lite: the resolved config of the run in this folder"


def _make_dump_folder(path: str) -> Path:
    """Create (or reuse) the run folder, after checking that the run may write there: it is
    writable, and its ``config.toml``, if any, is a run's resolved config (every rank checks,
    so all refuse alike)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{dist.get_rank() if dist.is_initialized() else 0}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"Config key 'job.dump_folder' is {path!r}, which cannot be written ({e.strerror}). "
            "Fix: point job.dump_folder at a writable folder, e.g. --job.dump_folder "
            "./outputs."
        ) from None
    resolved = folder / "config.toml"
    if resolved.is_dir() or (resolved.exists() and not _is_run_config(resolved)):
        raise ConfigError(
            f"Config key 'job.dump_folder' is {path!r}, which holds a config.toml that is "
            "not a run's resolved config (it lacks the first line a run writes), e.g. your "
            "own config file: the run would overwrite it with its resolved config. Fix: "
            "choose another job.dump_folder, or move that config.toml elsewhere."
        )
    return folder


def _is_run_config(path: Path) -> bool:
    """A resolved config a run wrote: marked on its first line, or (written before the mark
    existed) a TOML file with every key of every section, as only the writer produces."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.split("\n", 1)[0] == RUN_CONFIG_MARK:
        return True
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    keys = [f"{s}.{k}" for s, t in tables.items() if isinstance(t, dict) for k in t]
    return sorted(keys) == sorted(all_keys())
