"""``trainer.epochs`` means each training example once per epoch, also when ``grad_accum`` does not divide
an epoch's batches: the epoch's last optimizer step is shorter, no step spans two epochs (Trainer's rule)."""

from __future__ import annotations

from collections import Counter

import torch

from petuner.run import run
from petuner.train.loop import Loop

# 45 examples in batches of 4: 12 batches, so grad_accum=5 gives steps of 5, 5 and 2 batches.
EPOCHS = ("data.limit=45", "trainer.max_steps=null", "trainer.batch_size=4", "trainer.grad_accum=5")


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """A batch's examples, padding removed."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                                    strict=True)]


def test_each_epoch_sees_each_example_once_under_uneven_accumulation(cfg_factory, monkeypatch) -> None:
    # Seen failing before the fix: 3 steps of 5 batches = 60 rows for 45 examples, 15 from the second epoch.
    seen: list[list[tuple[int, ...]]] = []
    examples: list[tuple[int, ...]] = []
    original = Loop.accumulate

    def recording(self, micro):
        if not examples:
            examples.extend(tuple(x) for x in self.data.train["input_ids"])
        seen.append([row for batch in micro for row in rows(batch)])
        return original(self, micro)

    monkeypatch.setattr(Loop, "accumulate", recording)
    info = run(cfg_factory(*EPOCHS, "trainer.epochs=2"))
    assert info["steps"] == 6 and [len(step) for step in seen] == [20, 20, 5, 20, 20, 5]
    first, second = (Counter(row for step in seen[i:i + 3] for row in step) for i in (0, 3))
    assert len(examples) == 45 and first == second == Counter(examples)
    assert seen[0] != seen[3]  # the second epoch is reshuffled


def test_resume_before_a_short_last_step_is_exact(resume_check) -> None:
    # 13 examples in batches of 4 (4, 4, 4, 1), grad_accum=3: epochs of a 3-batch and a 1-batch step. Resuming
    # at step 1 runs epoch 0's short step, then all of epoch 1.
    resume_check("data.limit=13", "trainer.max_steps=null", "trainer.epochs=2", "trainer.batch_size=4",
                 "trainer.grad_accum=3", "trainer.save_every=1", first_checkpoint="step-00000001")
