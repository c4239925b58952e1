"""Offline data tools: manifests, the hybrid mix, WebDataset shard building and checking."""
