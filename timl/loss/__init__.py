"""Every training loss path: next-token cross-entropy and z-loss (cross_entropy), the chunked head (chunked), the
fused kernels (fused), and the one module that decides among them (select).

Constants only here, so that the arguments can check a path's name without importing torch.
"""

LOSS_PATHS = ("logits", "full", "chunked", "liger", "cut_cross_entropy")
"""How the training loss is computed. logits: from the model's own forward. full: the checked head's logits from
the hidden states, in one piece. chunked: the same, a chunk of tokens at a time, never holding the full logits.
liger, cut_cross_entropy: those packages' fused kernels (CUDA only)."""
