"""`pm-ray export`: a plain Hugging Face checkpoint for every backbone source, and the merged model
as one PEFT LoRA adapter (exact for line merges, truncated SVD with a measured error otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pm_ray.cli import main
from pm_ray.config import config_from_dict
from pm_ray.core.tensors import load_tensors
from pm_ray.eval.choices import choice_scores
from pm_ray.export import load_merged_model
from pm_ray.models.backbone import BUNDLED
from pm_ray.models.packages import package_dir
from pm_ray.pipeline import run_continual
from pm_ray.rundir import RunDir
from tinyconfig import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session) -> dict[str, Path]:
    """A line merge (average: an (α, adapter) stack) and an element-wise one (TIES) on tiny:llama."""
    out = {}
    for strategy in ("average", "ties"):
        cfg = tiny_config(tmp_path_factory.mktemp(strategy), merge={"strategy": strategy})
        out[strategy] = run_continual(config_from_dict(cfg), config_stem=strategy, quiet=True).run_dir
    return out


def merged_logits(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_merged_model(run_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_deltas(model: PeftModel) -> dict[str, torch.Tensor]:
    """Per module, the dense delta the loaded adapter adds: PEFT's own get_delta_weight."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach()
    return out


def export(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dense_export_loads_without_pm_ray_and_matches_the_merged_model(runs, tmp_path, capsys) -> None:
    out = tmp_path / "dense"
    code, stdout, _ = export(capsys, str(runs["ties"]), str(out))
    assert code == 0 and f"exported merged model to {out}" in stdout
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if "quantiz" in k or "gguf" in k]
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    probe = (
        "import sys, json, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
        f"print(json.dumps(m(input_ids=torch.tensor({ids.tolist()})).logits.tolist())); "
        "assert not [k for k in sys.modules if k.startswith('pm_ray')]"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(exported, merged_logits(runs["ties"], ids), rtol=1e-5, atol=1e-5)
    # a second export into the same, now non-empty, directory is refused and changes nothing
    before = sorted(p.name for p in out.iterdir())
    code, _, err = export(capsys, str(runs["ties"]), str(out))
    assert code == 2 and "exists and is not empty" in err and sorted(p.name for p in out.iterdir()) == before


def test_adapter_of_a_line_merge_is_exact(runs, tmp_path, capsys) -> None:
    run_dir, out = runs["average"], tmp_path / "adapter"
    code, stdout, _ = export(capsys, str(run_dir), str(out), "--adapter")
    assert code == 0 and "(exact, rank 12," in stdout  # 3 tasks of rank 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == 12 and not config["use_rslora"]
    assert config["base_model_name_or_path"] == str(out / "base")  # tiny:llama is no HF dir: base/ is written
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    model = PeftModel.from_pretrained(base, str(out))
    merged, _ = load_tensors(run_dir / "merged" / "delta.safetensors")
    deltas = peft_deltas(model)
    assert set(deltas) == set(merged)
    for key, delta in merged.items():
        torch.testing.assert_close(deltas[key], delta, rtol=1e-5, atol=1e-7)
    ids = torch.tensor([[1, 50, 51, 52, 53]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged_logits(run_dir, ids), rtol=1e-5, atol=1e-5)
    report = json.loads((out / "adapter_error.json").read_text())
    assert report["method"] == "exact" and report["max_relative_error"] < 1e-6
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "</s>"


@pytest.mark.parametrize("strategy, rank", [("ties", None), ("average", 2)])
def test_svd_adapter_reports_the_error_the_loaded_adapter_has(runs, tmp_path, capsys, strategy, rank) -> None:
    run_dir, out = runs[strategy], tmp_path / f"{strategy}-svd"
    args = [str(run_dir), str(out), "--adapter"] + (["--rank", str(rank)] if rank else [])
    code, stdout, _ = export(capsys, *args)
    assert code == 0 and "(svd, rank " in stdout
    report = json.loads((out / "adapter_error.json").read_text())
    assert report["method"] == "svd" and report["rank"] == (rank or 12)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out / "base")), str(out))
    merged, _ = load_tensors(run_dir / "merged" / "delta.safetensors")
    deltas = peft_deltas(model)
    for key, delta in merged.items():
        measured = (
            torch.linalg.matrix_norm(delta.double() - deltas[key].double()) / torch.linalg.matrix_norm(delta.double())
        ).item()
        assert report["modules"][key]["relative_error"] == pytest.approx(measured, rel=1e-4, abs=1e-7)
        assert f"{key}  rank {report['rank']}  relative error {report['modules'][key]['relative_error']:.3e}" in stdout
    assert 0 < report["max_relative_error"] < 1  # rank < 32 on 32 x 64 deltas: lossy, but not useless
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {w.shape[0] for k, w in weights.items() if ".lora_A." in k} == {report["rank"]}


def test_rank_without_adapter_is_bad_input(runs, tmp_path, capsys) -> None:
    code, _, err = export(capsys, str(runs["average"]), str(tmp_path / "x"), "--rank", "2")
    assert code == 2 and "--rank applies to --adapter exports only" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.assets
def test_bundled_gguf_model_exports_as_a_plain_checkpoint_with_the_same_scores(tmp_path, ray_session, capsys) -> None:
    entry = BUNDLED["smollm2-135m-instruct"]
    if package_dir(entry.package) is None or package_dir("gguf") is None:
        pytest.skip(f"bundled SmolLM2 is not installed (`{entry.pip_install}` and gguf, or make assets)")
    cfg = tiny_config(
        tmp_path / "runs",
        model={"name_or_path": "bundled:smollm2-135m-instruct"},
        tasks={"suite": "cit5", "variant": "quick", "limit": 1},
        trainer={"steps_per_task": 2, "batch_size": 2, "max_length": 64},
        fisher={"num_samples": 2, "batch_size": 2},
        eval={"max_rows": 2, "batch_size": 4},
    )
    run_dir = run_continual(config_from_dict(cfg), config_stem="smol", quiet=True).run_dir
    out = tmp_path / "export"
    code, _, err = export(capsys, str(run_dir), str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if "quantiz" in k or "gguf" in k]
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    merged, merged_tokenizer, run = load_merged_model(run_dir)
    task = run.load_tasks(run.read_state())[0]
    rows = task.test.slice(0, 3).to_pylist()
    expected = choice_scores(merged, merged_tokenizer, rows, batch_size=4, max_length=128)
    got = choice_scores(exported, tokenizer, rows, batch_size=4, max_length=128)
    assert len(got) == 3 and all(len(s) == len(r["choices"]) for s, r in zip(got, rows))
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, abs=1e-5)
    assert RunDir(run_dir).read_state().completed == 1
