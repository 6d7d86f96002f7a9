"""ParallelDims: how the world of ranks splits into data-parallel (replicate x shard) and context-parallel.

As in TorchTitan, FSDP shards parameters over dp_shard * cp ranks (the CP ranks hold different tokens of
the same sequences, so they can share a parameter shard), and the loss is averaged over dp x cp (label
tokens are counted over all of them). The data loader is sharded over "dp" only: the cp ranks of one dp
group read the same sequences and each keeps its part (torchtitan_rtpurbo/distributed/context_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    world_size: int

    def __post_init__(self):
        for name in ("dp_replicate", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallelism: {name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == -1:
            rest = self.world_size // (self.dp_replicate * self.cp)
            if rest * self.dp_replicate * self.cp != self.world_size:
                raise ValueError(
                    f"parallelism: world size {self.world_size} is not divisible by "
                    f"data_parallel_replicate_degree {self.dp_replicate} x context_parallel_degree {self.cp}"
                )
            self.dp_shard = rest
        if self.dp_replicate * self.dp_shard * self.cp != self.world_size:
            raise ValueError(
                f"parallelism: data_parallel_replicate_degree ({self.dp_replicate}) x "
                f"data_parallel_shard_degree ({self.dp_shard}) x context_parallel_degree ({self.cp}) "
                f"!= world size {self.world_size}"
            )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        dims = [self.dp_replicate, self.dp_shard, self.cp]
        names = ["dp_replicate", "dp_shard", "cp"]
        mesh = init_device_mesh(device_type, dims, mesh_dim_names=names)
        # Flattened views used by FSDP (params sharded over dp_shard x cp), data loading and the loss.
        mesh[("dp_replicate", "dp_shard")]._flatten(mesh_dim_name="dp")
        mesh[("dp_shard", "cp")]._flatten(mesh_dim_name="dp_shard_cp")
        mesh[("dp_replicate", "dp_shard", "cp")]._flatten(mesh_dim_name="dp_cp")
        return mesh

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1
