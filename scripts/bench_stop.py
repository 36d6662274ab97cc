"""Does the fine-tuned model stop on its own? The README's fine-tuning flow, run as written,
then measured with ``transformers`` as the client.

1. pretrain the debug model (``train_configs/debug_model.toml --checkpoint.enable``);
2. fine-tune it on the embedded conversations (``train_configs/debug_sft.toml`` from that
   checkpoint);
3. export the last step (``scripts/convert_to_hf.py``);
4. for every conversation the SFT run held out for validation (it never trained on them),
   ``transformers`` generates greedily from the first question, rendered by the export's own
   chat template, with nothing forced: the answer stops when it ends with one of the export's
   stop ids within the answer budget. The same weights are then generated with only the base
   model's scalar eos (``<|end_of_text|>``), as an export that drops ``<|eot_id|>`` would.

Prints both fractions and the CPU minutes of each stage (the figures in docs/benchmarks.md).

Usage::

    python scripts/bench_stop.py                    # the whole flow in a temporary folder
    python scripts/bench_stop.py --export DIR       # measure an existing export only
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu_minutes() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) / 60


def _run(stage: str, *args: str) -> None:
    """One command of the flow, from the repository root; its CPU and wall minutes."""
    cpu, wall = _cpu_minutes(), time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    print(
        f"| {stage} | {(time.perf_counter() - wall) / 60:.2f} | {_cpu_minutes() - cpu:.2f} |",
        flush=True,
    )


def run_flow(folder: Path) -> Path:
    """The README's three commands, with their output under ``folder``."""
    print("| stage | wall minutes | CPU minutes |\n|---|---|---|")
    pre, sft, export = folder / "debug_model", folder / "debug_sft", folder / "hf_sft"
    _run(
        "pretrain",
        "train.py",
        "--config",
        "train_configs/debug_model.toml",
        "--checkpoint.enable",
        "--job.dump_folder",
        str(pre),
    )
    _run(
        "chat fine-tuning",
        "train.py",
        "--config",
        "train_configs/debug_sft.toml",
        "--checkpoint.initial_load_path",
        str(pre / "checkpoint" / "step-10"),
        "--job.dump_folder",
        str(sft),
    )
    steps = max(int(p.name.split("-")[1]) for p in (sft / "checkpoint").glob("step-*"))
    _run(
        "export",
        "scripts/convert_to_hf.py",
        str(sft / "checkpoint" / f"step-{steps}"),
        str(export),
    )
    return export


def held_out_questions(config_path: Path) -> list[list[dict]]:
    """Every conversation the SFT config's validation split holds out, up to its first
    answer (a system prompt, if any, and the first question)."""
    from torchtitan_lite.config import load_config
    from torchtitan_lite.data.sources import DocumentSource, Split

    config = load_config(config_path)
    data = config.data
    held_out = Split(config.validation.split_fraction, validation=True)
    source = DocumentSource(
        str(REPO / data.path), data.format, data.messages_field, select=held_out
    )
    questions = []
    for conversation in (d.text for d in source):
        first_answer = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        questions.append(conversation[:first_answer])
    return questions


def stop_fraction(model, tokenizer, questions, stop_ids, budget: int) -> tuple[float, float]:
    """(fraction of greedy answers that end with a stop id within ``budget`` tokens, mean
    answer length)."""
    import torch

    stopped, lengths = 0, []
    for messages in questions:
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                prompt,
                max_new_tokens=budget,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=model.generation_config.pad_token_id,
            )
        answer = out[0, prompt.shape[1] :].tolist()
        lengths.append(len(answer))
        stopped += bool(answer) and answer[-1] in stop_ids
    return stopped / len(questions), sum(lengths) / len(lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", type=Path, help="an export to measure (default: run the flow)")
    p.add_argument("--budget", type=int, default=64, help="answer budget in tokens")
    args = p.parse_args()
    os.chdir(REPO)
    tmp = None
    export = args.export
    if export is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_stop_")
        export = run_flow(Path(tmp.name))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    questions = held_out_questions(REPO / "train_configs" / "debug_sft.toml")
    stops = model.generation_config.eos_token_id
    base_eos = tokenizer.eos_token_id
    print(f"\n{len(questions)} held-out questions, greedy, answer budget {args.budget}")
    print("| stop ids | stopped on its own | mean answer tokens |\n|---|---|---|")
    cases = ((f"the export's {stops}", stops), (f"base scalar eos [{base_eos}]", [base_eos]))
    for name, ids in cases:
        fraction, length = stop_fraction(model, tokenizer, questions, ids, args.budget)
        print(f"| {name} | {fraction:.0%} | {length:.1f} |", flush=True)


if __name__ == "__main__":
    main()
