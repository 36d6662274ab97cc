"""The run folder (``job.dump_folder``): checked before a run writes into it, and marked as a
run's own by the first line of the resolved config it holds. That config is written before
anything else, so logs (``train.log``, ``metrics.jsonl``) in a folder without it are not a
run's, and a run never appends to them."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from torchtitan_lite.config import JobConfig, to_toml
from torchtitan_lite.config.loader import all_keys, tomllib
from torchtitan_lite.errors import ConfigError

#: The first line of the resolved config a run writes into its folder. A ``config.toml``
#: there is overwritten only when it starts with this line: any other file of that name (a
#: user's own config, say) makes the run stop instead.
RUN_CONFIG_MARK = "# torchtitan_lite: the resolved config of the run in this folder"

#: The logs a run appends to (rank 0): a resumed run continues its own.
RUN_LOGS = ("train.log", "metrics.jsonl")


def make_run_folder(config: JobConfig, rank: int) -> Path:
    """Create (or reuse) the run folder after checking that the run may write there: it is
    writable, its ``config.toml``, if any, is a run's resolved config, and logs there come
    with one (every rank checks, so all refuse alike); rank 0 then writes the resolved
    config, renamed into place so that a rank still checking never reads it half written."""
    path = config.job.dump_folder
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
    # The logs are looked at before the config: rank 0 writes its config, then its log, so a
    # rank still checking that sees rank 0's log also sees its config.
    logs = [name for name in RUN_LOGS if os.path.lexists(folder / name)]
    resolved = folder / "config.toml"
    if resolved.is_dir() or (resolved.exists() and not is_run_config(resolved)):
        raise ConfigError(
            f"Config key 'job.dump_folder' is {path!r}, which holds a config.toml that is "
            "not a run's resolved config (it lacks the first line a run writes), e.g. your "
            "own config file: the run would overwrite it with its resolved config. Fix: "
            "choose another job.dump_folder, or move that config.toml elsewhere."
        )
    if logs and not resolved.exists():
        raise ConfigError(
            f"Config key 'job.dump_folder' is {path!r}, which holds {' and '.join(logs)} but "
            "no config.toml of a run: those logs are not a run's (a run writes its resolved "
            "config before any log), and the run would append its own lines to them. Fix: "
            "choose another job.dump_folder, or move "
            f"{'those files' if len(logs) > 1 else 'that file'} elsewhere."
        )
    if rank == 0:  # atomically: another rank may be checking it right now
        tmp = folder / f".config.toml.tmp-{os.getpid()}"
        tmp.write_text(f"{RUN_CONFIG_MARK}\n{to_toml(config)}", encoding="utf-8")
        os.replace(tmp, resolved)
    return folder


def is_run_config(path: Path) -> bool:
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
