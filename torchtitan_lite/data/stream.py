"""One global stream of rows: the sources mixed by weight, each step's rows dealt to the
data-parallel ranks.

The rows a run trains on are a function of the data, the weights and the seed, not of the
world size, the batch split or the loader workers:

* Each source yields its own rows (:class:`~torchtitan_lite.data.packing.PackedDataset`,
  :class:`~torchtitan_lite.data.chat.ConversationDataset`) and runs its own epochs.
* Global row ``r`` comes from the source furthest below its share, ``argmax_s (w_s·(r+1) −
  taken_s)`` (weights normalized; ties go to the first source): after any number of rows,
  each source has given its share up to less than one row, so every global batch follows the
  weights up to rounding.
* A step takes the next ``G = global batch`` rows. Of those, micro-batch ``m`` of
  data-parallel rank ``d`` holds rows ``[(m·N + d)·B, (m·N + d + 1)·B)`` (``B`` local rows,
  ``N`` ranks, ``A`` micro-batches, ``G = A·N·B``), so one process with ``A·N`` micro-batches
  computes the same steps as ``N`` processes.
* Every rank walks the whole stream and keeps its own rows, so every rank knows the position
  after each step: each source's ``(epoch, cursor, inner)``, the rows each source gave and
  the rows in all. That is the checkpointed state, the same on every rank; a run resumed on
  any world size, batch split or worker count continues with the next row.
* Loader workers take whole steps in turn (worker ``w`` of ``W``: steps ``w, w + W, ...``);
  each walks the stream past the other workers' steps.
* A finite stream (``data.infinite = false``, validation) ends with the first source that
  ends: its last step is filled up with padding rows (labels ignored), so every rank takes
  the same number of steps.

Walking the whole stream costs each rank the tokenization of every rank's rows when the
text is tokenized on the fly (cheap next to a step at the sizes that run on few ranks);
pre-tokenized shard sets (scripts/tokenize_data.py) make it a memory copy.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from torchtitan_lite.data.packing import RowStream
from torchtitan_lite.logging import logger
from torchtitan_lite.models.loss import IGNORE_INDEX

#: The version of the checkpointed stream state (earlier checkpoints hold per-rank states).
STATE_FORMAT = "torchtitan_lite.stream/1"


class MixedStream(IterableDataset):
    """This rank's part of each global step: ``{"input", "labels"}`` of shape (A, B, S),
    with ``"state"``, the stream's position after the step."""

    def __init__(
        self,
        sources: dict[str, RowStream],
        weights: dict[str, float],
        *,
        seq_len: int,
        rows: int,
        ranks: int = 1,
        rank: int = 0,
        micro_batches: int = 1,
    ) -> None:
        self.sources = sources
        self.names = list(sources)
        total = sum(weights[n] for n in self.names)
        self.seq_len = seq_len
        self.rows, self.ranks, self.rank, self.micro_batches = rows, ranks, rank, micro_batches
        first = next(iter(sources.values()))
        self.eos_id, self.pad_id = first.eos_id, first.pad_id
        self.template = getattr(first, "template", None)  # chat data's template
        self.weights = {n: weights[n] / total for n in self.names}  # normalized, recorded
        self._start = self._position(0, dict.fromkeys(self.names, 0))

    @property
    def step_rows(self) -> int:
        """Rows of one global step."""
        return self.micro_batches * self.ranks * self.rows

    # ---------------------------------------------------------------- state

    def _position(
        self, rows: int, taken: dict[str, int], mixed: tuple[int, list[int]] | None = None
    ) -> dict[str, Any]:
        """``rows`` and ``taken``: all rows and each source's, since the start of the run;
        ``mixed``: the rows and each source's since the mixture last changed (what the
        choice of the next source follows; the same as the totals unless it changed)."""
        mixed_rows, mixed_taken = mixed or (rows, [taken[n] for n in self.names])
        return {
            "format": STATE_FORMAT,
            "rows": rows,
            "taken": dict(taken),
            "weights": dict(self.weights),
            "mixed": {"rows": mixed_rows, "taken": dict(zip(self.names, mixed_taken, strict=True))},
            "sources": {n: s.state_dict() for n, s in self.sources.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the next iteration starts."""
        return copy.deepcopy(self._start)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            self._load_per_rank_state(state)
            return
        new = [n for n in self.names if n not in state["sources"]]
        if new:
            logger.warning(
                f"data: the checkpoint's stream has no source named {', '.join(new)}: "
                "they start at their first document"
            )
        for name, source in self.sources.items():
            if name in state["sources"]:
                source.load_state_dict(state["sources"][name])
        taken = {n: state["taken"].get(n, 0) for n in self.names}
        mixed = state.get("mixed", {"rows": state["rows"], "taken": state["taken"]})
        if state.get("weights", self.weights) == self.weights:
            counts = (mixed["rows"], [mixed["taken"][n] for n in self.names])
        else:  # proportions follow the new weights from here, not the old counts
            logger.warning(
                f"data: the mixture changed since the checkpoint ({state.get('weights')} → "
                f"{self.weights}): the new weights apply from the next row on"
            )
            counts = (0, [0] * len(self.names))
        self._start = self._position(state["rows"], taken, counts)

    def _load_per_rank_state(self, state: dict[str, Any]) -> None:
        """A checkpoint of an earlier version holds each rank's position in its own shard of
        the documents, which no global position corresponds to: keep its epoch and start it
        again from its first document."""
        epochs = [s["epoch"] for s in _dataset_states(state) if "epoch" in s]
        epoch = min(epochs, default=0)
        logger.warning(
            "data: the checkpoint holds the per-rank data positions of an earlier version, "
            f"which the global stream cannot continue: every source restarts epoch {epoch} "
            "from its first document (documents of that epoch are seen again). Model, "
            "optimizer and schedule are resumed exactly."
        )
        for source in self.sources.values():
            source.restart_epoch(epoch)
        self._start = self._position(0, dict.fromkeys(self.names, 0))

    # ---------------------------------------------------------------- iteration

    def pad_row(self) -> dict[str, torch.Tensor]:
        """A row that fills a finite stream's last step: padding, every label ignored."""
        return {
            "input": torch.full((self.seq_len,), self.pad_id, dtype=torch.long),
            "labels": torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long),
        }

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for name, source in self.sources.items():
            source.load_state_dict(self._start["sources"][name])
        rows_in_all = self._start["rows"]
        taken = np.array([self._start["taken"][n] for n in self.names], dtype=np.int64)
        mixed_rows = self._start["mixed"]["rows"]  # the choice follows these counts
        mixed = np.array([self._start["mixed"]["taken"][n] for n in self.names], dtype=np.int64)
        sources = [self.sources[n] for n in self.names]
        streams = [source.rows() for source in sources]
        per_rank = self.rows * self.ranks
        mine_from, mine_to = self.rank * self.rows, (self.rank + 1) * self.rows
        shares = np.array([self.weights[n] for n in self.names])
        step, ended, several = 0, False, len(sources) > 1
        while not ended:
            keep = step % workers == worker
            mine, real = [], 0
            for j in range(self.step_rows):
                row = None
                if not ended:
                    s = int(np.argmax(shares * (mixed_rows + 1) - mixed)) if several else 0
                    row = next(streams[s], None)
                    ended = row is None
                if row is not None:
                    taken[s] += 1
                    mixed[s] += 1
                    rows_in_all += 1
                    mixed_rows += 1
                    real += 1
                if keep and mine_from <= j % per_rank < mine_to:
                    mine.append(sources[s].sample(row) if row is not None else self.pad_row())
            if real == 0:
                return
            if keep:
                state = self._position(
                    rows_in_all,
                    dict(zip(self.names, taken.tolist(), strict=True)),
                    (mixed_rows, mixed.tolist()),
                )
                yield {
                    "input": torch.stack([r["input"] for r in mine]).view(
                        self.micro_batches, self.rows, self.seq_len
                    ),
                    "labels": torch.stack([r["labels"] for r in mine]).view(
                        self.micro_batches, self.rows, self.seq_len
                    ),
                    "state": state,
                }
            step += 1


def _dataset_states(state: dict) -> list[dict]:
    """Every dataset state inside an earlier version's loader state (the main process's, or
    each worker's)."""
    found = []
    for key, value in state.items():
        if key == "dataset_state" and isinstance(value, dict):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(_dataset_states(value))
    return found


def _as_is(item):
    return item


class StepLoader:
    """The loader of one data-parallel rank: its part of each global step, in step order
    (``num_workers`` worker processes take steps in turn). :meth:`state_dict` is the
    stream's position after the last step handed out."""

    def __init__(self, stream: MixedStream, num_workers: int = 0) -> None:
        self.dataset = stream
        self.num_workers = num_workers
        self._consumed = stream.state_dict()

    def __iter__(self):
        workers = self.num_workers
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            collate_fn=_as_is,  # the steps are tensors already (and the position a dict)
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if workers else None,
        )
        it = iter(loader)
        try:
            for item in it:
                self._consumed = item.pop("state")
                yield item
        finally:
            # Stop the worker processes now, not at a later garbage collection (which then
            # waits seconds on each): torch's loader iterators have no public close.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._consumed = self.dataset.state_dict()

    @property
    def position(self) -> dict[str, Any]:
        """The position after the last step handed out (not a copy)."""
        return self._consumed
