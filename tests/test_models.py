"""finetune/models.py and finetune/adapters.py: every way loading a base or an adapter can go wrong is refused in one
line (a `ModelError`/`AdapterError`; exit 2 through the command line), and a sound load is exact.

The models are tiny random Llamas with a 40-word tokenizer written here; the data is a tiny GLUE folder written
here: nothing needs ../shared, the stand-in or the network.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune import adapters, cli, models
from finetune.adapters import AdapterError
from finetune.models import ModelError

from conftest import tiny_llama_config

WORDS = ["[PAD]", "[UNK]", "</s>", *"premise hypothesis sentence the a is not good bad film rain it was".split()]
ROUTED_N = 5  # the tiny routed checkpoint: 150 neurons in 5 clusters


def write_tokenizer(folder):
    """A word-level tokenizer over WORDS (unknown words -> [UNK]) with pad and EOS tokens, saved into `folder`."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    tok.save_pretrained(folder)


def write_glue(folder):
    """A tiny RTE folder in the GLUE TSV layout: 8 train rows, 4 dev rows."""
    rows = ["index\tsentence1\tsentence2\tlabel"]
    rows += [f"{i}\tthe film was good\tit is {'not ' * (i % 2)}good\t{'not_entailment' if i % 2 else 'entailment'}"
             for i in range(8)]  # fmt: skip
    (folder / "RTE").mkdir(parents=True)
    (folder / "RTE" / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "RTE" / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")
    return folder


def save_base(folder, cls_name="LlamaForCausalLM", seed=0, **config):
    """A tiny random Llama of class `cls_name` (untied LM head: its lm_head is in the file) with the tokenizer."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_llama_config(vocab_size=len(WORDS), **config))
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def routed_dir(base_dir, tmp_path_factory):
    from convert import ConvertSettings, convert

    out = tmp_path_factory.mktemp("routed") / "routed"
    return convert(ConvertSettings(str(base_dir), str(out), num_clusters=ROUTED_N, top_k=2, progress=False))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"))


def variant(src, dest, edit):
    """A copy of the checkpoint `src` whose model.safetensors tensors are edited by `edit(dict)`."""
    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


UP = "model.layers.1.mlp.up_proj.weight"


# --- bases ----------------------------------------------------------------------------------------------------------


def test_a_sound_base_loads_every_weight_and_a_new_head(base_dir):
    model = models.load_classifier(str(base_dir), 2)
    saved = load_file(str(base_dir / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == (set(saved) - {"lm_head.weight"}) | {"score.weight"}  # the LM head is dropped, score new
    assert all(torch.equal(state[k], saved[k]) for k in state if k != "score.weight")
    assert model.config.pad_token_id == 0 and model.score.weight.shape == (2, 64)


@pytest.mark.parametrize("case,needle", [
    ("missing", f"is missing weights: {UP}"),
    ("unexpected", "has unexpected weights: model.layers.1.mlp.extra.weight"),
    ("shape", f"weight {UP} has shape [10, 64], the config implies [150, 64]"),
])  # fmt: skip
def test_weights_that_do_not_match_the_config(base_dir, tmp_path, case, needle):
    edits = {
        "missing": lambda t: t.pop(UP),
        "unexpected": lambda t: t.update({"model.layers.1.mlp.extra.weight": torch.zeros(3, 64)}),
        "shape": lambda t: t.update({UP: torch.zeros(10, 64)}),
    }
    bad = variant(base_dir, tmp_path / case, edits[case])
    with pytest.raises(ModelError) as err:
        models.load_classifier(str(bad), 2)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unreadable_or_absent_weight_files(base_dir, tmp_path):
    truncated = shutil.copytree(base_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 100, len(data) - 1):  # into the tensors, into the header, one byte short
        (truncated / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ModelError, match="cannot load the weights of"):
            models.load_classifier(str(truncated), 2)
    empty = shutil.copytree(base_dir, tmp_path / "no-weights")
    (empty / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="cannot load the weights of .*no file named model.safetensors"):
        models.load_classifier(str(empty), 2)


def test_a_classification_checkpoint_keeps_its_head_and_needs_its_label_count(tmp_path):
    three = save_base(tmp_path / "three", "LlamaForSequenceClassification", num_labels=3)
    assert models.saved_num_labels(three) == 3
    with pytest.raises(ModelError, match="has a classification head with 3 labels; the task needs num_labels=2"):
        models.load_classifier(str(three), 2)
    model = models.load_classifier(str(three), 3)
    torch.testing.assert_close(model.score.weight, load_file(str(three / "model.safetensors"))["score.weight"])
    # a config.json that claims 2 labels over a 3-row score weight: a shape mismatch, not a silent re-init
    cfg = json.loads((three / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}
    (three / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"weight score.weight has shape \[3, 64\], the config implies \[2, 64\]"):
        models.load_classifier(str(three), 2)
    # and without its score weight, a classification checkpoint is incomplete (no new head is expected there)
    two = variant(three, tmp_path / "no-score", lambda t: t.pop("score.weight"))
    with pytest.raises(ModelError, match="is missing weights: score.weight"):
        models.load_classifier(str(two), 2)


def test_not_a_llama_and_not_a_model(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="only Llama-architecture"):
        models.load_classifier(str(tmp_path / "gpt2"), 2)
    with pytest.raises(ModelError, match="no such file or folder"):
        models.load_classifier(str(tmp_path / "nowhere"), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        models.load_tokenizer(str(tmp_path / "empty"))


def test_a_routed_checkpoint(routed_dir, tmp_path):
    model = models.load_classifier(str(routed_dir), 2)
    assert model.config.model_type == "routed_llama" and model.config.num_experts_per_tok == 2
    assert models.load_classifier(str(routed_dir), 2, top_k=ROUTED_N).config.num_experts_per_tok == ROUTED_N
    for k in (0, ROUTED_N + 1):
        with pytest.raises(ModelError, match=rf"top_k must be an integer in \[1, {ROUTED_N}\]"):
            models.load_classifier(str(routed_dir), 2, top_k=k)
    router = next(k for k in load_file(str(routed_dir / "model.safetensors")) if ".router." in k)
    bad = variant(routed_dir, tmp_path / "no-router", lambda t: t.pop(router))
    with pytest.raises(ModelError, match=f"is missing weights: {router}"):
        models.load_classifier(str(bad), 2)


def test_top_k_context_sets_k_and_restores_it_through_peft_even_on_an_error(routed_dir):
    from peft import LoraConfig, TaskType, get_peft_model

    model = models.load_classifier(str(routed_dir), 2)
    wrapped = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["q_proj"]))

    def ks():
        base = wrapped.get_base_model()
        return {base.config.num_experts_per_tok, *(m.router.top_k for m in base.model.routed_mlps().values())}

    with models.top_k(wrapped, ROUTED_N):
        assert ks() == {ROUTED_N}
    assert ks() == {2}
    with pytest.raises(RuntimeError, match="inside"), models.top_k(model, 1):
        assert ks() == {1}
        raise RuntimeError("inside")
    assert ks() == {2}
    with models.top_k(model, None):
        assert ks() == {2}


def test_top_k_on_a_plain_base_is_refused(base_dir):
    with pytest.raises(ModelError, match="not a routed checkpoint"):
        models.load_classifier(str(base_dir), 2, top_k=2)


# --- adapters -------------------------------------------------------------------------------------------------------


def save_adapter(base, folder, r=4):
    """An untrained LoRA adapter (B made non-zero, so that it changes the output) saved as `run` saves one."""
    from peft import LoraConfig, TaskType, get_peft_model

    model = models.load_classifier(str(base), 2)
    fingerprint = models.base_fingerprint(model)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=r, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["score"]))  # fmt: skip
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapters.save_adapter(peft_model, folder, {"base": str(base), "base_fingerprint": fingerprint, "task": "rte",
                                               "num_labels": 2, "max_length": 32})  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    return save_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def test_a_sound_adapter_reloads_as_peft_loads_it(adapter_dir, base_dir):
    from peft import PeftModel

    model, tok, info = adapters.load_finetuned(adapter_dir)
    reference = PeftModel.from_pretrained(models.load_classifier(str(base_dir), 2), str(adapter_dir)).eval()
    batch = tok(["the film was good", "it is not bad rain"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = model(**batch).logits, reference(**batch).logits
        plain = models.load_classifier(str(base_dir), 2).eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, plain)  # the adapter is really applied
    assert info["task"] == "rte" and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("case,needle", [
    ("missing", "lacks weights: "),
    ("unexpected", "has unexpected weights: base_model.model.extra.weight"),
    ("shape", "has mis-shaped weights: "),
])  # fmt: skip
def test_adapter_weights_that_do_not_fit(adapter_dir, tmp_path, case, needle):
    bad = shutil.copytree(adapter_dir, tmp_path / case)
    path = bad / adapters.PEFT_WEIGHTS
    tensors = load_file(str(path))
    lora_a = sorted(k for k in tensors if "lora_A" in k)[0]
    if case == "missing":
        tensors.pop(lora_a)
    elif case == "unexpected":
        tensors["base_model.model.extra.weight"] = torch.zeros(2)
    else:
        tensors[lora_a] = torch.zeros(8, 64)  # r = 8 in the file, r = 4 in adapter_config.json
    save_file(tensors, str(path))
    with pytest.raises(AdapterError) as err:
        adapters.load_finetuned(bad)
    assert needle in str(err.value) and "\n" not in str(err.value)
    if case != "unexpected":
        assert lora_a in str(err.value)
    if case == "shape":
        assert "[8, 64] in the file, [4, 64] expected" in str(err.value)


def test_unreadable_adapter_files(adapter_dir, tmp_path):
    truncated = shutil.copytree(adapter_dir, tmp_path / "truncated")
    data = (truncated / adapters.PEFT_WEIGHTS).read_bytes()
    (truncated / adapters.PEFT_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=f"cannot read .*{adapters.PEFT_WEIGHTS}"):
        adapters.load_finetuned(truncated)
    for name in (adapters.PEFT_CONFIG, adapters.PEFT_WEIGHTS):
        missing = shutil.copytree(adapter_dir, tmp_path / f"no-{name}")
        (missing / name).unlink()
        with pytest.raises(AdapterError, match=f"has no {name}"):
            adapters.load_finetuned(missing)
    broken = shutil.copytree(adapter_dir, tmp_path / "broken-info")
    (broken / adapters.RUN_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="is not valid JSON"):
        adapters.read_info(broken)
    (broken / adapters.RUN_FILE).write_text(json.dumps({"base": "x"}))
    with pytest.raises(AdapterError, match="lacks base_fingerprint, task, num_labels"):
        adapters.read_info(broken)


def test_an_adapter_over_another_base(adapter_dir, tmp_path):
    other = save_base(tmp_path / "other", seed=7)
    with pytest.raises(AdapterError, match="trained on a different base"):
        adapters.load_finetuned(adapter_dir, base=str(other))


def test_merge_refuses_before_loading_and_writes_atomically(adapter_dir, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    assert adapters.merge(adapters.MergeSettings(str(adapter_dir), str(out))) == out
    assert json.loads((out / "merged_from.json").read_text())["adapter"] == str(adapter_dir)
    monkeypatch.setattr(adapters, "load_finetuned", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(Exception, match="exists and is not empty; pass --overwrite"):
        adapters.merge(adapters.MergeSettings(str(adapter_dir), str(out)))


# --- through the command line: one line, exit 2 ---------------------------------------------------------------------


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune {argv[0]}: error: "), err
    return lines[0]


def test_command_line_loading_failures(base_dir, adapter_dir, glue_dir, tmp_path, capsys):
    data = ["--task", "rte", "--data-dir", str(glue_dir), "--epochs", "1"]
    bad = variant(base_dir, tmp_path / "missing", lambda t: t.pop(UP))
    assert f"is missing weights: {UP}" in one_line_error(capsys, ["run", "--model", str(bad), *data])
    (bad / "model.safetensors").write_bytes(b"\x00" * 16)
    assert "cannot load the weights" in one_line_error(capsys, ["run", "--model", str(bad), *data])
    three = save_base(tmp_path / "three", "LlamaForSequenceClassification", num_labels=3)
    assert "3 labels" in one_line_error(capsys, ["run", "--model", str(three), *data])
    assert "not a routed checkpoint" in one_line_error(capsys, ["run", "--routed", str(base_dir), *data])
    truncated = shutil.copytree(adapter_dir, tmp_path / "adapter")
    (truncated / adapters.PEFT_WEIGHTS).write_bytes(b"\x00" * 16)
    line = one_line_error(capsys, ["evaluate", str(truncated), "--data-dir", str(glue_dir)])
    assert f"cannot read {truncated / adapters.PEFT_WEIGHTS}" in line
    assert "not a routed checkpoint" in one_line_error(capsys, ["evaluate", str(adapter_dir), "--top-k", "2",
                                                                "--data-dir", str(glue_dir)])  # fmt: skip
    assert not (tmp_path / "merged").exists()
    one_line_error(capsys, ["merge", str(truncated), str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_evaluate_scores_the_adapter_on_dev(adapter_dir, glue_dir, capsys):
    assert cli.main(["evaluate", str(adapter_dir), "--data-dir", str(glue_dir), "--batch-size", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    from finetune.evaluate import EvaluateSettings, evaluate_adapter

    r = evaluate_adapter(EvaluateSettings(str(adapter_dir), data_dir=str(glue_dir), batch_size=4))
    assert out["task"] == "rte" and out["metrics"] == r["metrics"]  # batching does not change predictions
    assert len(r["predictions"]) == 4 and set(r["predictions"]) <= {0, 1}
    assert r["metrics"]["accuracy"] == 100 * sum(p == (i % 2) for i, p in enumerate(r["predictions"])) / 4


@pytest.mark.slow
def test_the_stand_in_gguf_loads_with_a_new_head_only(standin_gguf):
    model = models.load_classifier("stand-in", 2)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id is not None
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")  # plain fp32 weights
    assert model.score.weight.shape == (2, model.config.hidden_size)
