"""Token shards, the resumable loaders and mixtures, and tokenization into shards."""
