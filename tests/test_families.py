"""The architecture matrix: tiny random models of 16 causal LM families, each through the real run code path.

Every family's tiny model (2 layers, hidden 64, the SmolLM2 tokenizer) is built from its transformers config
class with ``model.random_init``, weights drawn large (``initializer_range=0.2``) and each family's logit
transform made to bite (Gemma 2's soft-cap at 3, Cohere's logit scale 4, Granite's logit divisor 1/4), so that a
speed-up skipping one would show. One 2-step training run per family is shared by the tests below (built on
first use, once per session). Each family must:

- train 2 steps with its default targets (``model.lora_targets: auto``) and every speed-up on;
- give a held-out loss equal to plain transformers' within 1e-5 relative;
- keep packed examples apart (the probe the run uses), or be refused up front;
- give a merged export whose logits equal the run's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import open_dict

from petuner.data import build_data
from petuner.data.packing import attend_within_examples, check_packing_exact
from petuner.errors import ConfigError, PetunerError
from petuner.families import PACKING_LEAKS, default_targets, tiny_random_init
from petuner.models import load_model, load_tokenizer

from .conftest import make_cfg

# each family's logit transform made to bite; weights drawn large so that logits are large
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {},
    "gemma2": {"final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0},
    "gemma3_text": {}, "phi3": {}, "gpt2": {}, "gpt_neox": {}, "falcon": {},
    "cohere": {"logit_scale": 4.0}, "granite": {"logits_scaling": 0.25}, "olmo2": {},
    "mixtral": {}, "qwen3_moe": {},
}
SMALL = ("trainer.max_steps=2", "trainer.save_every=null", "data.limit=24", "data.eval_size=8",
         "trainer.loss_chunk=16", "trainer.eval_batch_size=4")


def family_cfg(family: str, run_dir: Path, *overrides: str) -> Any:
    cfg = make_cfg(run_dir, *SMALL, *overrides)
    with open_dict(cfg):
        cfg.model.random_init = tiny_random_init(family, initializer_range=0.2, **FAMILIES[family])
    return cfg


PROBE = torch.randint(1000, (2, 12), generator=torch.Generator().manual_seed(0))


@functools.cache
def run_logits(run_dir: str) -> torch.Tensor:
    """The finished run's logits on PROBE (``petuner.load``), once per run."""
    from petuner.run_folder import load

    with torch.no_grad():
        return load(run_dir).model(input_ids=PROBE).logits


@pytest.fixture(scope="session")
def family_run(tmp_path_factory: pytest.TempPathFactory):
    """family → (its config, the finished run's info), each trained once per session on first use."""
    from petuner.run import run

    done: dict[str, tuple[Any, dict[str, Any]]] = {}

    def get(family: str) -> tuple[Any, dict[str, Any]]:
        if family not in done:
            cfg = family_cfg(family, tmp_path_factory.mktemp(family) / "run")
            done[family] = cfg, run(cfg)
        return done[family]

    return get


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The runs' data (one tokenizer, one data config for every family): built once."""
    from petuner.config import validate

    cfg = family_cfg("llama", tmp_path_factory.mktemp("data") / "run")
    return build_data(validate(cfg).data, load_tokenizer(cfg.model), "causal_lm")


def plain_eval_loss(cfg: Any, data: Any) -> float:
    """Token-weighted held-out loss of plain transformers (no petuner hook) over the run's eval batches."""
    model = load_model(cfg.model).eval()
    total, items = 0.0, 0
    with torch.no_grad():
        size = cfg.trainer.eval_batch_size
        for start in range(0, len(data.eval), size):
            batch = data.collate([data.eval[i] for i in range(start, min(start + size, len(data.eval)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            items += n
    return total / items


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_with_its_default_targets_and_matches_plain_transformers(family: str, family_run,
                                                                            eval_data) -> None:
    cfg, info = family_run(family)
    assert info["steps"] == 2
    leaves = {name.rsplit(".", 1)[-1] for name in info["targets"]}
    assert leaves == set(default_targets(family)), info["targets"]
    results = info["results"]
    assert torch.isfinite(torch.tensor(results["eval/loss_after"]))
    plain = plain_eval_loss(cfg, eval_data)
    # every speed-up on (labelled logits, chunked loss, lean SwiGLU, the model's own attention default); adapters
    # start at zero, so the held-out loss before training is the base model's: equal to 1e-5 relative
    assert results["eval/loss_before"] == pytest.approx(plain, rel=1e-5)
    assert results["eval/loss_after"] != results["eval/loss_before"]  # the 2 steps moved the adapter
    if family in ("mixtral", "qwen3_moe"):
        assert results["eval/aux_loss_before"] > 0  # reported apart from the language-model loss


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_keeps_packed_examples_apart_or_is_refused(family: str, family_run) -> None:
    """The probe the run uses at set-up, on each family: packed B after A = B alone; Falcon's leak is caught by
    the probe itself, and refused up front by its family entry (one line, before data or weights)."""
    cfg, _ = family_run(family)
    model = load_model(cfg.model)
    attend_within_examples(model)
    if family in PACKING_LEAKS:
        with pytest.raises(PetunerError, match="lets packed examples attend to each other"):
            check_packing_exact(model)
        return
    assert check_packing_exact(model) < 1e-5


def test_leaky_family_is_refused_before_data_or_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import petuner.run as run_module

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the refusal came after the data was built")

    monkeypatch.setattr(run_module, "build_data", never)
    with pytest.raises(ConfigError, match=r"data.packing=true: model_type=falcon would let packed examples attend"):
        run_module.run(family_cfg("falcon", tmp_path / "run", "data.packing=true"))


def test_an_attention_the_model_lacks_is_refused_before_data_or_weights(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import petuner.run as run_module

    monkeypatch.setattr(run_module, "build_data", None)  # the refusal must come first
    with pytest.raises(ConfigError, match=r"^model.attn_implementation=sdpa: Gemma2ForCausalLM does not support it; "
                                          r"allowed: eager, flash_attention_2 \(or auto\)$"):
        run_module.run(family_cfg("gemma2", tmp_path / "run", "model.attn_implementation=sdpa"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merged_export_equals_the_run(family: str, family_run, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from petuner.export import export

    cfg, _ = family_run(family)
    out = export(cfg.run_dir, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        want, got = run_logits(str(cfg.run_dir)), merged(input_ids=PROBE).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# transformers' GGUF loader reads these families back (Gemma 1 and OLMo2 only llama.cpp reads: test_llama_cpp)
GGUF_RELOADED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


@pytest.mark.parametrize("family", GGUF_RELOADED)
def test_family_gguf_reloads_in_transformers_with_the_run_logits(family: str, family_run, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """f32 GGUF → transformers (``gguf_file=``): the merged run's logits within 1e-4. transformers' loader does
    not read Gemma 2's soft-cap keys, so they are checked in the file and passed to the loader. The vocabulary
    (family-independent, checked by test_gguf and test_llama_cpp) is left out: reading 49k tokens back costs
    transformers 16 s a file."""
    import gguf
    from transformers import AutoModelForCausalLM

    from petuner import gguf_export
    from petuner.export import export

    monkeypatch.setattr(gguf_export, "write_tokenizer", lambda *args: None)
    cfg, _ = family_run(family)
    out = export(cfg.run_dir, "gguf", tmp_path / "model.gguf", dtype="f32")
    extra: dict[str, float] = {}
    if family == "gemma2":
        fields = gguf.GGUFReader(str(out)).fields
        extra = {key: float(fields[f"gemma2.{key}"].parts[-1][0])
                 for key in ("attn_logit_softcapping", "final_logit_softcapping")}
        assert extra == {key: FAMILIES["gemma2"][key] for key in extra}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        want, got = run_logits(str(cfg.run_dir)), reloaded(input_ids=PROBE).logits
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                                    "olmo2"])
def test_llama_cpp_runs_the_gguf_export_with_petuner_generates_greedy_tokens(family: str, family_run,
                                                                             tmp_path: Path) -> None:
    """A real client: llama.cpp (llama-cpp-python) loads each family's f32 GGUF export, tokenizes the chat prompt
    as the run's tokenizer does, and decodes greedily the tokens ``petuner generate`` decodes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from petuner.export import export
    from petuner.generate import Sampling, load_generator

    cfg, _ = family_run(family)
    out = export(cfg.run_dir, "gguf", tmp_path / "model.gguf", dtype="f32")
    gen = load_generator(cfg.run_dir)
    text = gen.messages_text([{"role": "user", "content": "What is the capital of France?"}])
    batch = gen.encode([text])
    ours = gen.generate_ids(batch, Sampling(max_new_tokens=8))[0].tolist()
    prompt = batch["input_ids"][0].tolist()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=1, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == len(ours) or token == llm.token_eos():
            break
    assert theirs == ours[:len(theirs)] and len(theirs) == len(ours)


def test_gpt2_peft_export_sets_fan_in_fan_out_and_reloads_in_peft(family_run, tmp_path: Path) -> None:
    import json

    import peft

    from petuner.export import export

    cfg, _ = family_run("gpt2")
    out = export(cfg.run_dir, "peft", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reloaded = peft.PeftModel.from_pretrained(load_model(cfg.model), str(out)).eval()
    with torch.no_grad():
        want, got = run_logits(str(cfg.run_dir)), reloaded(input_ids=PROBE).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.slow
def test_refusals_are_one_line_with_status_2_from_the_command_line(tmp_path: Path) -> None:
    """``python train.py``: Falcon with packing, and Gemma 2 with sdpa, each one line on stderr, exit status 2."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cases = {"falcon": ("data.packing=true",), "gemma2": ("model.attn_implementation=sdpa",)}
    for family, overrides in cases.items():
        done = subprocess.run([sys.executable, str(root / "train.py"), "model=tiny_llama", "logger=none",
                               f"model.random_init.model_type={family}", f"run_dir={tmp_path / family}", *overrides],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


def test_gguf_refuses_a_tokenizer_it_cannot_list_before_loading_weights(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A Gemma run whose tokenizer is not byte-level BPE (here BERT's WordPiece): one line, no weights loaded."""
    import petuner.export as export_module
    from petuner.run import run

    cfg = family_cfg("gemma", tmp_path / "run", "model.tokenizer=asset:minilm-l6")
    run(cfg)
    monkeypatch.setattr(export_module, "load", None)  # the refusal must come first
    with pytest.raises(PetunerError, match=r"^--format gguf writes byte-level BPE tokenizers .* is WordPiece$"):
        export_module.export(cfg.run_dir, "gguf", tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
