"""Preference tuning end to end: pair data in every form, the reference at step 0, SFT → DPO, the chunked
log-probabilities, and every bad input as one line (TRL parity is in test_preference_parity.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from petuner.adapters import build_adapter, inject
from petuner.cli import main as petuner_main
from petuner.data import build_data
from petuner.data.sft import IGNORE
from petuner.models import load_tokenizer
from petuner.objectives.pairs import sequence_logps
from petuner.run import run
from petuner.train.labelled_logits import keep_labelled_logits
from petuner.train.logging import read_metrics
from tests.conftest import make_cfg
from tests.helpers import lora_cfg, pair_batch, tiny_llama

QUESTIONS = [(f"What is {a} plus {b}?", str(a + b), str(a + b + 1 + (a + b) % 3)) for a in range(6) for b in range(6)]
FORMS = {
    "conversational": lambda q, good, bad: {"prompt": [{"role": "user", "content": q}],
                                            "chosen": [{"role": "assistant", "content": good}],
                                            "rejected": [{"role": "assistant", "content": bad}]},
    "plain": lambda q, good, bad: {"prompt": q, "chosen": good, "rejected": bad},
    "implicit": lambda q, good, bad: {"chosen": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": good}],
                                      "rejected": [{"role": "user", "content": q},
                                                   {"role": "assistant", "content": bad}]},
}


def pairs_file(folder: Path, form: str = "conversational", rows: list | None = None, name: str = "") -> Path:
    path = folder / f"{name or form}.jsonl"
    rows = rows if rows is not None else [FORMS[form](*q) for q in QUESTIONS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PETUNER_DATA_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(OmegaConf.create({"tokenizer": "asset:smollm2-tokenizer", "trust_remote_code": False}))


def data_cfg(path: Path, **kw):
    return OmegaConf.create({"name": "pairs", "format": "hf", "kind": "auto", "path": str(path), "max_length": 64,
                             "eval_size": 4, "split_seed": 0, "limit": None, "system_prompt": None, **kw})


def test_every_row_form_gives_the_same_pairs_labelled_on_the_reply_only(tokenizer, tmp_path) -> None:
    built = {form: build_data(data_cfg(pairs_file(tmp_path, form)), tokenizer, "causal_lm") for form in FORMS}
    first = built["conversational"]
    assert first.kind == "preference" and len(first.train) == len(QUESTIONS) - 4
    for form, data in built.items():
        assert data.train[:] == first.train[:], form
    example = first.train[0]
    for ids, labels in ((example["input_ids"], example["labels"]),
                        (example["rejected_input_ids"], example["rejected_labels"])):
        reply = tokenizer.decode([t for t in labels if t != IGNORE])
        assert reply.endswith("<|im_end|>") and reply[:-len("<|im_end|>")].isdigit(), reply
        assert ids[:len(ids) - 3] == [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE][:len(ids) - 3]
    assert example["labels"] != example["rejected_labels"]


def test_petuner_data_shows_both_sides_marked(tmp_path, capsys) -> None:
    path = pairs_file(tmp_path)
    assert petuner_main(["data", "model=tiny_llama", "loss=dpo", "data=hf", f"data.path={path}"]) == 0
    out = capsys.readouterr().out
    assert "(preference," in out and "\nchosen:\n" in out and "\nrejected:\n" in out
    assert out.count("[[") >= 2 and "<|im_end|>]]" in out


def test_ties_are_dropped_with_a_count(tokenizer, tmp_path, caplog) -> None:
    rows = [FORMS["plain"](*q) for q in QUESTIONS]
    for row in rows[:5]:
        row["rejected"] = row["chosen"]
    data = build_data(data_cfg(pairs_file(tmp_path, "plain", rows), eval_size=0.5), tokenizer, "causal_lm")
    counts = [data.report["sources"]["pairs"][split]["ties"] for split in ("train", "eval")]
    assert sum(counts) == 5 and len(data.train) + len(data.eval) == len(QUESTIONS) - 5
    assert "identical chosen and rejected replies: dropped" in caplog.text


@pytest.mark.parametrize("trained_head", [False, True])
def test_chunked_log_probabilities_and_their_gradients_equal_the_whole(trained_head: bool) -> None:
    """The output layer over chunks of 3 labelled positions, recomputed in backward, against one call over all
    of them (seen to fail with the chunk's targets offset by one)."""
    figures = []
    for chunk in (None, 3):
        model = tiny_llama()
        inject(model, build_adapter(lora_cfg()))
        model.lm_head.weight.requires_grad_(trained_head)
        keep_labelled_logits(model, chunk=chunk)
        sums, _ = sequence_logps(model, pair_batch())
        (sums * torch.arange(1.0, 7.0)).sum().backward()  # a different weight per sequence, as DPO's
        figures.append((sums.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (whole, whole_grads), (chunked, chunked_grads) = figures
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert set(chunked_grads) == set(whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=0)


def dpo_cfg(run_dir: Path, path: Path, *overrides: str):
    return make_cfg(run_dir, "loss=dpo", "data=hf", f"data.path={path}", "data.eval_size=8", "trainer.max_steps=2",
                    "trainer.save_every=null", *overrides)


def test_dpo_step_zero_is_log_2_with_zero_rewards(tmp_path) -> None:
    """A fresh adapter changes nothing, so the reference (the adapter switched off) is the policy: the first
    step's loss is exactly log 2 and every reward 0, in training and in the evaluation before it."""
    info = run(dpo_cfg(tmp_path / "run", pairs_file(tmp_path), "objective=eval/rewards/accuracies",
                       "trainer.eval_every=1"))
    first = read_metrics(tmp_path / "run")[1]
    assert first["step"] == 1 and first["train/loss"] == pytest.approx(math.log(2), abs=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[f"train/{key}"] == 0.0 and info["results"][f"eval/{key}_before"] == 0.0
    assert info["results"]["eval/loss_before"] == pytest.approx(math.log(2), abs=1e-7)
    assert (tmp_path / "run" / "best" / "best.json").is_file()  # best/ follows eval/rewards/accuracies
    assert_eval_reproduces(tmp_path / "run", info)


def assert_eval_reproduces(run_dir: Path, info: dict) -> None:
    """``petuner eval`` on the run's own data gives its final held-out figures (same objective, same reference)."""
    from petuner.evaluate import evaluate_run

    config = OmegaConf.load(run_dir / "config.yaml")
    _, report = evaluate_run(run_dir, ["data=hf", f"data.path={config.data.path}", "data.eval_size=8"])
    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected")
            if f"eval/{k}_after" in info["results"]]
    assert len(keys) >= 4
    for key in keys:
        assert report[f"eval/{key}"] == pytest.approx(info["results"][f"eval/{key}_after"], abs=1e-5), key


@pytest.mark.parametrize("switch", ["trainer.gradient_checkpointing=true", "trainer.precision=bf16"])
def test_dpo_under_the_loops_switches(switch, tmp_path) -> None:
    """Gradient checkpointing recomputes the same floats: the same losses and rewards as without. Under bf16
    autocast the reference runs in the policy's precision, so step 0 is still exactly log 2 with zero rewards
    (the losses then differ from fp32 by bf16's rounding)."""
    path = pairs_file(tmp_path)
    run(dpo_cfg(tmp_path / "plain", path))
    run(dpo_cfg(tmp_path / "switched", path, switch))
    steps = {name: [m for m in read_metrics(tmp_path / name) if "train/loss" in m] for name in ("plain", "switched")}
    assert steps["switched"][0]["train/loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert steps["switched"][0]["train/rewards/margins"] == 0.0
    if "checkpointing" in switch:
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
            assert [m[key] for m in steps["switched"]] == pytest.approx([m[key] for m in steps["plain"]], abs=1e-6)


def test_sft_then_dpo_reference_is_the_sft_adapter(trained_run, tmp_path) -> None:
    """init_from an SFT run: the policy starts from its adapter and the reference is that adapter frozen, so
    step 0 has zero rewards; with the bare base as the reference (planted) they are not zero."""
    from safetensors.torch import load_file

    info = run(dpo_cfg(tmp_path / "run", pairs_file(tmp_path), f"init_from={trained_run}", "adapter.r=16",
                       "trainer.max_steps=1"))
    results = info["results"]
    assert results["eval/loss_before"] == pytest.approx(math.log(2), abs=1e-7)
    assert results["eval/rewards/chosen_before"] == 0.0 and results["eval/rewards/rejected_before"] == 0.0
    assert results["eval/rewards/chosen_after"] != 0.0  # it trained, against the SFT reference
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.adapter == OmegaConf.load(trained_run / "config.yaml").adapter  # r=4 of the SFT run, not r=16
    sft = load_file(trained_run / "adapter.safetensors")
    assert set(load_file(tmp_path / "run" / "adapter.safetensors")) == set(sft)
    assert_eval_reproduces(tmp_path / "run", info)


def _bad(tmp: Path, trained_run: Path) -> dict[str, tuple[list[str], str]]:
    good = pairs_file(tmp)
    no_rejected = tmp / "no_rejected.jsonl"
    no_rejected.write_text("".join(json.dumps({"prompt": q, "chosen": c}) + "\n" for q, c, _ in QUESTIONS))
    rows = [FORMS["plain"](*q) for q in QUESTIONS]
    rows[2]["rejected"] = None
    null_rejected = pairs_file(tmp, rows=rows, name="nulls")
    long = pairs_file(tmp, rows=[{"prompt": "word " * 300, "chosen": "a", "rejected": "b"}] * 12, name="long")
    margins = pairs_file(tmp, rows=[{**FORMS["plain"](*q), "margin": "big" if i == 4 else 1.0}
                                    for i, q in enumerate(QUESTIONS)], name="margins")
    pairs = ["data=hf", f"data.path={good}"]
    return {
        "missing rejected": (["data=hf", f"data.path={no_rejected}", "data.kind=preference"],
                             r"data.kind=preference needs column 'rejected'"),
        "null rejected": (["data=hf", f"data.path={null_rejected}"],
                          r"nulls.jsonl row 3: no value in column 'rejected'"),
        "prompt too long": (["data=hf", f"data.path={long}"],
                            r"long.jsonl row \d+: the prompt takes \d+ tokens, so data.max_length=256 leaves no "),
        "too long, truncation=error": (["data=hf", f"data.path={long}", "data.truncation=error"],
                                       r"long.jsonl row \d+: \d+ tokens exceed data.max_length=256 \(data.trunc"),
        "beta <= 0": ([*pairs, "loss.beta=0"], r"^loss.beta=0: must be a number > 0$"),
        "a classifier": ([*pairs, "model=tiny_bert"], r"loss=dpo trains a causal language model .* model.task=seq_cls"),
        "init_from no run": ([*pairs, f"init_from={tmp}"], r"init_from=.*: .* is not a petuner run folder"),
        "init_from another base": ([*pairs, f"init_from={trained_run}", "model.init_seed=1"],
                                   r"init_from=.* trained another base model: its model.init_seed=0, this run's is 1"),
        "no switch (lq_lora)": ([*pairs, "adapter=lq_lora"], r"adapter=lq_lora starts from non-zero factors"),
        "no switch (bias)": ([*pairs, "adapter.bias=all"], r"adapter.bias=all trains the base model's biases"),
        "packing": ([*pairs, "data.packing=true"], r"data.packing=true packs single sequences; loss=dpo trains on"),
        "pairs with loss=sft": (["data=hf", f"data.path={good}", "loss=sft"], r"train them with loss=dpo, simpo"),
        "smoothing with hinge": ([*pairs, "loss.loss_type=hinge", "loss.label_smoothing=0.1"],
                                 r"loss.label_smoothing=0.1 applies to loss.loss_type=sigmoid or robust, not hinge"),
        "reward on a causal LM": (["data=hf", f"data.path={good}", "loss=reward"],
                                  r"loss=reward trains a sequence classifier with one output .* model.task=causal_lm"),
        "margin not a number": (["data=hf", f"data.path={margins}", "model=tiny_bert", "loss=reward"],
                                r"margins.jsonl row 5: margin='\"big\"'; a pair's margin is a finite number$"),
        "metric not measured": ([*pairs, "objective=eval/perplexity"],
                                r"objective=eval/perplexity is not measured for model.task=causal_lm; "
                                r"allowed: eval/loss, eval/rewards/accuracies, eval/rewards/margins$"),
    }


BAD = ["missing rejected", "null rejected", "prompt too long", "too long, truncation=error", "beta <= 0",
       "a classifier", "init_from no run", "init_from another base", "no switch (lq_lora)", "no switch (bias)",
       "packing", "pairs with loss=sft", "smoothing with hinge", "reward on a causal LM", "margin not a number",
       "metric not measured"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(case, trained_run, tmp_path, capsys, private_cache) -> None:
    cases = _bad(tmp_path, trained_run)
    assert list(cases) == BAD
    overrides, message = cases[case]
    loss = [] if any(o.startswith("loss=") for o in overrides) else ["loss=dpo"]
    assert petuner_main(["data", "model=tiny_llama", *loss, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err[len("error: "):]), err
    assert not list(private_cache.rglob("*.arrow"))  # nothing written


def test_a_margin_column_reaches_the_reward_model_and_is_named_where_unused(tokenizer, tmp_path, caplog) -> None:
    """A per-pair margin column (TRL's RewardTrainer's; here mapped from another name by data.columns) is in
    each batch of pairs; a loss that does not use it says so (seen silent before)."""
    from petuner.objectives import build_objective

    rows = [{**FORMS["plain"](*q), "gap": float(i)} for i, q in enumerate(QUESTIONS)]
    data = build_data(data_cfg(pairs_file(tmp_path, rows=rows, name="gaps"), columns={"margin": "gap"}),
                      tokenizer, "seq_cls")
    batch = data.collate([data.train[i] for i in range(3)])
    chosen = [tokenizer.decode([t for t in data.train[i]["labels"] if t != IGNORE]) for i in range(3)]
    expected = [next(float(j) for j, q in enumerate(QUESTIONS) if reply.startswith(q[1] + "<")
                     and QUESTIONS[j][0] in tokenizer.decode(data.train[i]["input_ids"]))
                for i, reply in enumerate(chosen)]
    assert batch["margin"].tolist() == expected
    build_objective({"name": "reward"}).prepare_data(data, tokenizer, 64)
    assert "margin" not in caplog.text
    build_objective({"name": "dpo"}).prepare_data(data, tokenizer, 64)
    assert "the data's margin column is a reward model's (loss=reward); loss=dpo does not use it" in caplog.text


def test_precomputed_reference_trains_exactly_as_the_switch(tmp_path) -> None:
    """precompute_reference=true: the same losses and rewards as the reference run at every step (seen to fail
    with the precomputed pair's chosen and rejected swapped)."""
    path = pairs_file(tmp_path)
    runs = [run(dpo_cfg(tmp_path / name, path, *extra)) for name, extra in
            (("switch", ()), ("pre", ("loss.precompute_reference=true",)))]
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / name) if "train/loss" in m]
              for name in ("switch", "pre")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and len(losses[0]) == 2
    for key in ("eval/loss_after", "eval/rewards/margins_after", "eval/rewards/chosen_after"):
        assert runs[0]["results"][key] == pytest.approx(runs[1]["results"][key], abs=1e-6)


def test_reward_model_trains_exports_as_a_classifier_and_scores_pairs(tmp_path) -> None:
    """loss=reward on a seq_cls model: one output, its head trained with the adapter; the merged export is a
    transformers sequence classifier giving the run's scores; petuner eval reproduces its held-out figures."""
    from transformers import AutoModelForSequenceClassification

    import petuner

    run_dir = tmp_path / "run"
    info = run(make_cfg(run_dir, "model=tiny_bert", "loss=reward", "data=hf", f"data.path={pairs_file(tmp_path)}",
                        "data.eval_size=8", "trainer.max_steps=2", "trainer.save_every=null", "export=merged",
                        "objective=eval/rewards/accuracies"))
    assert info["label_names"] == ["reward"] and info["head_modules"]
    assert_eval_reproduces(run_dir, info)
    exported = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "export-merged")).eval()
    model, tokenizer = petuner.load(run_dir)
    batch = tokenizer(["What is 2 plus 3? 5", "What is 2 plus 3? 6"], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = exported(**batch).logits
        assert scores.shape == (2, 1)
        torch.testing.assert_close(scores, model(**batch).logits, atol=1e-5, rtol=0)


def test_columns_mixtures_and_the_cache_serve_pairs(tokenizer, tmp_path, private_cache, monkeypatch) -> None:
    """Pairs under other column names (data.columns), mixed with another pair source, tokenized once: the
    second build reads the cache and gives the same examples."""
    renamed = pairs_file(tmp_path, rows=[{"question": q, "good": c, "bad": r} for q, c, r in QUESTIONS], name="qa")
    cfg = data_cfg(tmp_path, sources=[
        {"name": "qa", "path": str(renamed), "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        {"name": "conv", "path": str(pairs_file(tmp_path)), "weight": 0.5}], mix="concat", stopping_strategy=
        "first_exhausted", train_on="assistant", truncation="drop_turns")
    first = build_data(cfg, tokenizer, "causal_lm")
    cached = sorted(p.name for p in private_cache.glob("preference-*.arrow"))
    assert len(cached) == 4 and first.kind == "preference"  # two sources × two splits
    assert len(first.train) == (len(QUESTIONS) - 4) + (len(QUESTIONS) - 4) // 2 and set(first.evals) == {"qa", "conv"}
    from petuner.data import preference

    calls: list[int] = []
    real = preference.completion
    monkeypatch.setattr(preference, "completion", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = build_data(cfg, tokenizer, "causal_lm")
    assert not calls and sorted(p.name for p in private_cache.glob("preference-*.arrow")) == cached
    assert again.train[:] == first.train[:]


def test_accumulated_micro_batches_train_as_one_batch(tmp_path) -> None:
    """A step's DPO loss is the mean over all of its pairs: 2 micro-batches of 2 pairs train as 1 batch of 4
    (seen to fail with the micro-batches weighed by their labelled tokens, the SFT count, instead of pairs)."""
    from safetensors.torch import load_file

    path = pairs_file(tmp_path)
    for name, extra in (("one", ("trainer.batch_size=4",)),
                        ("accum", ("trainer.batch_size=2", "trainer.grad_accum=2"))):
        run(dpo_cfg(tmp_path / name, path, "adapter.dropout=0", "trainer.max_steps=3", *extra))
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / n) if "train/loss" in m] for n in ("one", "accum")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and len(losses[0]) == 3
    one, accum = (load_file(tmp_path / n / "adapter.safetensors") for n in ("one", "accum"))
    for key, value in one.items():  # Adam divides by sqrt(v): a near-zero gradient's fp32 summation-order noise
        # becomes a visible update (measured up to 3.3e-6 on 2 of 512 weights; the losses above agree to 1e-6)
        torch.testing.assert_close(accum[key], value, atol=2e-5, rtol=0)
