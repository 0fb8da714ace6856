"""Joining a gloo process group from a spawned test worker."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def join(rank: int, init_file: str, world_size: int) -> None:
    """This worker joins the file-initialized gloo group as `rank`, with one torch thread."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)
