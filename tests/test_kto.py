"""KTO end to end: parity with TRL's KTOTrainer (loss, KL term, rewards, adapter gradients) on the tiny Llama
in fp32, unpaired rows and pairs through the data layer, a short run, and the one-class refusal."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

from petuner.adapters import adapter_layers, build_adapter, inject
from petuner.data import build_data
from petuner.data.sft import IGNORE
from petuner.data.unpaired import KTOCollator, with_kl_rows
from petuner.models import load_tokenizer
from petuner.objectives import build_objective
from petuner.objectives.reference import build_reference
from petuner.run import run
from petuner.train.logging import read_metrics
from tests.conftest import make_cfg
from tests.helpers import lora_cfg, tiny_llama

BETA = 0.3
QV = ["q_proj", "v_proj"]
QUESTIONS = [(f"What is {a} plus {b}?", str(a + b), str(a + b + 1)) for a in range(5) for b in range(4)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETUNER_DATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(OmegaConf.create({"tokenizer": "asset:smollm2-tokenizer", "trust_remote_code": False,
                                            "name_or_path": None}))


def kto_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four random-token completions, desirable and not, prompts and completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, desirable in enumerate((True, False, True, False)):
        prompt = torch.randint(3, 128, (3 + i,), generator=g).tolist()
        reply = torch.randint(3, 128, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": prompt + reply, "labels": [IGNORE] * len(prompt) + reply, "desirable": desirable})
    return KTOCollator(pad_token_id=2, max_length=64)(list(with_kl_rows(Dataset.from_list(rows))))


def trl_kto(tmp_path: Path, weights: dict[str, torch.Tensor]):
    """TRL's KTOTrainer on a fresh tiny Llama with a peft LoRA holding petuner's weights (reference: the adapter
    switched off, as petuner's)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    tokenizer = load_tokenizer(OmegaConf.create({"tokenizer": "asset:smollm2-tokenizer", "name_or_path": None,
                                                 "trust_remote_code": False}))
    rows = Dataset.from_list([{"prompt": "a", "completion": "b", "label": i % 2 == 0} for i in range(4)])
    args = KTOConfig(output_dir=str(tmp_path), beta=BETA, desirable_weight=1.3, undesirable_weight=0.7,
                     report_to="none", use_cpu=True, disable_dropout=True, per_device_train_batch_size=4)
    trainer = KTOTrainer(model=tiny_llama(), args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=QV))
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name.replace("base_model.model.", "").replace(".default", "")])
    return trainer


def trl_figures(trainer, batch: dict[str, torch.Tensor]) -> tuple:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE).long(), "KL_input_ids": batch["kl_input_ids"],
              "KL_attention_mask": batch["kl_attention_mask"],
              "KL_completion_mask": (batch["kl_labels"] != IGNORE).long(), "label": batch["desirable"]}
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
             for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.slow
def test_kto_matches_trl_ktotrainer(tmp_path) -> None:
    """Loss, KL estimate, rewards, log-probabilities and LoRA gradients against KTOTrainer._compute_loss on
    the same batch (seen to fail with the KL term left out, and with the class weights swapped)."""
    pytest.importorskip("trl")
    ours, method = tiny_llama(), build_adapter(lora_cfg())
    inject(ours, method)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(ours):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    objective = build_objective({"name": "kto", "beta": BETA, "desirable_weight": 1.3, "undesirable_weight": 0.7})
    objective.reference = build_reference(ours, method, continued=False, heads=[])
    batch = kto_batch()
    loss, sums = objective.loss(ours, batch)
    loss.backward()
    theirs, their_grads, their_metrics = trl_figures(trl_kto(tmp_path, weights), batch)
    torch.testing.assert_close(loss.detach(), theirs, atol=1e-5, rtol=0)
    assert their_metrics["kl"] > 0  # the KL term is live (not clamped to 0) on this batch
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert abs(sums[key].item() / 4 - their_metrics[key]) < 1e-5, key
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(grads) == set(their_grads) and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-5, rtol=0)


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def unpaired_rows(conversational: bool) -> list[dict]:
    rows = []
    for q, good, bad in QUESTIONS:
        for reply, label in ((good, True), (bad, False)):
            if conversational:
                rows.append({"prompt": [{"role": "user", "content": q}],
                             "completion": [{"role": "assistant", "content": reply}], "label": label})
            else:
                rows.append({"prompt": q, "completion": reply, "label": label})
    return rows


def data_cfg(path: Path, **kw):
    return OmegaConf.create({"name": "kto", "format": "hf", "kind": "auto", "path": str(path), "max_length": 64,
                             "eval_size": 4, "split_seed": 0, "limit": None, "system_prompt": None, **kw})


def completion_start(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != IGNORE)


def test_unpaired_rows_and_pairs_give_the_same_labelled_completions(tokenizer, tmp_path) -> None:
    """Plain and conversational rows tokenize identically, labelled on the completion only; a pair file
    prepared for KTO gives each pair's chosen side desirable and its rejected side not, and each KL row is its
    prompt with the previous row's completion (the first row's: the last row's)."""
    plain, chat = (build_data(data_cfg(write(tmp_path / f"{c}.jsonl", unpaired_rows(c))), tokenizer, "causal_lm")
                   for c in (False, True))
    assert plain.kind == "unpaired" and plain.train[:] == chat.train[:]
    example = plain.train[0]
    reply = tokenizer.decode([t for t in example["labels"] if t != IGNORE])
    assert reply.endswith("<|im_end|>") and reply[:-len("<|im_end|>")].isdigit(), reply
    pairs = [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in QUESTIONS]
    paired = build_data(data_cfg(write(tmp_path / "pairs.jsonl", pairs), eval_size=2), tokenizer, "causal_lm")
    before, n = paired.train, len(paired.train)
    build_objective({"name": "kto"}).prepare_data(paired, tokenizer, 64)
    rows = paired.train
    assert paired.kind == "unpaired" and len(rows) == 2 * n and len(paired.eval) == 4
    assert rows["desirable"] == [1] * n + [0] * n
    assert rows[0]["input_ids"] == before[0]["input_ids"] and rows[n]["input_ids"] == before[0]["rejected_input_ids"]
    for i in (0, 1, n):  # row i's prompt with row i-1's completion
        row, other = rows[i], rows[(i - 1) % len(rows)]
        start, other_start = completion_start(row["labels"]), completion_start(other["labels"])
        assert row["kl_input_ids"] == row["input_ids"][:start] + other["input_ids"][other_start:]
        assert row["kl_labels"] == [IGNORE] * start + other["labels"][other_start:]
    batch = paired.collate([rows[i] for i in (0, n)])
    assert batch["desirable"].tolist() == [True, False]
    assert batch["kl_input_ids"][1, :len(rows[n]["kl_input_ids"])].tolist() == rows[n]["kl_input_ids"]


def test_kto_trains_a_few_steps(tmp_path) -> None:
    """Step 0: the reference is the policy, so every reward and the KL estimate are 0 and the loss is exactly
    (1 − σ(0)) = 0.5 per row; the loss then goes down (every step is the whole training set: 32 rows)."""
    path = write(tmp_path / "kto.jsonl", unpaired_rows(False))
    info = run(make_cfg(tmp_path / "run", "loss=kto", "data=hf", f"data.path={path}", "data.eval_size=8",
                        "trainer.max_steps=3", "trainer.save_every=null", "trainer.batch_size=32", "optimizer.lr=2e-2",
                        "optimizer.warmup_steps=0"))
    steps = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert len(steps) == 3 and steps[0]["train/loss"] == pytest.approx(0.5, abs=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert steps[0][f"train/{key}"] == 0.0
    assert steps[-1]["train/loss"] < steps[0]["train/loss"] and math.isfinite(steps[-1]["train/kl"])
    from petuner.evaluate import evaluate_run  # petuner eval scores it as it trained: its reference, its rows

    _, report = evaluate_run(tmp_path / "run", ["data=hf", f"data.path={path}", "data.eval_size=8"])
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "kl"):
        assert report[f"eval/{key}"] == pytest.approx(info["results"][f"eval/{key}_after"], abs=1e-5), key


def test_precomputed_reference_trains_exactly_as_the_switch(tmp_path) -> None:
    """loss.precompute_reference=true: the rows' and their KL rows' reference values computed once give the
    same losses, KL estimates and held-out figures as the adapter switched off at every step (seen to fail with
    the two columns swapped)."""
    path = write(tmp_path / "kto.jsonl", unpaired_rows(False))
    runs = {name: run(make_cfg(tmp_path / name, "loss=kto", "data=hf", f"data.path={path}", "data.eval_size=8",
                               "trainer.max_steps=3", "trainer.save_every=null", "trainer.batch_size=8",
                               "optimizer.lr=2e-2", "optimizer.warmup_steps=0", *extra))
            for name, extra in (("switch", ()), ("pre", ("loss.precompute_reference=true",)))}
    steps = {name: [m for m in read_metrics(tmp_path / name) if "train/loss" in m] for name in runs}
    for key in ("train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected"):
        assert [m[key] for m in steps["pre"]] == pytest.approx([m[key] for m in steps["switch"]], abs=1e-6), key
    assert steps["switch"][-1]["train/kl"] > 0  # the KL term is live by the last step
    for key in ("eval/loss_after", "eval/kl_after", "eval/rewards/margins_after"):
        assert runs["pre"]["results"][key] == pytest.approx(runs["switch"]["results"][key], abs=1e-6), key


def bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    rows = unpaired_rows(False)
    one = write(tmp / "one.jsonl", [r for r in rows if r["label"]])
    numbers = write(tmp / "numbers.jsonl", [{**r, "label": int(r["label"])} for r in rows])
    good = ["data=hf", f"data.path={write(tmp / 'kto.jsonl', rows)}"]
    return {
        "one label class": (["loss=kto", "data=hf", f"data.path={one}"],
                            r"one.jsonl: all 20 rows are labelled true; loss=kto needs both desirable"),
        "label not a bool": (["loss=kto", "data=hf", f"data.path={numbers}"],
                             r"numbers.jsonl: label=1; KTO's label is true \(desirable\) or false"),
        "beta <= 0": (["loss=kto", *good, "loss.beta=0"], r"^loss.beta=0: must be a number > 0$"),
        "unpaired with loss=dpo": (["loss=dpo", *good], r"loss=dpo trains on preference data .* of kind unpaired"),
        "unpaired with loss=sft": (["loss=sft", *good], r"labelled completions .* train them with loss=kto"),
    }


@pytest.mark.parametrize("case", ["one label class", "label not a bool", "beta <= 0", "unpaired with loss=dpo",
                                  "unpaired with loss=sft"])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys) -> None:
    """Each refused in one line, exit 2, before anything is tokenized (seen to fail, for one label class,
    with the check removed: the run would train on a constant label)."""
    from petuner.cli import main as petuner_main

    overrides, message = bad_cases(tmp_path)[case]
    assert petuner_main(["data", "model=tiny_llama", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err[len("error: "):]), err
    assert not list((tmp_path / "cache").rglob("*.arrow"))  # nothing written


def test_desirable_and_undesirable_rows_may_come_from_two_sources(tmp_path, capsys) -> None:
    """A mixture's classes are checked together: good.jsonl (all true) with bad.jsonl (all false) trains KTO,
    two all-true sources are refused (seen to fail with each source checked alone)."""
    from petuner.cli import main as petuner_main

    rows = unpaired_rows(False)
    for name, label in (("good", True), ("bad", False), ("also_good", True)):
        write(tmp_path / f"{name}.jsonl", [r for r in rows if r["label"] == label])

    def data(first: str, second: str) -> int:
        sources = f"data.sources=[{{path:'{tmp_path / first}'}},{{path:'{tmp_path / second}'}}]"
        return petuner_main(["data", "model=tiny_llama", "loss=kto", "data=mixture", sources, "data.eval_size=2"])

    out = capsys.readouterr().out if data("good.jsonl", "bad.jsonl") == 0 else ""
    assert "(unpaired," in out and re.search(r"\n(un)?desirable:\n.*\[\[\d+<\|im_end\|>\]\]", out, re.S), out
    assert data("good.jsonl", "also_good.jsonl") == 2
    assert "data.sources (train): all 36 rows are labelled true" in capsys.readouterr().err
