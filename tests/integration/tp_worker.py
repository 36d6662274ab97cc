"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by ``test_tensor_parallel.py``.

Builds one set of weights, then:

* the reference: the plain model, its loss (summed token cross-entropy) and gradients;
* tensor parallel over 2 ranks (``apply_tp``), with and without loss parallelism: the loss,
  the gathered gradients of the output projection and the embeddings, and the logits'
  placements;
* the training layout at TP=2 (TP → compile with ``aot_eager`` → FSDP2), forward without
  grad over packed batches with changing document layouts, flex and sdpa masks, under
  ``error_on_recompile`` after the first batch: the gathered logits.

Rank 0 writes everything to the file named by its one argument (a ``torch.save`` file) for the
test to compare; it runs as a leg of ``legs_worker.py`` or on its own.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch._dynamo
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from tests.helpers import DEBUG_CONFIG, EOS, VOCAB, full, packed_batch
from torchtitan_lite.config import load_config
from torchtitan_lite.distributed.parallel_dims import ParallelDims
from torchtitan_lite.distributed.parallelize import apply_tp, parallelize
from torchtitan_lite.models.attention import build_attention_mask
from torchtitan_lite.models.llama3.args import model_args_for
from torchtitan_lite.models.llama3.model import Transformer
from torchtitan_lite.models.loss import cross_entropy_sum

SEQ = 256


def loss_and_grads(model, tokens, labels, context) -> dict:
    mask = build_attention_mask(tokens, EOS, "block_causal", "sdpa")
    with context:
        logits = model(tokens, mask)
        loss = cross_entropy_sum(logits, labels)
        loss.backward()
    return {
        "loss": full(loss.detach()),
        "output_grad": full(model.output.weight.grad),
        "embedding_grad": full(model.tok_embeddings.weight.grad),
        "wq_grad": full(model.layers["0"].attention.wq.weight.grad),
        "norm_grad": full(model.layers["0"].attention_norm.weight.grad),
        "logits_placements": str(getattr(logits, "placements", "local")),
    }


def main(argv: list[str]) -> int:
    (out,) = argv
    if not dist.is_initialized():  # a leg of tests/integration/legs_worker.py forms it there
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    args = model_args_for("debugmodel", n_layers=2, max_seq_len=SEQ, vocab_size=VOCAB, eos_id=EOS)
    torch.manual_seed(0)
    reference = Transformer(args)
    reference.init_weights()
    weights = {k: v.clone() for k, v in reference.state_dict().items()}
    tokens = packed_batch(1, SEQ)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    results = {"reference": loss_and_grads(reference, tokens, labels, contextlib.nullcontext())}

    tp_only = ParallelDims(dp_replicate=1, dp_shard=1, world_size=2, tp=2).build_mesh("cpu")["tp"]
    for name, lp in (("loss_parallel", True), ("gathered", False)):
        model = Transformer(args)
        model.load_state_dict(weights)
        apply_tp(model, tp_only, loss_parallel=lp)
        context = loss_parallel() if lp else contextlib.nullcontext()
        results[name] = loss_and_grads(model, tokens, labels, context)

    # The training layout, compiled: TP → compile → FSDP2 on the (dp_shard=1, tp=2) mesh.
    mesh = ParallelDims(dp_replicate=1, dp_shard=1, world_size=2, tp=2).build_mesh("cpu")
    for backend in ("flex", "sdpa"):
        torch._dynamo.reset()
        config = load_config(DEBUG_CONFIG, ["--compile.enable", "--compile.backend", "aot_eager"])
        model = Transformer(args)
        model.load_state_dict(weights)
        model = parallelize(model, mesh, config, backend)
        model.eval()
        logits = []
        with torch.no_grad():
            for seed in range(4):
                batch = packed_batch(seed, SEQ)
                with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                    got = model(batch, build_attention_mask(batch, EOS, "block_causal", backend))
                logits.append((batch, full(got)))
        results[f"compiled_{backend}"] = logits
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
