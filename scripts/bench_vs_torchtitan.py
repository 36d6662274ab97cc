"""CPU training step, side by side: torchtitan 0.1.0's debug model vs ours.

Every variant trains on the same packed batch of the embedded corpus (B=8, S=2048, vocab
2304). Each measurement runs in a fresh process (build, one warm-up step, then ``--steps``
timed steps, their median), and the variants take turns for ``--rounds`` rounds; the table
gives the median over rounds. Fresh processes keep the variants apart: our trainer changes
how the process's C library reuses freed memory (``training.cpu_reuse_freed_memory``), and
torchtitan is measured as it ships, with the C library's defaults.

* ``torchtitan 0.1.0``: its own ``Transformer`` debugmodel (dim 256, 6 layers, 16 heads) with
  plain causal SDPA in fp32, ``torch.optim.AdamW`` + gradient clipping — what its
  single-process CPU debug run does (no FSDP on one rank, so no mixed precision);
* ours, through ``Trainer.train_step``: ``block_causal`` and ``causal``, fp32; with
  ``cpu_reuse_freed_memory`` off (what the memory setting is worth); bf16 parameters only
  where this CPU multiplies bf16 natively (AVX512-BF16/AMX) — elsewhere bf16 is emulated,
  ~30x slower, not what ``auto`` picks, and skipped (the output says so); and with
  ``--compile``, the blocks compiled by inductor (``compile.enable``).

torchtitan is fetched from the package registry into ``--deps`` on first use (``torchtitan==
0.1.0`` without its dependencies, plus ``tyro`` and ``datasets`` that its imports need).

Usage::

    python scripts/bench_vs_torchtitan.py
    python scripts/bench_vs_torchtitan.py --rounds 3 --steps 2 --compile --deps /tmp/tt
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "debug_model.toml"
TORCHTITAN = "torchtitan 0.1.0 debugmodel, causal SDPA, fp32"
MEMORY_DEFAULTS = "ours block_causal, fp32, C library's memory defaults"


def ensure_torchtitan(deps: Path) -> None:
    if not (deps / "torchtitan").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps)]
        subprocess.run([*pip, "--no-deps", "torchtitan==0.1.0"], check=True)
        subprocess.run([*pip, "tyro", "datasets"], check=True)


def first_batch():
    """The debug config's first batch, from our loader (the same rows for every variant)."""
    from torchtitan_lite.config import load_config
    from torchtitan_lite.data import build_dataloader
    from torchtitan_lite.tokenizer import tokenizer_from_config

    config = load_config(CONFIG)
    tokenizer = tokenizer_from_config(config.tokenizer, path=REPO / config.tokenizer.path)
    loader = build_dataloader(
        config.data,
        tokenizer,
        seq_len=config.training.seq_len,
        batch_size=config.training.local_batch_size,
    )
    step = next(iter(loader))
    return {"input": step["input"][0], "labels": step["labels"][0]}, tokenizer


def torchtitan_step(deps: Path):
    import torch
    import torch.nn.functional as F

    sys.path.append(str(deps))
    from torchtitan.models.llama3 import llama3_configs
    from torchtitan.models.llama3.model.model import Transformer

    batch, tokenizer = first_batch()
    args = llama3_configs["debugmodel"]
    args.vocab_size, args.eos_id = tokenizer.vocab_size, tokenizer.eos_id
    args.max_seq_len = batch["input"].shape[1]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    opt = torch.optim.AdamW(
        model.parameters(), lr=8e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
    )

    def step() -> None:
        logits = model(batch["input"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad()

    return step


def our_step(overrides: list[str], dump: str):
    from torchtitan_lite.config import load_config
    from torchtitan_lite.trainer import Trainer

    batch, _ = first_batch()
    config = load_config(
        CONFIG,
        [
            "--job.dump_folder",
            dump,
            "--metrics.enable_tensorboard",
            "false",
            "--training.steps",
            "1000",
            *overrides,
        ],
    )
    trainer = Trainer(config)
    return lambda: trainer.train_step([batch])


def worker(spec: dict) -> None:
    """One measurement in this process: build, warm up, time ``spec['steps']`` steps."""
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as dump:
        if spec["name"] == TORCHTITAN:
            step = torchtitan_step(Path(spec["deps"]))
        else:
            step = our_step(spec["overrides"], dump)
        step()  # warm-up (and, compiled, the compilation)
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        if spec.get("profile"):
            import torch

            with torch.profiler.profile() as prof:
                step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(table, flush=True)
    print("RESULT " + json.dumps(statistics.median(times)), flush=True)


def variants(native_bf16: bool, compile_: bool) -> dict[str, list[str] | None]:
    """Name → our config overrides (None for torchtitan)."""
    fp32 = ["--training.mixed_precision_param", "float32"]
    bf16 = ["--training.mixed_precision_param", "bfloat16"]
    out: dict[str, list[str] | None] = {TORCHTITAN: None}
    if native_bf16:
        out["ours block_causal, bf16 params"] = bf16
        out["ours causal, bf16 params"] = [*bf16, "--model.attn_mask_type", "causal"]
    out["ours block_causal, fp32"] = fp32
    out["ours causal, fp32"] = [*fp32, "--model.attn_mask_type", "causal"]
    out[MEMORY_DEFAULTS] = [
        *fp32,
        "--training.cpu_reuse_freed_memory",
        "false",
    ]
    if compile_:
        best = "bf16 params" if native_bf16 else "fp32"
        out[f"ours block_causal, {best}, compiled blocks"] = [
            *(bf16 if native_bf16 else fp32),
            "--compile.enable",
            "true",
        ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--compile", action="store_true", help="also time compiled blocks")
    p.add_argument(
        "--profile",
        action="store_true",
        help="then profile one step of torchtitan and of our fp32 block_causal step (with and "
        "without the memory setting): the ops that take the time",
    )
    p.add_argument("--deps", type=Path, default=Path(tempfile.gettempdir()) / "torchtitan_010")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    import torch

    sys.path.insert(0, str(REPO))
    from torchtitan_lite.hardware import cpu_native_bf16, resolve_param_dtype

    ensure_torchtitan(args.deps)
    native, why = cpu_native_bf16()
    runs = variants(native, args.compile)

    def measure(name: str, profile: bool = False) -> tuple[float, str]:
        spec = {"name": name, "overrides": runs[name], "steps": args.steps, "profile": profile}
        spec["deps"] = str(args.deps)
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        lines = proc.stdout.splitlines()
        result = [line for line in lines if line.startswith("RESULT ")]
        if proc.returncode or not result:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        table = "\n".join(line for line in lines if not line.startswith(("RESULT ", "[titan]")))
        return json.loads(result[0].split(" ", 1)[1]), table

    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name in runs:
            times[name].append(measure(name)[0])
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    tokens = 8 * 2048
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median[TORCHTITAN]
    default = resolve_param_dtype("auto", torch.device("cpu"))[0]
    print(
        f"\nB=8, S=2048 ({tokens:,} tokens/step), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds × {args.steps} "
        f"steps; `auto` precision here: {default} ({why})"
    )
    if not native:
        print(f"bf16 variants skipped: {why} (emulated bf16 is ~30x slower than fp32)")
    print("\n| variant | step s | tokens/s | vs torchtitan |")
    print("|---|---|---|---|")
    for name, med in median.items():
        print(f"| {name} | {med:.2f} | {tokens / med:,.0f} | {base / med:.2f}x |")
    for dtype in ("bf16 params", "fp32") if native else ("fp32",):
        ratio = median[f"ours block_causal, {dtype}"] / median[f"ours causal, {dtype}"]
        print(f"\nblock_causal / causal step, {dtype}: {ratio:.2f}")
    if args.profile:
        for name in (TORCHTITAN, "ours block_causal, fp32", MEMORY_DEFAULTS):
            print(f"\nprofile of one step: {name}\n{measure(name, profile=True)[1]}")


if __name__ == "__main__":
    main()
