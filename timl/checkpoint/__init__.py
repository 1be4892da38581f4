"""Distributed checkpoints: durable writes, manifests, the manager, the run folder, Hub uploads."""
