"""The training loop on Accelerate: the Trainer, its callbacks, preemption, and `timl train`."""
