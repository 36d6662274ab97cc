"""The Trainer: ``__init__`` is the build sequence, read top to bottom."""

from __future__ import annotations

from pathlib import Path

import torch

from torchtitan_lite.config import JobConfig, to_toml
from torchtitan_lite.errors import ConfigError
from torchtitan_lite.ids import check_special_ids
from torchtitan_lite.logging import init_logger, logger
from torchtitan_lite.models.attention import resolve_backend
from torchtitan_lite.models.llama3.args import model_args_for
from torchtitan_lite.models.llama3.model import Transformer
from torchtitan_lite.tokenizer import load_tokenizer


class Trainer:
    def __init__(self, config: JobConfig, config_path: str | None = None) -> None:
        self.config = config
        # 1. The run folder: everything the run writes lands here.
        self.dump_folder = _make_dump_folder(config.job.dump_folder)
        init_logger(self.dump_folder / "train.log")
        (self.dump_folder / "config.toml").write_text(to_toml(config), encoding="utf-8")

        # 2. The tokenizer first: its special ids are the single source of truth.
        tc = config.tokenizer
        self.tokenizer = load_tokenizer(tc.path, tc.eos_token, tc.pad_token, tc.extra_stop_tokens)

        # 3. Model args take vocab_size and eos_id from the tokenizer, never from a default.
        mc = config.model
        self.model_args = model_args_for(
            mc.flavor, max_seq_len=config.training.seq_len, attn_mask_type=mc.attn_mask_type
        )
        self.model_args.update_from_tokenizer(
            self.tokenizer,
            vocab_size=mc.vocab_size,
            vocab_size_multiple_of=mc.vocab_size_multiple_of,
            eos_id=mc.eos_id,
        )

        # 4. The startup check: tokenizer, model args (and later data, checkpoint) agree.
        for warning in check_special_ids(
            self.tokenizer, model_args=self.model_args, allow_eot_boundary=tc.allow_eot_boundary
        ):
            logger.warning(warning)

        # 5. The model on the meta device: shapes only, no memory until it is materialized.
        self.device = _device(config.training.device)
        self.attn_backend = resolve_backend(mc.attn_backend, self.device)
        with torch.device("meta"):
            self.model = Transformer(self.model_args)
        self._log_banner(config_path)

    def _log_banner(self, config_path: str | None) -> None:
        t, a, c = self.tokenizer, self.model_args, self.config
        logger.info(f"torchtitan_lite: {c.job.description}")
        logger.info(
            f"config {config_path or '(defaults)'} -> resolved {self.dump_folder / 'config.toml'}"
        )
        if c.job.print_config:
            for line in to_toml(c).splitlines():
                if line:
                    logger.info(f"  {line}")
        pad = "none" if t.pad_id is None else f"{t.pad_id} {t.id_to_token(t.pad_id)!r}"
        logger.info(
            f"tokenizer {t.path} ({t.kind}, sha256 {t.file_sha256[:12]}): vocab {t.vocab_size}, "
            f"bos {t.bos_id} {t.id_to_token(t.bos_id)!r}, eos {t.eos_id} {t.eos_token!r}, "
            f"pad {pad}, stop ids {t.stop_ids}"
        )
        logger.info(
            f"model {c.model.name} {c.model.flavor}: {a.n_layers} layers, dim {a.dim}, "
            f"{a.n_heads} heads ({a.n_kv_heads or a.n_heads} kv), vocab {a.vocab_size}, "
            f"eos {a.eos_id}, {sum(p.numel() for p in self.model.parameters()) / 1e6:,.1f}M "
            "parameters"
        )
        logger.info(
            f"attention mask {a.attn_mask_type} (document boundary: eos id {a.eos_id}),"
            f" kernel {self.attn_backend} on {self.device}"
        )
        logger.info("startup id check passed: tokenizer and model agree on vocab, bos, eos, pad")


def _make_dump_folder(path: str) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"Config key 'job.dump_folder' is {path!r}, which cannot be written ({e.strerror}). "
            "Fix: point job.dump_folder at a writable folder, e.g. --job.dump_folder "
            f"./outputs."
        ) from None
    return folder


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "Config key 'training.device' is 'cuda', but no CUDA device is "
            'available. Fix: set training.device = "auto" or "cpu".'
        )
    return torch.device(choice)
