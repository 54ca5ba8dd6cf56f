"""Merging an adapter into its base model, streamed shard by shard, and verifying it."""
