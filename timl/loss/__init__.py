"""Every training loss path: next-token cross-entropy and z-loss, the chunked head, fused kernels."""
