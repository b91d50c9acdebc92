"""How Ray Train splits the training stream between workers: complete, disjoint shards."""

from __future__ import annotations

from ray.train import DataConfig


class CompleteShardsDataConfig(DataConfig):
    """Ray Train's `DataConfig` with `streaming_split(equal=False)`: see `train_data_config`."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        split_names = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in split_names:
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            else:
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output


def train_data_config(datasets_to_split: str | list[str] = "all") -> CompleteShardsDataConfig:
    """`TorchTrainer(dataset_config=...)` that gives workers disjoint shards covering every row.

    Ray Train's default `DataConfig.configure` calls `streaming_split(world_size, equal=True)`,
    which drops rows so every worker gets the same count. Here the split is `equal=False`:
    blocks are handed out dynamically, so shards are disjoint and complete but their sizes may
    differ by up to a block. A DDP loop must therefore stop all ranks together (e.g. all-reduce a
    "still has a batch" flag each step) rather than assume equal batch counts. Datasets not in
    `datasets_to_split` are given whole to every worker.
    """
    return CompleteShardsDataConfig(datasets_to_split=datasets_to_split)
