"""The global stream: sources mixed by weight, shuffled by seed, dealt to data-parallel ranks,
resumed on any layout. The references are each source's own rows, read on their own."""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from tests.helpers import TIKTOKEN_2K
from torchtitan_lite.config.job_config import Data
from torchtitan_lite.config.learning import DataSource
from torchtitan_lite.data import IGNORE_INDEX, build_dataloader
from torchtitan_lite.tokenizer import load_tokenizer

TOK = load_tokenizer(TIKTOKEN_2K)
SEQ = 16


def write_source(path: Path, word: str, n: int) -> Path:
    """``n`` documents of one repeated word, of varied lengths: every row of this source is
    told apart from another source's by its tokens."""
    docs = [f"{word} " * (3 + (7 * i) % 23) for i in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def two_sources(tmp_path) -> Data:
    a = write_source(tmp_path / "alpha.jsonl", "alpha", 40)
    b = write_source(tmp_path / "beta.jsonl", "beta", 15)
    return Data(sources=[DataSource(path=str(a), weight=0.7), DataSource(path=str(b), weight=0.3)])


def source_of(row: torch.Tensor) -> str:
    for word in ("alpha", "beta"):
        if set(TOK.encode(f" {word}")) & set(row.tolist()):
            return word
    raise AssertionError(f"a row of no source: {row.tolist()}")


def global_steps(data: Data, steps: int, ranks=1, micro=1, rows=4, state=None, **kw):
    """The first ``steps`` global steps, rebuilt from every rank's loader in the dealing
    order: micro-batch m of rank d holds the step's rows [(m·N + d)·B, (m·N + d + 1)·B)."""
    per_rank, states = [], []  # states[d][k]: rank d's position after step k
    for rank in range(ranks):
        loader = build_dataloader(
            data,
            TOK,
            seq_len=SEQ,
            batch_size=rows,
            dp_rank=rank,
            dp_world_size=ranks,
            micro_batches=micro,
            **kw,
        )
        if state is not None:
            loader.load_state_dict(state)
        got, positions = [], []
        for step in islice(loader, steps):
            got.append(step)
            positions.append(loader.state_dict())
        per_rank.append(got)
        states.append(positions)
    assert all(positions == states[0] for positions in states)  # every rank knows the position
    out = []
    for k in range(len(per_rank[0])):
        parts = [per_rank[d][k][key] for key in ("input", "labels") for d in range(ranks)]
        inputs = torch.stack(parts[:ranks], dim=1).reshape(-1, SEQ)  # (m, d, b) order
        labels = torch.stack(parts[ranks:], dim=1).reshape(-1, SEQ)
        out.append((inputs, labels))
    return out, loader.state_dict()


def assert_same_steps(got, want) -> None:
    assert len(got) == len(want)
    for (gi, gl), (wi, wl) in zip(got, want, strict=True):
        assert torch.equal(gi, wi) and torch.equal(gl, wl)


def test_every_global_batch_follows_the_weights_up_to_rounding(two_sources):
    steps, _ = global_steps(two_sources, 30, rows=10)
    counts = {"alpha": 0, "beta": 0}
    for inputs, _ in steps:
        batch = [source_of(row) for row in inputs]
        assert abs(batch.count("alpha") - 7) <= 1 and abs(batch.count("beta") - 3) <= 1
        for s in batch:
            counts[s] += 1
    assert counts == {"alpha": 210, "beta": 90}  # 300 rows: exact in the long run


def test_each_source_gives_its_own_rows_in_order_and_runs_its_own_epochs(two_sources):
    """The mixture's rows of one source are that source's rows read alone, in order: beta,
    the smaller source, runs through more epochs than alpha."""
    steps, state = global_steps(two_sources, 30, rows=10)
    rows = torch.cat([inputs for inputs, _ in steps])
    for k, name in enumerate(("alpha", "beta")):
        source = two_sources.mixture()[k]
        alone = Data(path=source.path)
        own = [r for r in rows if source_of(r) == name]
        reference = global_steps(alone, len(own), rows=1)[0]
        assert all(torch.equal(r, ref[0][0]) for r, ref in zip(own, reference, strict=True))
    epochs = {name: source["epoch"] for name, source in state["sources"].items()}
    assert epochs["beta"] > epochs["alpha"] >= 1, epochs


@pytest.mark.parametrize(
    "ranks, micro, rows", [(2, 1, 2), (4, 1, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2)]
)
def test_every_layout_reads_the_same_global_steps(two_sources, ranks, micro, rows):
    reference, _ = global_steps(two_sources, 12, rows=4)
    got, _ = global_steps(two_sources, 12, ranks=ranks, micro=micro, rows=rows)
    assert_same_steps(got, reference)


@pytest.mark.parametrize(
    "saved, resumed",
    [((2, 1, 2), (1, 2, 2)), ((2, 1, 2), (4, 1, 1)), ((1, 4, 1), (2, 1, 2))],
)
def test_a_position_saved_on_one_layout_continues_on_another(two_sources, saved, resumed):
    """(ranks, micro-batches, rows): 2 processes saved after 7 steps; 1 process with
    accumulation, or 4 processes, continue with exactly the uninterrupted steps."""
    reference, _ = global_steps(two_sources, 20, rows=4, seed=5)
    n, m, b = saved
    _, state = global_steps(two_sources, 7, ranks=n, micro=m, rows=b, seed=5)
    n, m, b = resumed
    got, _ = global_steps(two_sources, 13, ranks=n, micro=m, rows=b, seed=5, state=state)
    assert_same_steps(got, reference[7:])


def test_shuffling_is_seeded_reshuffled_every_epoch_and_resumable(tmp_path):
    path = write_source(tmp_path / "a.jsonl", "alpha", 1)
    texts = [" ".join(f"w{i}x{j}" for j in range(4)) for i in range(30)]  # distinct documents
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = Data(path=str(path), shuffle_window=12)

    def order(seed, steps=40):
        rows = torch.cat([i for i, _ in global_steps(data, steps, rows=4, seed=seed)[0]])
        firsts = [TOK.decode(doc[1:4].tolist()) for doc in _documents(rows.flatten())]
        return firsts

    first, again, other = order(0), order(0), order(1)
    assert first == again and first != other
    per_epoch = 30
    epoch0, epoch1 = first[:per_epoch], first[per_epoch : 2 * per_epoch]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # all of them, reordered
    plain = Data(path=str(path))
    assert (
        order(0)
        != [  # not the file order
            TOK.decode(d[1:4].tolist())
            for d in _documents(
                torch.cat([i for i, _ in global_steps(plain, 40, rows=4)[0]]).flatten()
            )
        ]
    )
    reference, _ = global_steps(data, 30, rows=4, seed=3)
    _, state = global_steps(data, 11, rows=4, seed=3)  # mid-window, mid-epoch
    got, _ = global_steps(data, 19, ranks=2, rows=2, seed=3, state=state)
    assert_same_steps(got, reference[11:])


def _documents(stream: torch.Tensor) -> list[torch.Tensor]:
    """The documents (bos … eos) of a token stream: the inputs of consecutive rows."""
    return [d for d in torch.tensor_split(stream, (stream == TOK.bos_id).nonzero()[:, 0]) if len(d)]


def test_a_finite_stream_ends_on_every_rank_after_the_same_step(tmp_path):
    """The last step is filled up with padding rows, every label ignored: the ranks take the
    same number of steps, and the targets are exactly the data's."""
    path = write_source(tmp_path / "a.jsonl", "alpha", 9)
    data = Data(path=str(path), infinite=False)
    one, _ = global_steps(data, 1000, rows=1)
    targets = sum(int((lab != IGNORE_INDEX).sum()) for _, lab in one)
    ranks = next(n for n in (3, 5, 7) if len(one) % n)  # a last step that is not full
    many, _ = global_steps(data, 1000, ranks=ranks, rows=1)
    assert len(many) == -(-len(one) // ranks)
    assert sum(int((lab != IGNORE_INDEX).sum()) for _, lab in many) == targets
    padding = torch.cat([lab for _, lab in many])[len(one) :]
    assert len(padding) == ranks * len(many) - len(one) > 0 and (padding == IGNORE_INDEX).all()


class _EarlierDataset(IterableDataset):
    """What an earlier version's per-rank dataset saved: its shard's epoch and position."""

    def __init__(self):
        self.epoch = 2

    def __iter__(self):
        while True:
            yield torch.zeros(1)

    def state_dict(self):
        return {"epoch": self.epoch, "doc": 12, "offset": 3, "num_shards": 2}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]


def test_an_earlier_per_rank_position_restarts_its_epoch(two_sources, caplog):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")  # what earlier ones used
    loader = stateful.StatefulDataLoader(_EarlierDataset(), batch_size=1)
    next(iter(loader))
    earlier = loader.state_dict()  # torchdata's structure, as earlier checkpoints hold it
    ours = build_dataloader(two_sources, TOK, seq_len=SEQ, batch_size=4)
    with caplog.at_level(logging.WARNING):
        ours.load_state_dict(earlier)
    assert "per-rank data positions of an earlier version" in caplog.text
    assert "restarts epoch 2" in caplog.text
    state = ours.state_dict()
    assert state["rows"] == 0
    assert all(s["epoch"] == 2 and s["cursor"] == [0, 0] for s in state["sources"].values())


def test_new_weights_apply_from_the_resumed_row_on(two_sources, caplog):
    """Resumed with other weights (0.7 / 0.3 → 0.2 / 0.8), each global batch follows the new
    ones at once, not the counts the old ones left; the totals keep counting."""
    _, state = global_steps(two_sources, 20, rows=10)
    two_sources.sources[0].weight, two_sources.sources[1].weight = 0.2, 0.8
    with caplog.at_level(logging.WARNING):
        steps, after = global_steps(two_sources, 10, rows=10, state=state)
    assert "the mixture changed since the checkpoint" in caplog.text
    for inputs, _ in steps:
        batch = [source_of(row) for row in inputs]
        assert abs(batch.count("alpha") - 2) <= 1 and abs(batch.count("beta") - 8) <= 1
    assert after["taken"] == {"alpha": 140 + 20, "beta": 60 + 80}


def test_a_mixture_resumed_twice_after_a_weight_change_takes_the_uninterrupted_rows(
    two_sources,
):
    """Weights changed at a resume (0.7 / 0.3 → 0.35 / 0.65, 3 rows a step: the choice of
    source depends on the counts since the change), then saved and resumed again with the same
    new weights: the rows equal those of the run that went on after the change unbroken."""
    _, state = global_steps(two_sources, 5, rows=3)
    two_sources.sources[0].weight, two_sources.sources[1].weight = 0.35, 0.65
    reference, _ = global_steps(two_sources, 12, rows=3, state=state)
    first, again = global_steps(two_sources, 5, rows=3, state=state)
    second, _ = global_steps(two_sources, 7, rows=3, state=again)
    assert_same_steps(first + second, reference)


def test_the_first_mix_line_after_a_resume_counts_that_steps_rows(two_sources, caplog):
    """The step line's ``mix:`` shares are those of the rows read since the last line, also
    on the first line of a resumed run (not the totals since the start of the run)."""
    from torchtitan_lite.components.metrics import MetricsLogger
    from torchtitan_lite.models.llama3.args import model_args_for

    _, state = global_steps(two_sources, 20, rows=10)  # 140 alpha, 60 beta
    two_sources.sources[0].weight, two_sources.sources[1].weight = 0.2, 0.8
    loader = build_dataloader(two_sources, TOK, seq_len=SEQ, batch_size=10)
    loader.load_state_dict(state)
    args = model_args_for("debugmodel", vocab_size=TOK.vocab_size, eos_id=TOK.eos_id)
    metrics = MetricsLogger(
        args, torch.device("cpu"), peak=None, tb_folder=None, position=loader.position
    )
    step = next(iter(loader))
    metrics.add_batch(step["input"][0], pairs=0, data_seconds=0.0)
    metrics.set_position(loader.position)
    batch = [source_of(row) for row in step["input"][0]]
    with caplog.at_level(logging.INFO):
        metrics.log(21, 1.0, 1.0, 1e-3)
    want = f"mix: alpha {10 * batch.count('alpha')}% beta {10 * batch.count('beta')}%"
    assert batch.count("beta") >= 7 and want in caplog.text


def test_a_finite_stream_resumed_after_its_end_gives_nothing(tmp_path):
    path = write_source(tmp_path / "a.jsonl", "alpha", 9)
    data = Data(path=str(path), infinite=False)
    steps, state = global_steps(data, 1000, rows=3)
    assert steps and not global_steps(data, 1000, rows=3, state=state)[0]
