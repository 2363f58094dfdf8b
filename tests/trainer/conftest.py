"""Fixtures for the trainer tier: tiny models and a tokenizer built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trainer_assets as assets

# No test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return assets.make_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assets.make_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assets.make_model_dir(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def train_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assets.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", assets.rows(160, "prompt_completion"))
