"""The Trainer: ``__init__`` is the build sequence, read top to bottom; then the step and loop."""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchtitan_lite.components.banner import log_banner
from torchtitan_lite.components.checkpoint import CheckpointManager
from torchtitan_lite.components.divergence import DivergenceGuard
from torchtitan_lite.components.gc_control import GarbageCollection
from torchtitan_lite.components.metrics import MetricsLogger, attention_pairs, peak_tflops
from torchtitan_lite.components.optimizer import build_lr_scheduler, build_optimizer
from torchtitan_lite.components.profiling import maybe_profile
from torchtitan_lite.components.run_start import build_model_args, resolve_start, weights_manifest
from torchtitan_lite.components.stop_signals import stop_signals
from torchtitan_lite.config import JobConfig
from torchtitan_lite.data import IGNORE_INDEX, build_dataloader
from torchtitan_lite.data.batches import host_count, original_message
from torchtitan_lite.distributed.context_parallel import context_parallel_step
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
    local_device,
    set_collective_timeout,
    set_seed,
)
from torchtitan_lite.errors import ConfigError, UserError
from torchtitan_lite.evaluation import evaluate
from torchtitan_lite.ids import IdPolicy, check_special_ids
from torchtitan_lite.logging import logger
from torchtitan_lite.models.attention import build_attention_mask, document_ids, document_positions
from torchtitan_lite.models.llama3.model import Transformer
from torchtitan_lite.models.loss import cross_entropy_sum
from torchtitan_lite.run_mode import RunMode
from torchtitan_lite.tokenizer import tokenizer_from_config


class Trainer:
    def __init__(
        self, config: JobConfig, config_path: str | None = None, mode: RunMode | None = None
    ) -> None:
        """``mode``: what this build does for real (default: a training run; the dry run
        passes its own: the same sequence with fake tensors, nothing written or loaded)."""
        self.config, self.mode = config, mode or RunMode()
        tc, mc = config.training, config.model

        # 1. Device, process group, parallel layout and mesh.
        self.device = self.mode.device(tc.device)
        self.rank, self.world_size = init_distributed(self.device, config.comm.init_timeout_seconds)
        self.device = local_device(self.device)
        self.host_memory = self.mode.host_memory(self.device, tc.cpu_reuse_freed_memory)
        self.param_dtype, self.param_dtype_reason = self.mode.param_dtype(
            tc.mixed_precision_param, self.device
        )
        pc = config.parallelism
        self.parallel_dims = ParallelDims(
            dp_replicate=pc.data_parallel_replicate_degree,
            dp_shard=pc.data_parallel_shard_degree,
            world_size=self.world_size,
            tp=pc.tensor_parallel_degree,
            cp=pc.context_parallel_degree,
        )
        self.mesh = self.parallel_dims.build_mesh(self.device.type)
        self.dp_rank = dp_rank(self.mesh)  # which data this rank reads (a TP group: the same)
        config.validate(data_parallel=self.parallel_dims.dp)  # the rules that need the world

        # 2. The run folder: everything the run writes lands here.
        self.dump_folder = self.mode.run_folder(config, self.rank)
        for warning in config.warnings():  # works, but probably not as meant
            logger.warning(warning)

        # 3. Seed: the same on every rank, so initial weights agree before sharding.
        set_seed(tc.seed, tc.deterministic)

        # 4. The tokenizer first (its special ids: the single source of truth); the id policy.
        self.tokenizer = tokenizer_from_config(
            config.tokenizer, hf_folder=config.checkpoint.initial_load_hf
        )
        self.id_policy = IdPolicy.of_config(config)

        # 5. Data: this rank's rows of each global step of the one stream, in micro-batches.
        rows = tc.local_batch_size * self.parallel_dims.dp  # one step without accumulation
        self.global_batch = tc.global_batch_size if tc.global_batch_size > 0 else rows
        self.grad_accum_steps = self.global_batch // rows  # validate() checked it divides
        self.dataloader = build_dataloader(
            config.data,
            self.tokenizer,
            seq_len=tc.seq_len,
            batch_size=tc.local_batch_size,
            dp_rank=self.dp_rank,
            dp_world_size=self.parallel_dims.dp,
            micro_batches=self.grad_accum_steps,
            seed=tc.seed,
            validation=config.validation,
        )
        # Chat data renders with the tokenizer's chat template (its ids were checked there).
        self.chat_template = getattr(self.dataloader.dataset, "template", None)

        # 6. The start (where the weights come from), the model args, the startup id check.
        self.start = resolve_start(config)
        self.model_args = build_model_args(config, self.tokenizer, self.start)
        a = self.model_args
        check_tensor_parallel(self.parallel_dims.tp, a, tc.seq_len // self.parallel_dims.cp)
        self.mode.check_step_fits(
            a,
            self.device,
            seq_len=tc.seq_len // self.parallel_dims.cp,  # a CP rank holds its share
            local_batch_size=tc.local_batch_size,
            ac_mode=config.activation_checkpoint.mode,
            param_dtype=self.param_dtype,
            shards=self.parallel_dims.dp_shard * self.parallel_dims.cp,  # FSDP: shard × cp
            tp=self.parallel_dims.tp,
        )
        for warning in check_special_ids(
            self.tokenizer,
            model_args=a,
            data_eos_id=self.dataloader.dataset.eos_id,
            policy=self.id_policy,
        ):
            logger.warning(warning)
        self.attn_backend = self.mode.attn_backend(mc.attn_backend, self.device)
        self.context_parallel = context_parallel_step(
            self.mesh, config, self.attn_backend, a, self.device, self.mode.builds_masks
        )

        # 7–8. The model, its optimizer and learning-rate schedule.
        self.build_model()

        # 9. Checkpoints, and the weights the run starts from.
        self.step, self.tokens_seen = 0, 0
        self.divergence = DivergenceGuard(tc.skip_nonfinite_steps)
        self.checkpointer = CheckpointManager(
            config=config,
            dump_folder=self.dump_folder,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            dataloader=self.dataloader,
            manifest=weights_manifest(self.tokenizer, a, self.start, self.id_policy),
            id_policy=self.id_policy,
            mesh=self.mesh,
        )
        self.mode.load_start(self)

        # 10. Metrics: the step line, metrics.jsonl and TensorBoard.
        self.metrics = self._metrics_logger()
        log_banner(self, config_path)

    def build_model(self) -> None:
        """The model on the meta device (no memory), parallelized (TP → AC → compile →
        FSDP2), materialized and initialized; its optimizer and learning-rate schedule."""
        c = self.config
        with torch.device("meta"):
            model = Transformer(self.model_args)
        self.num_params = sum(p.numel() for p in model.parameters())
        parallel = lambda m: parallelize(m, self.mesh, c, self.attn_backend, self.param_dtype)  # noqa: E731
        self.model = self.mode.materialize(model, parallel, self.device, self.num_params)
        with self.mode.tensors():
            self.model.train()
            self.optimizer = build_optimizer(self.model, c.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, c.training.steps, c.lr_scheduler)

    def _metrics_logger(self) -> MetricsLogger:
        """The step log; rank 0's metrics.jsonl; TensorBoard from rank 0 (or all, tb/rank_N)."""
        mx = self.config.metrics
        writes = self.mode.writes and (self.rank == 0 or not mx.rank_0_only)
        tb = self.dump_folder / mx.save_tb_folder
        if not mx.rank_0_only:
            tb = tb / f"rank_{self.rank}"
        peak, self.peak_source = peak_tflops(self.device, mx.peak_tflops)
        return MetricsLogger(
            self.model_args,
            self.device,
            peak=peak,
            tb_folder=tb if writes and mx.enable_tensorboard else None,
            jsonl_path=self.dump_folder / "metrics.jsonl" if writes and self.rank == 0 else None,
            show_trained=self.chat_template is not None,
            devices_per_batch=self.parallel_dims.tp * self.parallel_dims.cp,
            position=self.dataloader.position,
        )

    def load_start(self) -> None:
        """Load what :attr:`start` names: the run's own checkpoint (train state included), or
        the weights of ``initial_load_path`` / ``initial_load_hf`` as step 0."""
        if self.start.kind == "resume":
            state, loaded = self.checkpointer.load(self.start, self.tokenizer)
            self.start = self.start.loaded(loaded)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        elif self.start.kind in ("checkpoint", "hf"):
            self.checkpointer.load_initial(self.start, self.tokenizer, self.model_args)
        elif self.config.data.is_chat:
            logger.warning(
                "chat fine-tuning from randomly initialized weights: set "
                "checkpoint.initial_load_path (a pretraining checkpoint) or "
                "checkpoint.initial_load_hf (a Hugging Face model) to fine-tune a trained model"
            )

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

    def documents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's ``(B, S)`` document ids on the host, computed once per batch (when it
        is read): they feed the metrics, the mask and the per-document positions."""
        if "documents" not in batch:
            batch["documents"] = document_ids(batch["input"], self.model_args.eos_id)
        return batch["documents"]

    def attention_mask(
        self,
        batch: dict[str, torch.Tensor],
        tokens: torch.Tensor | None = None,
        docs: torch.Tensor | None = None,
    ):
        """The batch's mask, built once and shared by all layers, from its document ids: flex
        builds its BlockMask on the device (``tokens`` and ``docs``: the batch's tokens and
        document ids already there, when given); sdpa cuts its segments on the host (no
        device→host read), placing their small masks on the device.

        A dry run's fake step attends causally (None; ``DryRunMode`` says why)."""
        if not self.mode.builds_masks:
            return None
        a = self.model_args
        if self.attn_backend != "flex":
            tokens, docs = batch["input"], self.documents(batch)
        else:
            if tokens is None:
                tokens = batch["input"].to(self.device, non_blocking=True)
            if docs is None:
                docs = self.documents(batch).to(self.device, non_blocking=True)
        return build_attention_mask(
            tokens, a.eos_id, a.attn_mask_type, self.attn_backend, device=self.device, docs=docs
        )

    def loss_sum(self, batch: dict[str, torch.Tensor], mask=None) -> torch.Tensor:
        """Summed token loss of one micro-batch (its mask built here unless given): training,
        validation and the dry run all go through here."""
        if self.context_parallel is not None:  # this rank's share of the sequence, and mask
            local = self.context_parallel.shard(batch, self.documents(batch))
            return self._forward_loss(*local)
        inputs = batch["input"].to(self.device, non_blocking=True)  # (B, S)
        labels = batch["labels"].to(self.device, non_blocking=True)  # (B, S)
        per_document = self.config.data.reset_position_ids
        docs = None  # (B, S) on the device, where the mask or the positions need them
        if self.attn_backend == "flex" or per_document:
            docs = self.documents(batch).to(self.device, non_blocking=True)
        mask = self.attention_mask(batch, inputs, docs) if mask is None else mask
        eos_id = self.model_args.eos_id
        positions = document_positions(inputs, eos_id, docs=docs) if per_document else None
        return self._forward_loss(inputs, labels, mask, positions)

    def _forward_loss(self, inputs, labels, mask, positions) -> torch.Tensor:
        if tp_mesh(self.mesh) is None:  # the model computes the loss chunk by chunk
            return self.model(inputs, mask, positions=positions, labels=labels)
        # Tensor parallel: vocabulary-sharded logits (loss parallel), or gathered ones. Loss
        # parallel returns the loss as a DTensor replicated over the TP ranks: its local value
        # is the whole loss (and stays differentiable).
        loss = cross_entropy_sum(self.model(inputs, mask, positions=positions), labels)
        return loss.to_local() if isinstance(loss, DTensor) else loss

    def evaluate(self) -> dict[str, float]:
        """Loss and perplexity over the validation data (see :func:`evaluation.evaluate`)."""
        return evaluate(self)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over the micro-batches; returns (loss, grad norm).

        The loss is normalized by the number of valid targets over all micro-batches and all
        ranks, so accumulation and data parallelism give the gradient of one big batch. That
        count comes from the host copies of the labels and is summed over ranks on the CPU
        backend, so the device queue never waits for it; the step reads the device once.
        """
        valid = sum(host_count(b["labels"] != IGNORE_INDEX) for b in micro_batches)
        global_valid = max(host_count(self._data_sum(torch.tensor([valid]), whole_batch=True)), 1)
        # FSDP averages gradients over the data-parallel (× context-parallel) ranks; undo it.
        scale = self.parallel_dims.dp * self.parallel_dims.cp / global_valid
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            loss_sum += self.forward_backward_step(batch, scale)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.config.training.max_norm)
        loss = self._data_sum(loss_sum) / global_valid
        # The one device→host sync of the step: the divergence guard must see the loss and
        # the norm before the optimizer applies the update. Both come back in one transfer.
        loss_value, norm_value = torch.stack([loss, grad_norm.float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)  # no update from this step
            self.divergence.skip(self.step, loss_value, norm_value)
            return loss_value, norm_value
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return loss_value, norm_value

    def _data_sum(self, value: torch.Tensor, whole_batch: bool = False) -> torch.Tensor:
        """Sum over the data-parallel ranks. The ranks of a tensor-parallel group read the same
        batch and hold the same loss, so the sum over the world counts each ``tp`` times; a
        count of the ``whole_batch`` is held by its context-parallel ranks too (``tp × cp``)."""
        total = all_reduce_sum(value)
        copies = self.parallel_dims.tp * (self.parallel_dims.cp if whole_batch else 1)
        return total // copies if not total.is_floating_point() else total / copies

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

    def _next_step(self, data_iter) -> list[dict[str, torch.Tensor]] | None:
        """This rank's micro-batches of the next step (None when finite data is exhausted),
        with their host-side metrics recorded."""
        start = time.perf_counter()
        try:
            step = next(data_iter)
        except StopIteration:
            return None
        except UserError as e:  # raised in a loader worker: drop its traceback
            raise type(e)(original_message(str(e))) from None
        seconds = (time.perf_counter() - start) / self.grad_accum_steps
        a = self.model_args
        micro_batches = []
        for inputs, labels in zip(step["input"], step["labels"], strict=True):
            batch = {"input": inputs, "labels": labels}
            self.metrics.add_batch(
                inputs,
                attention_pairs(inputs, a.eos_id, a.attn_mask_type, self.documents(batch)),
                seconds,
                trained=host_count(labels != IGNORE_INDEX),
            )
            micro_batches.append(batch)
        self.metrics.set_position(self.dataloader.position)
        # every input position (padding included)
        self.tokens_seen += step["input"].numel() * self.parallel_dims.dp
        return micro_batches

    def _train(self, stop_requested, gc: GarbageCollection) -> list[float]:
        data_iter = iter(self.dataloader)
        try:
            return self._train_loop(data_iter, stop_requested, gc)
        finally:
            data_iter.close()  # stops the loader's worker processes now

    def _train_loop(self, data_iter, stop_requested, gc: GarbageCollection) -> list[float]:
        tc = self.config.training
        losses: list[float] = []
        first_step = self.step + 1
        logger.info(f"training {tc.steps} steps")
        self.metrics.reset()
        with maybe_profile(self.config, self.dump_folder, self.rank) as profiler:
            while self.step < tc.steps:
                lr = self.lr_scheduler.get_last_lr()[0]
                micro_batches = self._next_step(data_iter)
                if micro_batches is None:
                    done = f"data exhausted after step {self.step} (data.infinite = false)"
                    logger.info(f"{done}; stopping")
                    return losses
                self.step += 1
                gc.step(self.step)
                loss, grad_norm = self.train_step(micro_batches)
                losses.append(loss)
                if self.step == first_step:
                    # Start-up (compilation, loading, warm-up) is over: hung ranks now fail fast.
                    set_collective_timeout(self.config.comm.train_timeout_seconds)
                if self.step % self.config.metrics.log_freq == 0 or self.step == tc.steps:
                    self.metrics.log(self.step, loss, grad_norm, lr)
                if profiler is not None:
                    profiler.step()
                vc = self.config.validation
                if vc.enable and (self.step % vc.freq == 0 or self.step == tc.steps):
                    start = time.perf_counter()
                    result = self.evaluate()
                    self.metrics.log_validation(self.step, result, time.perf_counter() - start)
                saved = False
                diverging = self.divergence.skipped_step(self.step)
                if self.checkpointer.should_save(self.step, tc.steps) and not diverging:
                    model_only = (
                        self.step == tc.steps and self.config.checkpoint.last_save_model_only
                    )
                    self.checkpointer.save(self.step, self.tokens_seen, model_only=model_only)
                    saved = True
                if self.step < tc.steps and any_rank(stop_requested()):
                    if self.config.checkpoint.enable and not saved and not diverging:
                        self.checkpointer.save(self.step, self.tokens_seen)
                    outcome = (
                        "; checkpoint saved, the same command resumes here"
                        if self.config.checkpoint.enable
                        else " (checkpoint.enable is off: nothing saved)"
                    )
                    logger.warning(f"stopping at step {self.step} on a signal{outcome}")
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
