"""Embedding-model migration: baseline, build, compare, calibrate, gated rollout, cutover, rollback (see migration.py)."""
