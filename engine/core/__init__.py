"""Ground layer: errors, object storage with compare-and-swap, the store's key layout, names, leases, shared config helpers."""
