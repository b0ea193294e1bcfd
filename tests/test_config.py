"""Bad configs fail fast: one line naming the value and what is allowed, before data or weights load."""

from __future__ import annotations

import pytest

from petuner.config import check_command_line, check_group_choices
from petuner.errors import ConfigError, PetunerError
from petuner.run import run


@pytest.fixture(autouse=True)
def nothing_heavy(monkeypatch):
    """Every case here must fail before data is read or weights are loaded."""
    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before validation")

    monkeypatch.setattr("petuner.run.build_data", heavy)
    monkeypatch.setattr("petuner.run.load_tokenizer", heavy)


CASES = [
    (("adapter.r=0",), r"adapter.r=0: must be an integer > 0"),
    (("adapter.r=2.5",), r"adapter.r=2.5: must be an integer > 0"),
    (("adapter.alpha=abc",), r"adapter.alpha='abc': must be a number > 0"),
    (("adapter.dropout=1.5",), r"adapter.dropout=1.5: must be a number in \[0, 1\)"),
    (("adapter.scaling=wide",), r"adapter.scaling='wide': allowed: standard, rslora"),
    (("adapter.bias=some",), r"adapter.bias='some': allowed: none, all, lora_only"),
    (("+adapter.rank=4",), r"adapter.rank is not an option of adapter=lora; allowed: r, alpha"),
    (("adapter.target_modules=[nope]",), r"adapter.target_modules=\['nope'\] matches no linear layer .*q_proj"),
    (("adapter.r=65",), r"adapter.r=65 exceeds the size of model.layers.0.self_attn.q_proj"),
    (("trainer.batch_size=0",), r"trainer.batch_size=0: must be an integer >= 1"),
    (("trainer.max_steps=-3",), r"trainer.max_steps=-3: must be an integer >= 1 or null"),
    (("trainer.max_steps=null", "trainer.epochs=null"), r"both null"),
    (("trainer.precision=fp8",), r"trainer.precision='fp8': allowed: auto, fp32, bf16, fp16"),
    (("model.adapter_dtype=double",), r"model.adapter_dtype='double': allowed: float32, bfloat16, float16"),
    (("model.adapter_dtype=float16", "trainer.precision=fp16"),
     r"model.adapter_dtype=float16 under fp16 autocast: the gradient scaler cannot unscale fp16 gradients"),
    (("adapter=none", "model.dtype=float16", "trainer.precision=fp16"),
     r"model.dtype=float16 with full fine-tuning under fp16 autocast: .* use model.adapter_dtype=float32 "
     r"\(or model.dtype=float32\)"),
    (("adapter=loha", "model.adapter_dtype=bfloat16"),
     r"model.adapter_dtype=bfloat16: adapter=peft keeps peft's fp32 adapter weights .*; allowed: float32"),
    (("trainer.device=tpu",), r"trainer.device='tpu': allowed: auto, cpu, cuda"),
    (("trainer.max_grad_norm=0",), r"trainer.max_grad_norm=0: must be a number > 0 or null"),
    (("trainer.labelled_logits=maybe",), r"trainer.labelled_logits='maybe': must be true or false"),
    (("trainer.gradient_checkpointing=1",), r"trainer.gradient_checkpointing=1: must be true or false"),
    (("model.trust_remote_code=no",), r"model.trust_remote_code='no': must be true or false"),
    (("model.attn_implementation=flash",), r"model.attn_implementation='flash': allowed: auto, sdpa, eager, flash_att"),
    (("model.attn_implementation=flash_attention_2",), r"flash_attention_2 needs the flash-attn package"),
    (("trainer.loss_chunk=0",), r"trainer.loss_chunk=0: must be an integer >= 1 or null"),
    (("trainer.compile=yes",), r"trainer.compile='yes': must be true or false"),
    (("data.packing=1",), r"data.packing=1: must be true or false"),
    (("data=bbc_text", "data.packing=true"), r"data.packing=true packs chat, sft examples, not data.kind=text"),
    (("optimizer.lr=0",), r"optimizer.lr=0: must be a number > 0"),
    (("optimizer.schedule=step",), r"optimizer.schedule='step': allowed: cosine, linear, constant"),
    (("data.max_length=100000",), r"data.max_length=100000 exceeds the model's context of 512 tokens"),
    (("data.eval_size=0",), r"data.eval_size=0: a fraction in \(0, 1\) or a count >= 1"),
    (("data.kind=images",), r"data.kind='images': allowed: auto, chat, sft, text, classification"),
    (("data=bbc_news",), r"data.kind=classification needs a seq_cls model, but model.task=causal_lm"),
    (("model=minilm_l6", "data=bbc_news", "model.name_or_path=/no/such/model"),
     r"model.name_or_path='/no/such/model': folder '/no/such/model' does not exist"),
    (("export=onnx",), r"export='onnx': allowed: null, merged, peft"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_value_is_one_clear_line(cfg_factory, overrides, message) -> None:
    with pytest.raises(PetunerError, match=message) as err:
        run(cfg_factory(*overrides))
    assert "\n" not in str(err.value)


def test_unwritable_run_dir(cfg_factory, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PetunerError, match="cannot be created"):
        run(cfg_factory(run_dir=blocker / "run"))


@pytest.mark.parametrize("overrides, message", [
    (["adapter=lorra"],
     r"adapter='lorra' is not a choice of the 'adapter' config group; allowed: .*\blora, .*\bnone\b"),
    (["adapter=lora,dora"], r"adapter='dora' is not a choice"),
    (["model=gpt5", "trainer.max_steps=3"], r"model='gpt5' is not a choice of the 'model' config group; allowed: "
                                            r"minilm_l6, smollm2_135m, tiny_bert, tiny_llama"),
])
def test_unknown_group_choice(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_group_choices(overrides)


def test_known_choices_and_plain_keys_pass() -> None:
    check_group_choices(["adapter=lora,none", "model=tiny_llama", "adapter.r=4,8", "trainer.max_steps=3"])


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_stpes=5"], r"^trainer.max_stpes is not a config key; did you mean trainer.max_steps\? "),
    (["adapter=sora", "adapter.gate_lrr=1,2"],
     r"^adapter.gate_lrr is not a config key; did you mean adapter.gate_lr\?"),
    (["adapter=lorra"], r"adapter='lorra' is not a choice"),
])
def test_command_line_typos_are_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        check_command_line(overrides)
    assert "\n" not in str(err.value)


def test_command_line_accepts_sweeps_launchers_and_new_keys() -> None:
    check_command_line(["adapter=lora,sora", "adapter.r=4,8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        "+adapter.rank=3", "sweep=lora_search"])
