"""Publishing: aliases swapped by compare-and-swap, history, rollback, status, garbage collection."""
