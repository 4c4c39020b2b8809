"""Ray driver for fine-tuning: `python jobs/finetune.py --config ft.yaml` (`embedctl finetune` runs it in-process).

Training is one process on one device, so "spreading" here means placing it: the run goes to
a Ray task that asks for one GPU when the cluster has one (a CPU task otherwise), so
`ray job submit --working-dir . -- python jobs/finetune.py --config ft.yaml` trains on a GPU
worker. With ``out: s3://bucket/models/name`` the model folder is uploaded there afterwards
(verified uploads), since a worker's local disk is not the submitter's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from typing import Any

from engine.distributed.driver import drive, driver_parser
from engine.finetune.train import FinetuneConfig

log = logging.getLogger("embedctl.engine.distributed.finetune")


def _train(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the fine-tune where this is called; upload the folder when ``out`` is an s3:// URI."""
    from engine.finetune.train import run_finetune

    if not cfg.out.startswith("s3://"):
        return run_finetune(cfg)
    from engine.core.errors import ConfigError
    from engine.core.storage import open_store

    store = open_store(cfg.out, endpoint_url=cfg.endpoint_url)
    if store.list("") and not cfg.overwrite:
        raise ConfigError(f"{cfg.out} already holds objects; pass --overwrite or choose another --out")
    with tempfile.TemporaryDirectory(prefix="embedctl-ft-out-") as tmp:
        local = os.path.join(tmp, "model")
        report = run_finetune(dataclasses.replace(cfg, out=local))
        if cfg.overwrite:
            store.delete_prefix("")
        for root, _dirs, files in os.walk(local):
            for name in files:
                path = os.path.join(root, name)
                store.upload_file(os.path.relpath(path, local).replace(os.sep, "/"), path)
    report["out"] = cfg.out
    return report


def run_finetune_job(cfg: FinetuneConfig, address: str | None = None) -> dict[str, Any]:
    """Run the fine-tune as a Ray task (one GPU when the cluster has one)."""
    import ray

    from engine.distributed.runtime import init_ray

    init_ray(address)
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if device == "cuda" and gpus < 1:
        from engine.core.errors import ConfigError

        raise ConfigError("--device cuda but the Ray cluster has no GPU; use --device cpu or add a GPU worker")
    task: Any = ray.remote(num_gpus=1 if device == "cuda" else 0, num_cpus=1, max_retries=0)(_train)
    log.info("fine-tuning on a %s worker", device)
    return ray.get(task.remote(dataclasses.replace(cfg, device=device)))


def build_parser() -> argparse.ArgumentParser:
    p = driver_parser("finetune", "YAML/JSON config (same keys as `embedctl finetune` flags)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return drive(args, FinetuneConfig.from_flat, lambda cfg: run_finetune_job(cfg, args.address),
                 dry=dataclasses.asdict, address_in_config=False)


if __name__ == "__main__":
    sys.exit(main())
