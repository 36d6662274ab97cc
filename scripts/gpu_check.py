"""GPU acceptance in one go: every check the CPU cannot make, with a report.

Run through ``bash scripts/gpu_check.sh`` (which checks the packages it needs). Each check
runs as a subprocess with its own time limit, in this order, and the report is rewritten
after each one, so a cut-off run still says what passed:

1. the GPU-marked tests (compiled flex forward + backward against SDPA under the dense oracle
   mask in fp32 and bf16, gradients too; zero recompiles over 5 compiled training steps; one
   device→host sync per step; context parallelism on one GPU: each of 4 CP ranks' query rows
   through compiled flex with its own BlockMask equal the matching rows of full attention at
   S = 32K, forward and backward);
2. a 30-step debug run (bf16, compiled flex, async checkpoints every 10 steps) whose loss
   falls;
3. a resume from its step-20 checkpoint that continues its loss trace over steps 21–30;
4. flex block_causal vs SDPA causal forward + backward at S=8192 with ~500-token documents;
5. an 8B-shaped slice (4 of its 32 blocks): tokens/s, dense and mask-kept MFU, peak memory,
   with the 8B config's activation checkpointing and without any.

Writes ``gpu_report.md`` (``--report``): pass/fail per check, the numbers, the device and
the torch version; the logs of every check go to ``--work`` (default: a temporary folder).
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

START = time.monotonic()  # the budget counts from here, the import of torch included

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "train_configs" / "debug_model.toml")


@dataclass
class Result:
    name: str
    ok: bool | None  # None: not run (time budget)
    numbers: str
    seconds: float
    log: str = ""


@dataclass
class Harness:
    work: Path
    report: Path
    deadline: float
    results: list[Result] = field(default_factory=list)

    def run(self, name: str, argv: list[str], limit: float) -> tuple[int, str, float]:
        """Run a command (from the repo root); returns (status, output, seconds)."""
        limit = min(limit, self.deadline - time.monotonic())
        if limit < 30:
            raise TimeoutError("time budget spent")
        log = self.work / f"{name}.log"
        start = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            proc = subprocess.run(
                argv,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=limit,
            )
            status, out = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            status, out = 124, e.stdout or ""
            if isinstance(out, bytes):
                out = out.decode(errors="replace")
            out += f"\n[gpu_check: stopped after {limit:.0f} s]"
        log.write_text(out)
        return status, out, time.monotonic() - start

    def add(self, result: Result) -> None:
        self.results.append(result)
        mark = {True: "pass", False: "FAIL", None: "not run"}[result.ok]
        print(f"== {result.name}: {mark} ({result.seconds:.0f} s) {result.numbers}", flush=True)
        self.write()

    def write(self) -> None:
        props = torch.cuda.get_device_properties(0)
        lines = [
            "# GPU acceptance report",
            "",
            f"- device: {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs)",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python "
            f"{sys.version.split()[0]}",
            f"- commit {_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- produced by `bash scripts/gpu_check.sh`",
            "",
            "| check | result | numbers | seconds |",
            "|---|---|---|---|",
        ]
        for r in self.results:
            mark = {True: "pass", False: "**FAIL**", None: "not run"}[r.ok]
            lines.append(f"| {r.name} | {mark} | {r.numbers} | {r.seconds:.0f} |")
        failed = [r for r in self.results if r.ok is False]
        if failed:
            lines += ["", "## Failures (last lines of each log)"]
            for r in failed:
                tail = "\n".join(r.log.strip().splitlines()[-40:])
                lines += ["", f"### {r.name}", "", "```", tail, "```"]
        self.report.write_text("\n".join(lines) + "\n")


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _metrics(folder: Path) -> list[dict]:
    """The complete lines of a run's metrics.jsonl (a killed run may leave half a line)."""
    path = folder / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _fresh(folder: Path) -> Path:
    """An empty folder: a rerun with the same --work must not resume an earlier run."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------- the checks


def check_gpu_tests(h: Harness) -> Result:
    name = "GPU-marked tests"
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    status, out, secs = h.run("gpu_tests", cmd, 240)
    summaries = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", out, re.MULTILINE)
    summary = summaries[-1] if summaries else f"exit {status}, no pytest summary"
    bad = re.search("failed|error|skipped", summary)
    return Result(name, status == 0 and "passed" in summary and not bad, summary, secs, out)


def _debug_run(dump: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config",
        DEBUG,
        "--job.dump_folder",
        str(dump),
        "--training.steps",
        str(steps),
        "--model.attn_backend",
        "flex",
        "--compile.enable",
        "--training.mixed_precision_param",
        "bfloat16",
        "--checkpoint.enable",
        "--checkpoint.async_mode",
        "async",
        "--checkpoint.interval",
        "10",
        "--metrics.log_freq",
        "1",
        "--metrics.enable_tensorboard",
        "false",
    ]


def check_debug_run(h: Harness) -> Result:
    name = "30-step bf16 debug run (compiled flex, async checkpoints)"
    dump = _fresh(h.work / "debug")
    status, out, secs = h.run("debug_run", _debug_run(dump, 30), 150)
    rows = _metrics(dump)
    losses = [r["loss"] for r in rows]
    saved = sorted(p.name for p in (dump / "checkpoint").glob("step-*"))
    if status != 0 or len(losses) != 30 or not all(math.isfinite(x) for x in losses):
        return Result(name, False, f"exit {status}, {len(losses)} steps", secs, out)
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    tps = statistics.median(r["tokens_per_second"] for r in rows[5:])
    ok = last < first - 0.5 and saved == ["step-10", "step-20", "step-30"] and "bfloat16" in out
    numbers = (
        f"loss {losses[0]:.3f} → {losses[-1]:.3f} (mean of first/last 5: {first:.3f} / "
        f"{last:.3f}); {tps:,.0f} tokens/s; async checkpoints {', '.join(saved) or 'none'}"
    )
    return Result(name, ok, numbers, secs, out)


def check_resume(h: Harness) -> Result:
    name = "resume from the async step-20 checkpoint"
    original, resumed = h.work / "debug", _fresh(h.work / "resumed")
    source = original / "checkpoint" / "step-20"
    a = {r["step"]: r["loss"] for r in _metrics(original)}
    steps = list(range(21, 31))
    if not source.is_dir() or any(s not in a for s in steps):
        why = "the debug run left no step-20 checkpoint or no losses for steps 21–30"
        return Result(name, False, why, 0.0)
    shutil.copytree(source, resumed / "checkpoint" / "step-20")
    status, out, secs = h.run("resume", _debug_run(resumed, 30), 120)
    b = {r["step"]: r["loss"] for r in _metrics(resumed)}
    if status != 0 or sorted(b) != steps or "loaded step 20" not in out:
        return Result(name, False, f"exit {status}, steps {sorted(b)}", secs, out)
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    numbers = f"steps 21–30 vs the uninterrupted run: max relative loss difference {worst:.1e}"
    return Result(name, worst <= 1e-2, numbers, secs, out)


def _bench(h: Harness, log: str, args: list[str], limit: float) -> tuple[dict, str, float]:
    """(the benchmark's JSON, or {} when it failed; its output; seconds)."""
    out_json = h.work / f"{log}.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, "scripts/bench_gpu.py", *args, "--json", str(out_json)]
    status, out, secs = h.run(log, cmd, limit)
    ok = status == 0 and out_json.is_file()
    return (json.loads(out_json.read_text()) if ok else {}), out, secs


def check_attention(h: Harness) -> Result:
    name = "flex block_causal vs SDPA causal, S=8192, fwd+bwd"
    # mode "default": the flex kernel compiled blocks run (max-autotune would take minutes)
    data, out, secs = _bench(
        h, "bench_attention", ["--only", "attention", "--flex-mode", "default"], 150
    )
    if not data:
        return Result(name, False, "the benchmark failed", secs, out)
    a = data["attention"]
    flex, sdpa = a["flex_block_causal_ms"], a["sdpa_causal_ms"]
    numbers = (
        f"flex document mask {flex:.2f} ms, flex causal {a['flex_causal_ms']:.2f} ms, SDPA "
        f"causal {sdpa:.2f} ms ({sdpa / flex:.2f}x); mask build {a['mask_build_ms']:.2f} ms"
    )
    return Result(name, flex < sdpa, numbers, secs, out)


def check_slice(h: Harness, ac: str) -> Result:
    label = "the 8B config's" if ac == "config" else ac
    name = f"8B slice (4 of 32 blocks, S=8192), activation checkpointing {label}"
    log = f"bench_slice_{ac.replace(':', '_')}"
    data, out, secs = _bench(h, log, ["--only", "slice", "--ac", ac], 150)
    if not data:
        return Result(name, False, "the benchmark failed", secs, out)
    s = data["slice"]
    numbers = (
        f"{s['activation_checkpoint']}: {s['step_ms']:.0f} ms/step, {s['tokens_per_s']:,.0f} "
        f"tokens/s, MFU kept {s['mfu_kept_pct']:.1f}% (target 40%: "
        f"{'met' if s['mfu_kept_pct'] >= 40 else 'not met'}), dense formula "
        f"{s['mfu_dense_pct']:.1f}%, peak {s['peak_memory_gib']:.1f} GiB"
    )
    return Result(name, True, numbers, secs, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", default=str(REPO / "gpu_report.md"))
    p.add_argument("--work", help="folder for the checks' logs and outputs")
    p.add_argument("--budget", type=float, default=540, help="seconds for all checks")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 1
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    h = Harness(work, Path(args.report), START + args.budget)
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}; logs in {work}")
    checks = [
        ("GPU-marked tests", check_gpu_tests),
        ("30-step bf16 debug run", check_debug_run),
        ("resume from the async step-20 checkpoint", check_resume),
        ("flex vs SDPA at S=8192", check_attention),
        ("8B slice, the config's activation checkpointing", lambda h: check_slice(h, "config")),
        ("8B slice, no activation checkpointing", lambda h: check_slice(h, "none")),
    ]
    for name, check in checks:
        try:
            h.add(check(h))
        except TimeoutError as e:
            h.add(Result(name, None, str(e), 0.0))
        except Exception as e:  # a broken check must not stop the others
            h.add(Result(name, False, f"{type(e).__name__}: {e}", 0.0, traceback.format_exc()))
    print(f"gpu_check: report written to {h.report}")
    return 0 if all(r.ok for r in h.results) else 1


if __name__ == "__main__":
    sys.exit(main())
