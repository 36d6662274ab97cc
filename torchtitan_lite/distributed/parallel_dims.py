"""Parallel degrees and the DeviceMesh they describe."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan_lite.errors import ConfigError
from torchtitan_lite.models.llama3.args import ModelArgs


@dataclass(kw_only=True)
class ParallelDims:
    """``dp_replicate × dp_shard × cp × tp = world_size``; a shard degree of -1 takes the
    rest.

    dp_shard > 1 alone is FSDP; dp_replicate > 1 with it is HSDP (replicas of sharded groups);
    cp > 1 splits every sequence over ``cp`` ranks that read the same rows (context
    parallel); tp > 1 splits every layer over ``tp`` ranks that see the same data (tensor
    parallel). The mesh is ``(dp_replicate, dp_shard, cp, tp)`` with tp innermost:
    consecutive ranks, the GPUs of one node, whose fast links carry TP's per-layer
    collectives. FSDP shards over ``dp_shard × cp``: the CP ranks hold different tokens, so
    their gradients are summed like data parallelism's.
    """

    dp_replicate: int
    dp_shard: int
    world_size: int
    tp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        r, s, t, w = self.dp_replicate, self.dp_shard, self.tp * self.cp, self.world_size
        layout = (
            f"parallelism.data_parallel_replicate_degree = {r}, "
            f"parallelism.data_parallel_shard_degree = {s}, "
            f"parallelism.context_parallel_degree = {self.cp}, "
            f"parallelism.tensor_parallel_degree = {self.tp}, world size = {w}"
        )
        for name, degree in (
            ("replicate", r),
            ("context parallel", self.cp),
            ("tensor parallel", self.tp),
        ):
            if degree < 1:
                raise ConfigError(
                    f"Parallel layout: the {name} degree must be at least 1 ({layout}). "
                    "Fix: set it to 1 or more."
                )
        if s == -1:
            if w % (r * t):
                raise ConfigError(
                    f"Parallel layout: the world size {w} is not a multiple of "
                    f"{self._product('replicate', r)} = {r * t} ({layout}). Fix: start a "
                    f"multiple of {r * t} processes, or choose degrees whose product divides {w}."
                )
            s = self.dp_shard = w // (r * t)
        if s < 1 or r * s * t != w:
            raise ConfigError(
                f"Parallel layout: {self._product('replicate', r, 'shard', s)} = {r * s * t} "
                f"processes do not match the world size ({layout}). Fix: make the "
                "product of the degrees equal the number of processes, or set the shard "
                "degree to -1."
            )

    def _product(self, *named) -> str:
        """``replicate × tensor parallel = 1 × 3``: the named degrees, then context parallel
        (where > 1) and tensor parallel."""
        pairs = list(zip(named[::2], named[1::2], strict=True))
        pairs += [("context parallel", self.cp)] * (self.cp > 1) + [("tensor parallel", self.tp)]
        return " × ".join(n for n, _ in pairs) + " = " + " × ".join(str(v) for _, v in pairs)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks see different data (TP ranks share theirs)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dim_names(self) -> tuple[str, ...]:
        """The mesh's dimensions: ``dp_shard`` always, the others where their degree > 1."""
        return (
            ("dp_replicate",) * (self.dp_replicate > 1)
            + ("dp_shard",)
            + ("cp",) * (self.cp > 1)
            + ("tp",) * (self.tp > 1)
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The mesh over all ranks, one dimension per name in :attr:`dim_names` (FSDP's
        ``dp_shard × cp`` is derived from it by :func:`fsdp_mesh`)."""
        sizes = {
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cp": self.cp,
            "tp": self.tp,
        }
        names = self.dim_names
        return init_device_mesh(device_type, tuple(sizes[n] for n in names), mesh_dim_names=names)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel part of a mesh from :meth:`ParallelDims.build_mesh`: ``dp_shard``,
    or ``(dp_replicate, dp_shard)`` for HSDP: the ranks that read different rows."""
    names = tuple(n for n in ("dp_replicate", "dp_shard") if n in mesh.mesh_dim_names)
    return mesh[names] if len(names) > 1 else mesh[names[0]]


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards and reduces over: the data-parallel one, its shard dimension
    flattened with ``cp`` under context parallelism (``dp_shard_cp``; with HSDP, the replicas
    × it). Built from the sub-meshes, never by slicing a flattened name from the root (which
    torch deprecates); called once, by ``parallelize``: each call makes its process groups."""
    if "cp" not in mesh.mesh_dim_names:
        return dp_mesh(mesh)
    if "dp_replicate" not in mesh.mesh_dim_names:
        return mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    replicas = mesh["dp_replicate"].size()
    shards = mesh["dp_shard"].size() * mesh["cp"].size()
    if not hasattr(DeviceMesh, "_unflatten"):  # a torch without it: the root slice
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        return mesh["dp_replicate", "dp_shard_cp"]
    data = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return data._unflatten(0, (replicas, shards), ("dp_replicate", "dp_shard_cp"))


def cp_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The context-parallel dimension of the mesh, or None without CP."""
    return mesh["cp"] if "cp" in mesh.mesh_dim_names else None


def tp_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The tensor-parallel dimension of the mesh, or None without TP."""
    return mesh["tp"] if "tp" in mesh.mesh_dim_names else None


def dp_rank(mesh: DeviceMesh) -> int:
    """This rank's index among the data-parallel ranks (equal for the ranks of one TP group):
    which data shard it reads and which data-loader state it saves."""
    dp = dp_mesh(mesh)
    coords = dp.get_coordinate()
    rank = 0
    for coord, size in zip(coords, dp.mesh.shape, strict=True):
        rank = rank * size + coord
    return rank


def check_tensor_parallel(tp: int, args: ModelArgs, seq_len: int) -> None:
    """TP splits heads, kv heads, the feed-forward width and the vocabulary evenly over its
    ranks, and sequence parallelism the sequence: each must be a multiple of ``tp``. A tied
    embedding is refused: its one matrix would get two TP plans."""
    if tp == 1:
        return
    n_kv_heads = args.n_kv_heads or args.n_heads
    if args.tie_word_embeddings:
        raise ConfigError(
            f"Parallel layout: parallelism.tensor_parallel_degree = {tp}, but this model's "
            "output projection is tied to its embedding table (the 1B / 3B flavors, or "
            "tie_word_embeddings in the Hugging Face config.json it starts from): tensor "
            "parallelism would split that one matrix twice, once as the embedding and once as "
            "the output. Fix: set parallelism.tensor_parallel_degree = 1 and let FSDP "
            "(parallelism.data_parallel_shard_degree) shard the model; tied models are small "
            "enough for it."
        )
    parts = {
        "attention heads (model flavor)": args.n_heads,
        "kv heads (model flavor)": n_kv_heads,
        "feed-forward width (model flavor)": args.hidden_dim,
        "vocabulary (model.vocab_size_multiple_of pads it)": args.vocab_size,
        "sequence length (training.seq_len)": seq_len,
    }
    bad = [f"{name} = {size}" for name, size in parts.items() if size % tp]
    if bad:
        raise ConfigError(
            f"Parallel layout: parallelism.tensor_parallel_degree = {tp} does not divide "
            f"{', '.join(bad)}. Each tensor-parallel rank holds an equal share of these. Fix: "
            f"choose a tensor parallel degree that divides every one of them (e.g. one that "
            f"divides {n_kv_heads} kv heads), or change the listed key."
        )
