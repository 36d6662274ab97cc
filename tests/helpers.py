"""What several test modules share: asset paths, the small runs' arguments, the ways of starting
``train.py`` (in this process, in a subprocess, under ``torchrun``), reading a run's metrics, the
clean-error check, and small models and batches. Test modules import from here, never from each
other; fixtures stay in ``conftest.py``.

torch and the package are imported inside the functions that need them, so that ``conftest.py``
(and a run of ``tests/test_style.py`` alone) imports neither."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from torchtitan_lite.models.llama3.model import Transformer

REPO = Path(__file__).resolve().parents[1]
TIKTOKEN_2K = REPO / "assets" / "tokenizer" / "tiktoken_2k.model"
SPM_2K = REPO / "assets" / "tokenizer" / "spm_2k.model"
CORPUS = REPO / "assets" / "shakespeare.jsonl.gz"
CHAT_SAMPLE = REPO / "assets" / "shakespeare_chat.jsonl.gz"
DEBUG_CONFIG = REPO / "train_configs" / "debug_model.toml"

# ------------------------------------------------------------------ the small runs' arguments

#: Two steps of 64-token rows, no TensorBoard: a run that only has to start and finish.
FAST = [
    "--training.steps",
    "2",
    "--training.seq_len",
    "64",
    "--metrics.enable_tensorboard",
    "false",
]

#: 128-token rows, no TensorBoard.
SHORT_ROWS = ["--training.seq_len", "128", "--metrics.enable_tensorboard", "false"]

#: The 2-block, 64-wide flavor: for runs whose proof is "equal to another layout, process
#: count or an uninterrupted run", where the debug model's size would prove nothing more.
TINY = ["--model.flavor", "tiny"]

#: One global batch of 4 rows per step, in fp32 so that layouts agree to rounding.
FP32_BATCH_OF_4 = [
    "--training.global_batch_size",
    "4",
    "--training.mixed_precision_param",
    "float32",
    "--optimizer.lr",
    "2e-3",
]

#: :data:`FP32_BATCH_OF_4` of the :data:`TINY` model in every layout: each step's 4 rows of the one
#: global stream, read by 2 data-parallel ranks × 2 rows, or by 1 process in 2 accumulation
#: steps of 2 rows. The data-parallel and the tensor-parallel runs start from it.
GLOBAL_BATCH_OF_4 = ["--config", str(DEBUG_CONFIG), *TINY, *FP32_BATCH_OF_4, *SHORT_ROWS]

#: The checkpointing run: 8 fp32 steps of 2 rows of the :data:`TINY` model, checkpoints on.
#: The checkpoint, trust and reliability tests add the interval, the step count and the folder.
BASE = [
    "--config",
    str(DEBUG_CONFIG),
    *TINY,
    "--training.seq_len",
    "128",
    "--training.local_batch_size",
    "2",
    "--training.mixed_precision_param",
    "float32",
    "--metrics.enable_tensorboard",
    "false",
    "--optimizer.lr",
    "2e-3",
    "--checkpoint.enable",
    "--training.steps",
    "8",
]

# ------------------------------------------------------------------ starting train.py


def train_command(*args: str, nproc: int = 1) -> tuple[list[str], dict[str, str]]:
    """The command (plain python, or torchrun for several processes) and its environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        return [sys.executable, str(REPO / "train.py"), *args], env
    env["OMP_NUM_THREADS"] = "1"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "train.py"),
        *args,
    ], env


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``train.py ARGS`` in ``nproc`` processes (:func:`train_command`), run to the end."""
    cmd, env = train_command(*args, nproc=nproc)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Leg:
    """One run of :func:`torchrun_legs`: ``ENTRY ARGS`` (``train`` is ``train.py``;
    ``measure_step`` is ``scripts/measure_step.py``; ``tp_worker`` and ``cp_worker`` are
    those modules of ``tests/integration``), after ``copies``: ``(checkpoint step folder,
    destination)`` pairs copied in before it starts (to resume a checkpoint written by an
    earlier leg or run), and ``flips``: ``(file, fraction)``, a bit flipped in the byte that
    far into a file of the copies (damage the run must detect)."""

    args: Sequence[str]
    copies: Sequence[tuple[Path, Path]] = ()
    flips: Sequence[tuple[Path, float]] = ()
    entry: str = "train"


def torchrun_legs(
    nproc: int,
    legs: list[Leg],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """Several runs (:class:`Leg`), one after another, in one ``torchrun`` launch of ``nproc``
    processes (``tests/integration/legs_worker.py``); every leg must exit 0. For
    tests that compare layouts or resume across them: the interpreter, the imports and the
    first step's warm-up are paid once per launch, not once per run. ``env``: variables
    added to the launch's environment."""
    import tempfile

    plan = [
        {
            "entry": leg.entry,
            "args": list(leg.args),
            "copies": [[str(src), str(dst)] for src, dst in leg.copies],
            "flips": [[str(file), fraction] for file, fraction in leg.flips],
        }
        for leg in legs
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(plan, file)
    cmd, launch_env = train_command(nproc=nproc)
    cmd = cmd[:-1] + [str(REPO / "tests" / "integration" / "legs_worker.py"), file.name]
    launch_env.update(env or {}, PYTHONPATH=str(REPO))
    try:
        return subprocess.run(
            cmd, cwd=REPO, env=launch_env, capture_output=True, text=True, timeout=timeout
        )
    finally:
        os.unlink(file.name)


def run_train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess of its own, as a user runs it: for what needs
    a process (signals, kill -9, the exit status of a crash, start-up itself). One-process
    runs that need none go through :func:`run_main` instead."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``train.main(args)`` in this process, from the repository root, its stdout and stderr
    captured: the code path of ``python train.py ARGS`` after the imports, without a new
    interpreter importing torch for every run (what is put back afterwards:
    :func:`in_process`)."""
    import train

    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        return in_process("train.py", train.main, args)
    finally:
        os.chdir(cwd)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``scripts/NAME.py ARGS`` through its ``main()`` in this process, its stdout and stderr
    captured (a ``main`` that ends in a traceback raises here), as :func:`in_process`."""
    import importlib

    module = importlib.import_module(f"scripts.{name}")
    return in_process(f"{name}.py", module.main, args)


def in_process(name: str, main, args) -> subprocess.CompletedProcess:
    """``main(args)`` with its stdout and stderr captured.

    Put back afterwards: the RNG states (torch, numpy, random), torch's deterministic-algorithms
    switch, the logger's handlers (a run's log file is closed) and, after a crash, the process
    group. Left in place on purpose: glibc's malloc settings (a CPU run keeps freed memory for
    reuse; the test process then stays at its high-water mark), and what the run left on the
    heap (imported modules, torch's caches), frozen out of later garbage collections: each
    Trainer collects fully at start and end, which would otherwise walk this process's ever
    larger heap."""
    import contextlib
    import gc
    import io
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    from torchtitan_lite.logging import logger

    out, err = io.StringIO(), io.StringIO()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        if dist.is_initialized():  # a crash (a refused run already destroyed it)
            dist.destroy_process_group()
        gc.collect()
        gc.freeze()
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------ what a run leaves


def step_folder(run: Path, step: int) -> Path:
    """``RUN/checkpoint/step-STEP``: a run folder's checkpoint of one step."""
    return run / "checkpoint" / f"step-{step}"


def micro_batches(trainer, steps: int = 1) -> list[dict]:
    """The micro-batches of ``trainer``'s first ``steps`` steps, read from its loader."""
    out = []
    for step, _ in zip(trainer.dataloader, range(steps), strict=False):
        out += [
            {"input": i, "labels": lab}
            for i, lab in zip(step["input"], step["labels"], strict=False)
        ]
    return out


def metrics(folder: Path) -> list[dict]:
    """The records of ``FOLDER/metrics.jsonl``, in order."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one paragraph on stderr naming what is wrong, no Python traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------ files, models, batches


def write_ranks_file(path: Path, num_ranks: int) -> Path:
    """A valid tiktoken ranks file: the 256 bytes, then distinct multi-byte tokens."""
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    for rank in range(256, num_ranks):
        token = f"t{rank}".encode()
        lines.append(f"{base64.b64encode(token).decode()} {rank}")
    path.write_text("\n".join(lines) + "\n")
    return path


def debug_shaped_config(transformers, **settings):
    """A ``transformers.LlamaConfig`` in the debug model's shapes, with the embedded
    tokenizer's vocabulary and bos/eos."""
    return transformers.LlamaConfig(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=768,
        vocab_size=2304,
        rms_norm_eps=1e-5,
        bos_token_id=2048,
        eos_token_id=2049,
        tie_word_embeddings=False,
        **settings,
    )


def tiny_model(
    *, vocab_size: int, eos_id: int, n_kv_heads: int = 2, seed: int = 0, max_seq_len: int = 128
) -> Transformer:
    """A 2-layer, 64-wide model in eval mode, built on meta and initialized as training does."""
    import torch

    from torchtitan_lite.models.llama3.args import ModelArgs
    from torchtitan_lite.models.llama3.model import Transformer

    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        multiple_of=32,
        max_seq_len=max_seq_len,
        rope_theta=10000.0,
        vocab_size=vocab_size,
        eos_id=eos_id,
    )
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a plain tensor as it is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


#: The ids of :func:`packed_batch`'s rows: eos 0 in a vocabulary of the debug model's size.
EOS = 0
VOCAB = 2304


def packed_batch(seed: int, seq_len: int, batch: int = 2) -> torch.Tensor:
    """Rows with a layout that changes with the seed: no EOS, long and short documents,
    EOS at block edges, runs of EOS."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (batch, seq_len), generator=gen)
    kind = seed % 5
    if kind == 1:
        tokens[torch.rand(batch, seq_len, generator=gen) < 1 / 100] = EOS
    elif kind == 2:
        tokens[torch.rand(batch, seq_len, generator=gen) < 1 / 5] = EOS
    elif kind == 3:
        tokens[:, 127::128] = EOS
    elif kind == 4:
        tokens[:, seq_len // 3 : seq_len // 2] = EOS
    return tokens


def write_hf_tokenizer(
    folder: Path, ranks: Path = TIKTOKEN_2K, eos_token: str = "<|eot_id|>", pad_token=None
) -> Path:
    """A ``tokenizer.json`` + ``tokenizer_config.json`` for a tiktoken ranks file in the Llama 3
    layout, made by ``transformers`` itself (its tiktoken converter and ``save_pretrained``),
    with the bos/eos/pad names given: by default as a Llama 3 instruct model ships them
    (eos ``<|eot_id|>``, no pad)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from torchtitan_lite.tokenizer import LLAMA3_PATTERN, llama3_special_tokens

    specials = llama3_special_tokens()
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    backend.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token=eos_token,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(folder))
    return folder / "tokenizer.json"


#: Llama 3.1 / 3.2's RoPE scaling as their config.json states it (factor 8 for 3.1, 32 for 3.2).
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def published_llama_config(transformers, name: str, **overrides):
    """A ``transformers.LlamaConfig`` with the values of the published config.json of Llama 3.2
    1B / 3B or Llama 3.1 8B (the independent reference for the flavors and the configs)."""
    shapes = {
        "1B": dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            intermediate_size=8192,
            tie_word_embeddings=True,
        ),
        "3B": dict(
            hidden_size=3072,
            num_hidden_layers=28,
            num_attention_heads=24,
            intermediate_size=8192,
            tie_word_embeddings=True,
        ),
        "8B": dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            intermediate_size=14336,
            tie_word_embeddings=False,
        ),
    }
    factor = 8.0 if name == "8B" else 32.0
    settings = dict(
        num_key_value_heads=8,
        vocab_size=128256,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE_SCALING, "factor": factor},
        **shapes[name],
    )
    return transformers.LlamaConfig(**{**settings, **overrides})
