"""Fused, sync-free statistics of many tensors at once. Pure torch: never imports Lightning."""
