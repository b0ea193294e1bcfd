"""--for vllm|sglang|llama.cpp|ollama: each engine rule refuses in one line naming the fix, a passing export
carries the engine's command; --format gguf-lora writes llama.cpp's adapter layout."""

from __future__ import annotations

import json
import shutil

import pytest

from petuner.cli import main
from petuner.errors import PetunerError
from petuner.serving import check_engine

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": False, "use_rslora": False, "bias": "none",
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]}


def check(engine: str, model_type: str = "llama", quantized: bool = False, **changes) -> None:
    check_engine(engine, {**LORA, **changes}, model_type=model_type, quantized_base=quantized)


@pytest.mark.parametrize(("engine", "changes", "message"), [
    ("vllm", {"r": 600}, "rank 600 is above vLLM's largest max_lora_rank 512; pass --as-lora --rank 512"),
    ("vllm", {"use_dora": True}, "does not serve DoRA (use_dora); pass --as-lora"),
    ("vllm", {"modules_to_save": ["score"]}, "modules_to_save: score"),
    ("vllm", {"target_modules": ["lm_head"]}, "targets lm_head, which the engine does not serve"),
    ("sglang", {"target_modules": []}, "targets no module"),
    ("vllm", {"peft_type": "LOHA"}, "peft_type LOHA, the engine takes LoRA only; pass --as-lora"),
    ("vllm", {"rank_pattern": {"model.layers.0.self_attn.q_proj": 4}}, "pass --as-lora to fold them"),
    ("llama.cpp", {"use_rslora": True}, "ignores use_rslora"),
    ("sglang", {"bias": "lora_only"}, "trains biases"),
])
def test_each_engine_rule_refuses_naming_the_fix(engine, changes, message) -> None:
    with pytest.raises(PetunerError, match=r"^--for ") as err:
        check(engine, **changes)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_what_engines_take() -> None:
    check("vllm", r=4)  # below the smallest bucket above 1: served with --max-lora-rank 8, vLLM pads it
    check("vllm", use_rslora=True)  # vLLM reads use_rslora
    check("ollama")
    with pytest.raises(PetunerError, match="Ollama's ADAPTER takes Llama, Mistral and Gemma bases, this one is qwen2"):
        check("ollama", model_type="qwen2")
    with pytest.raises(PetunerError, match="quantized base"):
        check("ollama", quantized=True)


def test_vllm_export_writes_its_command_with_the_bucket_rank(trained_run, tmp_path) -> None:
    from petuner.export import export

    out = export(trained_run, "peft", tmp_path / "chat", as_lora=True, rank=5, engine="vllm")
    command = (out / "serve-vllm.sh").read_text()
    assert f"--lora-modules chat={out.resolve()}" in command and command.rstrip().endswith("--max-lora-rank 8")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 5


def test_dora_for_vllm_without_as_lora_is_one_line_exit_2_before_loading(trained_run, tmp_path, capsys) -> None:
    dora = tmp_path / "dora"  # the folder's config says DoRA: refused from it alone, its weights never read
    shutil.copytree(trained_run, dora)
    config = (dora / "config.yaml").read_text().replace("variant: standard", "variant: dora")
    (dora / "config.yaml").write_text(config)
    (dora / "adapter.safetensors").unlink()
    assert main(["export", str(dora), "--for", "vllm", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --for vllm: the engine does not serve DoRA") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_gguf_lora_holds_llama_cpp_adapter_layout(trained_run, tmp_path) -> None:
    import gguf
    import torch
    from safetensors.torch import load_file

    from petuner.export import export
    from petuner.gguf_export import permute_rotary

    out = export(trained_run, "gguf-lora", tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(out))
    field = {f.name: f for f in reader.fields.values()}
    assert bytes(field["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(field["adapter.type"].parts[-1]).decode() == "lora"
    assert float(field["adapter.lora.alpha"].parts[-1][0]) == 16.0  # LoRA r=8, alpha 16: unchanged
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    trained = load_file(trained_run / "adapter.safetensors")
    q = "model.layers.1.self_attn.q_proj"
    a, b = trained[f"{q}.lora_A.weight"], trained[f"{q}.lora_B.weight"]
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_a"], a)
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_b"], permute_rotary(b, 4))  # q's rows as the base GGUF's
    assert torch.equal(tensors["blk.1.attn_v.weight.lora_b"], trained["model.layers.1.self_attn.v_proj.lora_B.weight"])
