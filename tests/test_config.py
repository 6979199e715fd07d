"""RoutedLlamaConfig: validation of the routing fields, load-time overrides, and what a converted folder's configs
hold."""

import json

import pytest
import torch
from conftest import TINY_K, TINY_N
from transformers import AutoModelForCausalLM

from configuration_routed_llama import RoutedLlamaConfig

BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=20,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
GOOD_OFFSETS = [0, 5, 12, 20]  # N = 3 uneven clusters of I = 20 neurons


def make(**kw):
    return RoutedLlamaConfig(**{**BASE, **kw})


def test_valid_config_defaults_resolve():
    """A valid config resolves k = None to N, routed_layers = None to every layer and offsets = None to equal splits."""
    cfg = make(num_experts=3)
    assert cfg.top_k_experts == 3
    assert cfg.layers_to_route() == [0, 1, 2]
    assert cfg.offsets_for_layer(1) == [0, 7, 14, 20]  # 20 = 7 + 7 + 6, as numpy.array_split
    cfg = make(
        num_experts=3, num_experts_per_tok=1, routed_layers=[2, 0, 2], expert_offsets=[GOOD_OFFSETS, None, GOOD_OFFSETS]
    )
    assert cfg.top_k_experts == 1
    assert cfg.routed_layers == [0, 2]  # sorted, deduplicated
    assert cfg.offsets_for_layer(2) == GOOD_OFFSETS


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=3, num_experts_per_tok=4), r"num_experts_per_tok .*\[1, num_experts=3\].*got 4"),
        (dict(num_experts=3, num_experts_per_tok=0), r"num_experts_per_tok .*got 0"),
        (dict(num_experts=3, num_experts_per_tok=-1), r"num_experts_per_tok .*got -1"),
        (dict(num_experts=21), r"num_experts \(21\) cannot exceed intermediate_size \(20\)"),
        (dict(num_experts=0), r"num_experts must be a positive integer, got 0"),
        (dict(num_experts=-2), r"num_experts must be a positive integer"),
        (dict(num_experts=3, routed_layers=[0, 3]), r"routed_layers \[3\] out of range for num_hidden_layers=3"),
        (dict(num_experts=3, routed_layers=[-1]), r"routed_layers \[-1\] out of range"),
        (dict(num_experts=3, router="bogus"), r"router must be one of .*got 'bogus'"),
        (dict(num_experts=3, routing_impl="triton"), r"routing_impl must be one of .*got 'triton'"),
        # expert_offsets: one entry per layer
        (
            dict(num_experts=3, expert_offsets=[GOOD_OFFSETS] * 2),
            r"expert_offsets must have one entry per layer \(3\), got 2",
        ),
        # N + 1 offsets per layer
        (dict(num_experts=3, expert_offsets=[[0, 10, 20]] * 3), r"expert_offsets\[0\] must hold num_experts \+ 1 = 4"),
        # must start at 0
        (dict(num_experts=3, expert_offsets=[[1, 5, 12, 20]] * 3), r"expert_offsets\[0\] must hold .* from 0 to"),
        # must end at intermediate_size
        (
            dict(num_experts=3, expert_offsets=[GOOD_OFFSETS, GOOD_OFFSETS, [0, 5, 12, 19]]),
            r"expert_offsets\[2\] .*intermediate_size=20",
        ),
        # strictly increasing: an empty cluster
        (dict(num_experts=3, expert_offsets=[[0, 5, 5, 20]] * 3), r"expert_offsets\[0\] must be strictly increasing"),
        # decreasing
        (dict(num_experts=3, expert_offsets=[[0, 12, 5, 20]] * 3), r"strictly increasing"),
        # a routed layer (all layers route by default) without boundaries
        (
            dict(num_experts=3, expert_offsets=[GOOD_OFFSETS, None, GOOD_OFFSETS]),
            r"routed layers \[1\] have no cluster boundaries",
        ),
        (
            dict(num_experts=3, routed_layers=[0, 1], expert_offsets=[GOOD_OFFSETS, None, None]),
            r"routed layers \[1\] have no",
        ),
    ],
)
def test_invalid_routing_fields_raise_clear_valueerror(overrides, message):
    """Every inconsistent routing field raises a ValueError whose message names the field and the bad value."""
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_unrouted_layer_may_lack_offsets():
    """A layer that does not route may have `None` offsets (the negative control of the case above)."""
    cfg = make(num_experts=3, routed_layers=[0, 2], expert_offsets=[GOOD_OFFSETS, None, GOOD_OFFSETS])
    assert cfg.layers_to_route() == [0, 2]


def test_routing_fields_survive_save_and_load(tmp_path):
    """save_pretrained / from_pretrained keeps every routing field unchanged."""
    cfg = make(
        num_experts=3,
        num_experts_per_tok=2,
        routed_layers=[0, 2],
        router="activation",
        routing_impl="sparse",
        expert_offsets=[GOOD_OFFSETS, None, [0, 1, 2, 20]],
        partition_method="kmeans",
        partition_seed=7,
    )
    cfg.save_pretrained(tmp_path)
    back = RoutedLlamaConfig.from_pretrained(tmp_path)
    for key in ("num_experts", "num_experts_per_tok", "routed_layers", "router", "routing_impl", "expert_offsets",
                "partition_method", "partition_seed"):  # fmt: skip
        assert getattr(back, key) == getattr(cfg, key), key


def _routers(model):
    return {i: mlp.router for i, mlp in model.model.routed_mlps().items()}


def test_load_time_override_of_k(tiny_converted_dir):
    """from_pretrained(..., num_experts_per_tok=N) gives k = N in the config and in every router; N + 1 is refused."""
    saved = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True)
    assert saved.config.num_experts_per_tok == TINY_K
    assert {r.top_k for r in _routers(saved).values()} == {TINY_K}

    dense = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True, num_experts_per_tok=TINY_N)
    assert dense.config.num_experts_per_tok == TINY_N
    routers = _routers(dense)
    assert sorted(routers) == [0, 1, 2]
    assert {r.top_k for r in routers.values()} == {TINY_N}
    # the override changes only k: the loaded router buffers are the converted ones
    for i, r in routers.items():
        torch.testing.assert_close(r.centroids, _routers(saved)[i].centroids, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"num_experts_per_tok must be an integer in \[1, num_experts=5\], got 6"):
        AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True, num_experts_per_tok=TINY_N + 1)
    with pytest.raises(ValueError, match=r"routing_impl must be one of"):
        AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True, routing_impl="fastest")


def test_converted_generation_config_has_no_routing_field(tiny_converted_dir):
    """generation_config.json carries no routing field: `top_k` there would change sampling, N/k belong in config."""
    gen = json.loads((tiny_converted_dir / "generation_config.json").read_text())
    for key in ("num_experts_per_tok", "top_k", "num_experts", "routed_layers", "expert_offsets"):
        assert key not in gen, key
    cfg = json.loads((tiny_converted_dir / "config.json").read_text())
    assert cfg["num_experts"] == TINY_N and cfg["num_experts_per_tok"] == TINY_K  # they are in config.json instead


def test_converted_config_has_auto_map_for_every_head(tiny_converted_dir):
    """config.json maps AutoConfig, AutoModel and both Auto heads to classes defined in the shipped .py files."""
    cfg = json.loads((tiny_converted_dir / "config.json").read_text())
    assert cfg["model_type"] == "routed_llama"
    auto_map = cfg["auto_map"]
    expected = {
        "AutoConfig": "configuration_routed_llama.RoutedLlamaConfig",
        "AutoModel": "modeling_routed_llama.RoutedLlamaModel",
        "AutoModelForCausalLM": "modeling_routed_llama.RoutedLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_routed_llama.RoutedLlamaForSequenceClassification",
    }
    for auto_cls, target in expected.items():
        assert auto_map.get(auto_cls, "").split("--")[-1] == target, auto_cls
        module, cls = target.split(".")
        assert f"class {cls}(" in (tiny_converted_dir / f"{module}.py").read_text()


def test_load_time_override_of_routed_layers(tiny_converted_dir):
    """from_pretrained(..., routed_layers=[2]) loads a checkpoint routed in every layer with plain FFNs in layers 0-1
    (their router buffers are ignored), computing what the full model computes with k = N in those layers."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    full = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True).eval()
    part = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True, routed_layers=[2]).eval()
    assert part.config.routed_layers == [2]
    assert [type(layer.mlp) is LlamaMLP for layer in part.model.layers] == [True, True, False]
    for i in (0, 1):
        full.model.layers[i].mlp.router.top_k = TINY_N
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        assert (full(ids).logits - part(ids).logits).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"routed_layers \[3\] out of range"):
        AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True, routed_layers=[3])
