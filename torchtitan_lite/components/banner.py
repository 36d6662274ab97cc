"""The startup banner a run logs before its first step."""

from __future__ import annotations

from torchtitan_lite.config import to_toml
from torchtitan_lite.logging import logger


def log_banner(trainer, config_path: str | None) -> None:
    """The startup banner: the config, the world and its layout, the precision, the
    tokenizer's ids, the model, the mask and its kernel, the data — what a reader of the log
    needs to trust (or question) the run before its first step.

    ``trainer`` is the ``Trainer`` just built; its attributes are read, nothing is changed.
    (Not type-annotated: this module sits below the trainer and does not import it.)"""
    t, a, c = trainer.tokenizer, trainer.model_args, trainer.config
    logger.info(f"torchtitan_lite: {c.job.description}")
    written = (
        "dry run: nothing written but dry_run.json"
        if not trainer.mode.writes
        else f"resolved {trainer.dump_folder / 'config.toml'}"
    )
    logger.info(f"config {config_path or '(defaults)'} -> {written}")
    if c.job.print_config:
        for line in to_toml(c).splitlines():
            if line:
                logger.info(f"  {line}")
    pd = trainer.parallel_dims
    tp = ""
    if pd.tp > 1:
        loss = "loss parallel" if c.parallelism.loss_parallel else "logits gathered"
        tp = f" × tensor parallel {pd.tp} (sequence parallel, {loss})"
    cp = ""
    if trainer.context_parallel is not None:
        step = trainer.context_parallel
        cp = (
            f" × context parallel {pd.cp} ({step.balance}, {step.chunks_per_rank} chunk(s) per "
            f"rank, K/V all-gathered; FSDP over shard × cp)"
        )
    logger.info(
        f"world: {trainer.world_size} process(es) on {trainer.device.type}, data parallel "
        f"replicate {pd.dp_replicate} × shard {pd.dp_shard}{cp}{tp} "
        f"({'HSDP' if pd.dp_replicate > 1 else 'FSDP2'}{' + CP' if cp else ''}"
        f"{' + TP' if tp else ''})"
    )
    logger.info(
        f"precision: params {trainer.param_dtype} ({trainer.param_dtype_reason}), gradient "
        f"reduce {c.training.mixed_precision_reduce}"
    )
    if trainer.device.type == "cpu":
        logger.info(f"host memory: {trainer.host_memory}")
    pad = "none" if t.pad_id is None else f"{t.pad_id} {t.id_to_token(t.pad_id)!r}"
    logger.info(
        f"tokenizer {t.path} ({t.kind}, sha256 {t.file_sha256[:12]}): vocab {t.vocab_size}, "
        f"bos {t.bos_id} {t.id_to_token(t.bos_id)!r}, eos {t.eos_id} {t.eos_token!r}, "
        f"pad {pad}, stop ids {t.stop_ids}"
    )
    shape_source = (
        f"shaped by {trainer.start.describe()}" if trainer.start.shape else c.model.flavor
    )
    logger.info(
        f"model {c.model.name} {shape_source}: {a.n_layers} layers, dim {a.dim}, "
        f"{a.n_heads} heads ({a.n_kv_heads or a.n_heads} kv), FFN {a.hidden_dim}, vocab "
        f"{a.vocab_size}, eos {a.eos_id}, {trainer.num_params / 1e6:,.1f}M parameters"
        + (", tied embeddings" if a.tie_word_embeddings else "")
    )
    kernel = trainer.attn_backend
    if kernel == "flex" and trainer.device.type == "cuda":
        kernel += (
            ", compiled with each block"
            if c.compile.enable
            else f", compiled on its own (mode {c.compile.flex_mode})"
        )
    scaling = (
        f"Llama 3.1 scaling ×{a.rope_scaling_factor:g} (original context {a.rope_original_max_len})"
        if a.rope_scaling_factor > 0
        else "no scaling"
    )
    logger.info(f"RoPE: theta {a.rope_theta:g}, {scaling} ({trainer.start.describe()})")
    logger.info(
        f"attention mask {a.attn_mask_type} (document boundary: eos id {a.eos_id}),"
        f" kernel {kernel} on {trainer.device}"
    )
    logger.info(f"MFU peak: {trainer.peak_source}")
    shuffle = (
        f"documents shuffled {c.data.shuffle_window} at a time"
        if c.data.shuffle_window
        else "file order"
    )
    logger.info(
        f"data {c.data.summary()}: seq_len {c.training.seq_len}, local batch "
        f"{c.training.local_batch_size}, global batch {trainer.global_batch} (gradient "
        f"accumulation {trainer.grad_accum_steps}), one global stream ({shuffle}), "
        f"{c.data.num_workers} loader workers"
    )
    if trainer.chat_template is not None:
        d = c.data
        ids = ", ".join(f"{k} {v}" for k, v in trainer.chat_template.special_ids().items())
        logger.info(
            f"chat template (Llama 3): {ids}, pad {trainer.dataloader.dataset.pad_id}; "
            f"{'packed (block-causal between conversations)' if d.packing else 'padded'}"
            f", loss on {'every token' if d.train_on_prompt else 'the assistant turns'}; "
            "tps counts every input position, 'trained' the supervised targets"
        )
    vc = c.validation
    if vc.enable:
        source = vc.path or f"{vc.split_fraction:g} of each source, held out of training"
        steps = "all batches" if vc.steps < 0 else f"{vc.steps} batches"
        logger.info(f"validation: {source}, every {vc.freq} steps, {steps}")
    logger.info(
        "startup id check passed: tokenizer, model and data agree on vocab, bos, eos, pad"
        + (", and the chat template's ids are usable" if trainer.chat_template else "")
    )
