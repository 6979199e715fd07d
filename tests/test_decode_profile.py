"""benchmarks/decode_profile.py on the CPU: the three arms per k/N with their step times (no device trace on the CPU,
so empty kernel tables), and the kernel-name classifier its categories come from."""

import json

from test_sparse import load_script


def test_decode_profile_smoke_and_kernel_categories(tmp_path):
    """decode_profile.py --device cpu (tiny shape) writes decode_profile.json with dense, ideal and routed rows per
    k/N, each with a positive step time and the documented keys; kernel names fall into the documented categories."""
    profile = load_script("decode_profile")
    argv = ["--device", "cpu", "--shapes", "tiny", "--ratios", "0.5", "0.25", "--steps", "3", "--profile-steps", "2",
            "--out", str(tmp_path)]  # fmt: skip
    assert profile.main(argv) == 0
    doc = json.loads((tmp_path / "decode_profile.json").read_text())
    assert {"hardware", "date", "command", "args", "rows"} <= doc.keys() and doc["hardware"]["device"] == "cpu"
    rows = doc["rows"]
    keys = {"model", "batch", "k_over_n", "compiled", "arm", "ran", "step_ms", "device_us", "kernels_per_step",
            "gap_us", "busy", "ffn_share", "categories", "kernels"}  # fmt: skip
    for r in rows:
        assert keys <= r.keys() and "error" not in r, r
        assert r["model"] == "tiny" and r["batch"] == 1 and r["compiled"] is False
        assert 0 < r["step_ms"]["min"] <= r["step_ms"]["median"] <= r["step_ms"]["max"], r
        assert r["device_us"] is None and r["categories"] == {} and r["kernels"] == []  # no device trace on the CPU
    by_ratio = {}
    for r in rows:
        by_ratio.setdefault(r["k_over_n"], []).append(r["arm"])
    assert by_ratio == {0.5: ["dense", "ideal", "routed"], 0.25: ["dense", "ideal", "routed"]}
    assert {r["ran"] for r in rows if r["arm"] == "routed"} == {"mask"}  # the CPU's path for the routed FFN
    samples = {
        "_gate_up_kernel": "routed_ffn",
        "_down_kernel": "routed_ffn",
        "_centroid_scores_kernel": "routed_ffn",
        "nvjet_tst_64x8_64x16_2x1_v_bz_TNT": "gemm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64": "gemm",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, float, 128, 16, 4, 4, false, false>": "gemm",
        "triton_tem_fused_mm_0": "gemm",
        "flash_fwd_kernel": "attention",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80": "attention",
        "triton_poi_fused_add_0": "other",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1": "other",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    assert {name: profile.category(name) for name in samples} == samples
    # the PNG (drawn only from rows with a device trace, so not by the CPU run above): from a row shaped like a GPU one
    row = {**rows[0], "categories": {c: 10.0 for c in profile.CATEGORIES}, "gap_us": 5.0}
    profile.plot({"rows": [row]}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000 and not (tmp_path / "decode_profile.png").exists()
