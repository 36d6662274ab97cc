"""Parallel degrees and the DeviceMesh they describe."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan_lite.errors import ConfigError


@dataclass
class ParallelDims:
    """``dp_replicate × dp_shard = world_size``; a degree of -1 takes the rest of the world.

    dp_shard > 1 alone is FSDP; dp_replicate > 1 with it is HSDP (replicas of sharded groups).
    """

    dp_replicate: int
    dp_shard: int
    world_size: int

    def __post_init__(self) -> None:
        r, s, w = self.dp_replicate, self.dp_shard, self.world_size
        layout = (
            f"parallelism.data_parallel_replicate_degree = {r}, "
            f"parallelism.data_parallel_shard_degree = {s}, world size = {w}"
        )
        if r < 1:
            raise ConfigError(
                f"Parallel layout: the replicate degree must be at least 1 "
                f"({layout}). Fix: set it to 1 or more."
            )
        if s == -1:
            if w % r:
                raise ConfigError(
                    f"Parallel layout: the world size is not a multiple of the "
                    f"replicate degree ({layout}). Fix: choose a replicate degree "
                    f"that divides {w}."
                )
            s = self.dp_shard = w // r
        if s < 1 or r * s != w:
            raise ConfigError(
                f"Parallel layout: {r} × {s} = {r * s} processes do not match the "
                f"world size ({layout}). Fix: make the product of the degrees "
                f"equal the number of processes, or set the shard degree to -1."
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks see different data."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A 1-D ("dp_shard") or 2-D ("dp_replicate", "dp_shard") mesh over all ranks."""
        if self.dp_replicate > 1:
            return init_device_mesh(
                device_type,
                (self.dp_replicate, self.dp_shard),
                mesh_dim_names=("dp_replicate", "dp_shard"),
            )
        return init_device_mesh(device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",))
