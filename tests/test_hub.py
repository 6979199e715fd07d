"""--push-to-hub against a fake `huggingface_hub.HfApi` (no network): the repo is created, exactly the checkpoint's
files are uploaded, and a failure mid-upload is one line with the local checkpoint untouched. The model card's
metadata parses as a `huggingface_hub.ModelCard`."""

import hashlib
import json
from pathlib import Path

import httpx2
import pytest
import torch
from conftest import tiny_llama_config
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import convert
from routed_llama.checkpoint import model_card
from routed_llama.source import Source

REPO = "someone/routed-tiny"
CHECKPOINT_FILES = {"model.safetensors", "config.json", "configuration_routed_llama.py", "modeling_routed_llama.py",
                    "tokenizer.json", "tokenizer_config.json", "README.md", "conversion.json"}  # fmt: skip


class FakeHfApi:
    """Records what `checkpoint.upload` asks of the Hub; `fail_after` files it raises `error` (mid-upload)."""

    calls: list = []
    fail_after: int | None = None
    error: Exception | None = None

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, repo_type, exist_ok))

    def upload_folder(self, *, folder_path, repo_id, repo_type=None, commit_message=None, **kw):
        files = {}
        for path in sorted(Path(folder_path).rglob("*")):
            if path.is_file():
                if self.fail_after is not None and len(files) == self.fail_after:
                    raise self.error
                files[path.relative_to(folder_path).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        self.calls.append(("upload_folder", repo_id, repo_type, files))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls, FakeHfApi.fail_after, FakeHfApi.error = [], None, None
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # anything that bypasses the fake fails instead of reaching out
    return FakeHfApi


@pytest.fixture(scope="module")
def dense_with_tokenizer(tmp_path_factory):
    """A tiny random Llama with a small word-level fast tokenizer built here (no download)."""
    folder = tmp_path_factory.mktemp("hub") / "dense"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *[f"w{i}" for i in range(100)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)  # fmt: skip
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# A tiny base\n")
    return folder


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def push(src, out, capsys):
    rc = convert.main([str(src), str(out), "--num-clusters", "5", "--top-k", "2", "--no-progress",
                       "--push-to-hub", REPO])  # fmt: skip
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def test_push_creates_the_repo_and_uploads_exactly_the_checkpoint(dense_with_tokenizer, tmp_path, fake_hub, capsys):
    out = tmp_path / "routed"
    rc, stdout, err = push(dense_with_tokenizer, out, capsys)
    assert rc == 0 and err == [] and stdout[0].startswith(f"wrote {out}")
    assert fake_hub.calls[0] == ("create_repo", REPO, "model", True)
    (kind, repo, repo_type, uploaded), = fake_hub.calls[1:]
    assert (kind, repo, repo_type) == ("upload_folder", REPO, "model")
    local = {p.name for p in out.iterdir()}
    assert set(uploaded) == local  # exactly the checkpoint's files, nothing from beside it
    assert CHECKPOINT_FILES <= local
    assert uploaded == digests(out)  # byte for byte


@pytest.mark.parametrize("error", ["http-500", "connection"])
def test_failure_mid_upload_is_one_line_and_keeps_the_checkpoint(error, dense_with_tokenizer, tmp_path, fake_hub,
                                                                 capsys):  # fmt: skip
    request = httpx2.Request("POST", f"https://huggingface.co/api/models/{REPO}/commit/main")
    fake_hub.fail_after = 3
    response = httpx2.Response(500, request=request)
    fake_hub.error = (
        HfHubHTTPError("500 Server Error: Internal Server Error\nmore detail", response=response)
        if error == "http-500" else httpx2.ConnectError("connection refused", request=request)
    )  # fmt: skip
    out = tmp_path / "routed"
    rc, stdout, err = push(dense_with_tokenizer, out, capsys)
    assert rc == 2 and stdout == [] and len(err) == 1
    assert err[0].startswith(f"convert.py: error: uploading {out} to {REPO} failed (the local checkpoint is complete)")
    assert fake_hub.calls == [("create_repo", REPO, "model", True)]
    assert CHECKPOINT_FILES <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routed"]  # nothing half-written beside it
    before = digests(out)
    fake_hub.fail_after = None
    rc = convert.main([str(dense_with_tokenizer), str(out), "--num-clusters", "5", "--top-k", "2", "--no-progress"])
    assert rc == 2 and digests(out) == before  # still there, unchanged, and not replaced without --overwrite


def test_model_card_metadata_parses_as_a_hub_model_card(dense_with_tokenizer, tmp_path, fake_hub, capsys):
    """The card's YAML parses with huggingface_hub.ModelCard; the base's licence (from its own card) is carried
    over; a Hub base gets `base_model`. (ModelCard.validate() posts to the Hub, so it cannot run offline.)"""
    out = tmp_path / "routed"
    assert push(dense_with_tokenizer, out, capsys)[0] == 0
    data = ModelCard.load(out / "README.md").data
    assert data.library_name == "transformers" and data.license == "mit"
    assert {"routed-llama", "mixture-of-experts"} <= set(data.tags) and data.base_model is None  # a local base
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    record = json.loads((out / "conversion.json").read_text())
    card = model_card(config, record, Source("org/base-model", hub_id="org/base-model"), {"license": "apache-2.0"})
    data = ModelCard(card).data.to_dict()
    assert data["base_model"] == "org/base-model" and data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers" and "routed-llama" in data["tags"]
