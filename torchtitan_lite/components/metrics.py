"""Throughput, MFU (dense and sparsity-aware), memory, and the per-step log line."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from torchtitan_lite.gpus import PEAK_BF16_TFLOPS
from torchtitan_lite.logging import logger
from torchtitan_lite.models.attention import document_ids
from torchtitan_lite.models.llama3.args import ModelArgs


def peak_tflops(device: torch.device, configured: float) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s for MFU, where it came from); None when unknown."""
    if configured > 0:
        return configured, "metrics.peak_tflops"
    if device.type != "cuda":
        return None, f"no peak known for {device.type}: set metrics.peak_tflops for MFU"
    name = torch.cuda.get_device_name(device).strip()
    if name in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[name], f"{name}, dense bf16"
    return None, (
        f"no peak known for {name!r}: set metrics.peak_tflops to its dense bf16 TFLOP/s for MFU"
    )


def attention_pairs(
    tokens: torch.Tensor, eos_id: int, mask_type: str, docs: torch.Tensor | None = None
) -> int:
    """Unmasked (query, key) pairs of a batch: Σ L(L+1)/2 over documents, or per row.

    Host work on host tokens (the loader's batch; ``docs``: its document ids, when already
    computed), counted with numpy: no device sync."""
    batch, seq_len = tokens.shape
    if mask_type == "causal":
        return batch * seq_len * (seq_len + 1) // 2
    docs = document_ids(tokens, eos_id) if docs is None else docs
    docs = docs.numpy()  # (B, S), non-decreasing along each row
    lengths = np.bincount((docs + np.arange(batch)[:, None] * seq_len).ravel())
    return int((lengths * (lengths + 1) // 2).sum())


class FlopCounter:
    """Training FLOPs (forward + backward) of a batch.

    Matmuls: 6 FLOPs per parameter per token (embedding lookups excluded). Attention: 12·d per
    (query, key) pair per head per layer — the dense count charges every token all S keys
    (the usual MFU formula); the kept count charges only the pairs the mask keeps.
    """

    def __init__(self, args: ModelArgs) -> None:
        self.dense_per_token = 6 * args.num_params(include_embedding=False)
        head_dim = args.dim // args.n_heads
        self.attn_per_pair = 12 * args.n_layers * args.n_heads * head_dim

    def dense(self, tokens: int, seq_len: int) -> float:
        return tokens * (self.dense_per_token + self.attn_per_pair * seq_len)

    def kept(self, tokens: int, pairs: int) -> float:
        return tokens * self.dense_per_token + self.attn_per_pair * pairs


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """One log line every ``log_freq`` steps, and TensorBoard scalars."""

    def __init__(
        self,
        args: ModelArgs,
        device: torch.device,
        *,
        peak: float | None,
        tb_folder: Path | None,
        jsonl_path: Path | None = None,
        show_trained: bool = False,
        devices_per_batch: int = 1,
        position: dict | None = None,
    ) -> None:
        """``show_trained``: the step line also gives the supervised targets per second (chat
        data, where most positions are prompt or padding and carry no loss).
        ``devices_per_batch``: the tensor-parallel degree; the ranks of a TP group compute one
        batch together, so each device's share of its tokens (and FLOPs) is ``1 / tp``.
        ``position``: the data stream's position the run starts from (a resumed run's), so
        that the first line's mixture counts only the rows read since."""
        self.flops = FlopCounter(args)
        self.devices_per_batch = devices_per_batch
        self.show_trained = show_trained
        self.device = device
        self.peak = peak
        self.jsonl_path = jsonl_path
        self.position: dict | None = None  # the data stream's, after the last step read
        # rows per source at the last log line (or at the start)
        self.logged_rows: dict[str, int] = dict(position["taken"]) if position else {}
        self.writer = None
        if tb_folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_folder))
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.trained = 0
        self.pairs = 0
        self.data_seconds = 0.0
        self.steps = 0
        self.seq_len = 1
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add_batch(
        self, tokens: torch.Tensor, pairs: int, data_seconds: float, trained: int = 0
    ) -> None:
        """``tokens``: the batch's input positions (all computed on, padding included);
        ``trained``: its loss targets."""
        self.tokens += tokens.numel()
        self.trained += trained
        self.seq_len = tokens.shape[1]
        self.pairs += pairs
        self.data_seconds += data_seconds

    def set_position(self, position: dict) -> None:
        """The data stream's position after the step just read (the same on every rank):
        the rows each source has given, and each source's epoch."""
        self.position = position

    def _data_metrics(self) -> tuple[dict, str]:
        """Per source: tokens seen so far (``tokens_NAME``: rows × seq_len, all ranks) and
        epoch; with several sources, each one's share of the rows since the last line."""
        if self.position is None:
            return {}, ""
        taken, sources = self.position["taken"], self.position["sources"]
        first = next(iter(sources.values()))
        metrics: dict = {"epoch": first["epoch"]}
        for name, rows in taken.items():
            metrics[f"tokens_{name}"] = rows * self.seq_len
        if len(taken) == 1:
            self.logged_rows = dict(taken)
            return metrics, ""
        new = {n: rows - self.logged_rows.get(n, 0) for n, rows in taken.items()}
        self.logged_rows = dict(taken)
        total = max(sum(new.values()), 1)
        for name, state in sources.items():
            metrics[f"epoch_{name}"] = state["epoch"]
        return metrics, "  mix: " + " ".join(f"{n} {100 * k / total:.0f}%" for n, k in new.items())

    def log(self, step: int, loss: float, grad_norm: float, lr: float) -> dict:
        # Per device: the tp ranks of a TP group share the batch, so each did 1/tp of the work.
        elapsed = time.perf_counter() - self.start
        share = elapsed * self.devices_per_batch
        dense = self.flops.dense(self.tokens, self.seq_len) / share / 1e12
        kept = self.flops.kept(self.tokens, self.pairs) / share / 1e12
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_second": self.tokens / share,
            "trained_tokens_per_second": self.trained / share,
            "tflops": dense,
            "tflops_kept": kept,
            "memory_gib": peak_memory_gib(self.device),
            "data_loading_pct": 100 * self.data_seconds / elapsed,
        }
        data, mix = self._data_metrics()
        metrics.update(data)
        if self.peak:
            metrics["mfu_pct"] = 100 * dense / self.peak
            metrics["mfu_kept_pct"] = 100 * kept / self.peak
            mfu = f"mfu: {metrics['mfu_pct']:.1f}% (kept {metrics['mfu_kept_pct']:.1f}%)"
        else:
            mfu = "mfu: n/a"
        trained = (
            f" (trained {metrics['trained_tokens_per_second']:,.0f})" if self.show_trained else ""
        )
        logger.info(
            f"step: {step:>4}  loss: {loss:8.4f}  grad_norm: {grad_norm:7.4f}  lr: {lr:.2e}  "
            f"memory: {metrics['memory_gib']:5.2f}GiB  tps: {metrics['tokens_per_second']:,.0f}"
            f"{trained}  tflops: {dense:.3f} (kept {kept:.3f})  {mfu}  data: "
            f"{metrics['data_loading_pct']:.1f}%{mix}"
        )
        self._write("train", step, metrics, metrics)
        self.reset()
        return metrics

    def log_validation(self, step: int, result: dict, seconds: float) -> None:
        """The validation line and scalars (per source too, ``validation_NAME_loss``, when
        there are several); its time is left out of the training tokens/s."""
        self.start += seconds
        sources = result.get("sources", {})
        each = "".join(f", {n} {r['loss']:.4f}" for n, r in sources.items())
        logger.info(
            f"validation: step {step:>4}  loss: {result['loss']:8.4f}  perplexity: "
            f"{result['perplexity']:,.2f}  ({result['targets']:,} targets, "
            f"{result['batches']} batches per rank{each}, {seconds:.1f}s)"
        )
        scalars = {"loss": result["loss"], "perplexity": result["perplexity"]}
        for name, r in sources.items():
            scalars.update({f"{name}_loss": r["loss"], f"{name}_perplexity": r["perplexity"]})
        self._write("validation", step, scalars, {f"validation_{k}": v for k, v in scalars.items()})

    def _write(self, group: str, step: int, scalars: dict, record: dict) -> None:
        """TensorBoard scalars ``group/key`` and one metrics.jsonl record."""
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{group}/{key}", value, step)
            self.writer.flush()
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
