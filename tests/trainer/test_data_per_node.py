"""Tokenise once per node: a node's local rank 0 prepares the data, its other ranks map the arrays it wrote."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import trainer_assets as assets
from kubetune_trainer.config import DatasetConfig
from kubetune_trainer.data import PreparedData, prepare, prepare_once_per_node
from kubetune_trainer.errors import PermanentError
from kubetune_trainer.runtime import Runtime

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

LOCAL_RANKS = 2  # processes per simulated node


def digests(data: PreparedData) -> dict[str, str]:
    out = {}
    for name, samples in (("train", data.train), ("eval", data.eval)):
        assert samples is not None
        for array in ("ids", "labels", "offsets"):
            out[f"{name}-{array}"] = hashlib.sha256(np.ascontiguousarray(getattr(samples, array)).tobytes()).hexdigest()
    return out


def worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(rank, world, rank % LOCAL_RANKS, torch.device("cpu"), dist.group.WORLD)
    cfg = DatasetConfig(path=data, format="prompt_completion", max_seq_length=64, eval_split=0.1)
    tokenised = []

    def make() -> PreparedData:
        tokenised.append(rank)
        return prepare(cfg, assets.make_tokenizer(), 7)

    result: dict[str, Any] = {"rank": rank}
    try:
        prepared = prepare_once_per_node(rt, make)
        ids = prepared.train.ids
        result.update(
            tokenised=bool(tokenised),
            mapped=str(ids.filename) if isinstance(ids, np.memmap) else None,
            digests=digests(prepared),
            files=[vars(f) for f in prepared.files],
        )
        dist.barrier()  # the files are gone, the mappings still read
        result["after"] = digests(prepared)
    except PermanentError as e:
        result["error"] = str(e)
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run(tmp_path: Path, data: Path, world: int) -> list[dict[str, Any]]:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(world, assets.free_port(), str(data), str(out)), nprocs=world)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def test_each_node_tokenises_once_and_its_ranks_share_the_same_samples(tmp_path: Path, train_jsonl: Path) -> None:
    ranks = run(tmp_path, train_jsonl, world=4)  # two nodes of two ranks
    expected = prepare(
        DatasetConfig(path=str(train_jsonl), format="prompt_completion", max_seq_length=64, eval_split=0.1),
        assets.make_tokenizer(),
        7,
    )
    assert [r["tokenised"] for r in ranks] == [True, False, True, False]
    node_files = [Path(r["mapped"]).parent for r in ranks]
    assert node_files[0] == node_files[1] and node_files[2] == node_files[3] and node_files[0] != node_files[2]
    assert all(not d.exists() for d in node_files)  # removed once every rank mapped them
    for r in ranks:
        assert r["digests"] == r["after"] == digests(expected)
        assert r["files"] == [vars(f) for f in expected.files]


def test_a_bad_row_stops_every_rank_with_the_same_reason(tmp_path: Path) -> None:
    items = assets.rows(20, "prompt_completion")
    del items[4]["completion"]
    data = assets.write_jsonl(tmp_path / "bad.jsonl", items)
    ranks = run(tmp_path, data, world=2)
    assert [r["error"] for r in ranks] == [f'dataset {data} row 5: field "completion" is missing'] * 2
