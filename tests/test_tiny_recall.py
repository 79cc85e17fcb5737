"""The key -> value recall drill: its sequences, and how its per-slot accuracy tells lookup from elimination."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapter.tiny import cli, recall
from adapter.tiny.pretrain import train_step
from adapter.tiny.recall import ASK, NOT_SCORED, RecallDrill, drill_batch, guess_floor, slot_accuracy

DRILL = RecallDrill(pairs=4, keys=10, values=3)
SMALL_RUN = ["recall", "--scale", "micro", "--every", "2", "--dim", "16", "--layers", "1", "--heads", "2",
             "--batch", "4", "--pairs", "3", "--keys", "8", "--values", "3"]  # trains in seconds


def _pairs(row: torch.Tensor, drill: RecallDrill) -> dict[int, int]:
    return {int(row[1 + 3 * i]): int(row[2 + 3 * i]) for i in range(drill.pairs)}


def test_every_answer_is_the_value_paired_with_the_key_just_asked():
    inputs, targets = drill_batch(DRILL, 64, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (64, DRILL.length)
    assert int(inputs.max()) < DRILL.vocab_size
    for row, target in zip(inputs, targets):
        pairs = _pairs(row, DRILL)
        assert len(pairs) == DRILL.pairs, "keys are distinct within a sequence"
        scored = (target != NOT_SCORED).nonzero().flatten().tolist()
        assert len(scored) == DRILL.pairs
        assert sorted(int(row[c]) for c in scored) == sorted(pairs), "each key is asked once"
        for column in scored:
            assert int(row[column - 1]) == ASK
            assert int(target[column]) == pairs[int(row[column])]


class _Oracle(nn.Module):
    """Logits that name, at each question, the paired value (lookup) or one of the values not yet given
    back, drawn at random (elimination: sure only at the last question)."""

    def __init__(self, lookup: bool) -> None:
        super().__init__()
        self.lookup = lookup
        self.generator = torch.Generator().manual_seed(2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*inputs.shape, DRILL.vocab_size)
        start = 1 + 3 * DRILL.pairs
        for b, row in enumerate(inputs):
            pairs = _pairs(row, DRILL)
            left = list(pairs.values())
            for column in range(start + 1, inputs.shape[1], 3):
                if self.lookup:
                    guess = pairs[int(row[column])]
                else:
                    guess = left[int(torch.randint(len(left), (1,), generator=self.generator))]
                logits[b, column, guess] = 1.0
                if column + 1 < inputs.shape[1]:
                    left.remove(int(row[column + 1]))
        return logits


def test_a_lookup_reads_every_slot_and_elimination_only_the_last_as_the_floor_says():
    inputs, targets = drill_batch(DRILL, 3000, torch.Generator().manual_seed(1))
    assert slot_accuracy(_Oracle(lookup=True), inputs, targets) == [1.0] * DRILL.pairs
    eliminated = slot_accuracy(_Oracle(lookup=False), inputs, targets)
    floor = guess_floor(DRILL)
    assert floor[-1] == eliminated[-1] == 1.0
    assert floor[0] == pytest.approx((1 + 3 / 3) / 4)  # 4 left; each of the 3 others shares the value 1 in 3
    assert eliminated == pytest.approx(floor, abs=0.04)


def test_the_recall_command_trains_and_reports_each_slot_the_same_way_twice(capsys):
    argv = SMALL_RUN + ["--steps", "3"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert first[1].split()[-3:] == ["56%", "67%", "100%"]  # the floor: 3 values, 3 / 2 / 1 left
    assert [line.split()[:2] for line in first[2:]] == [["step", "2"], ["step", "3"]]
    assert all(len([w for w in line.split() if w.endswith("%")]) == 3 + 1 for line in first[2:])
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == first
    assert "float32, seed 0;" in first[0]
    assert cli.main(argv + ["--seed", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == first  # the recipe's seed is 0
    assert cli.main(argv + ["--seed", "1"]) == 0
    other = capsys.readouterr().out.splitlines()
    assert "seed 1;" in other[0] and other[1] == first[1] and other[2:] != first[2:]


def test_the_recall_command_trains_under_bf16_autocast_on_request(capsys, monkeypatch):
    precisions = []

    def recording_step(model, optimizer, inputs, targets, step, settings):
        precisions.append(settings.bf16)
        return train_step(model, optimizer, inputs, targets, step, settings)

    monkeypatch.setattr(recall, "train_step", recording_step)
    argv = SMALL_RUN + ["--steps", "2"]
    assert cli.main(argv) == 0 and precisions == [False, False]
    plain = capsys.readouterr().out.splitlines()
    assert cli.main(argv + ["--bf16"]) == 0 and precisions[2:] == [True, True]
    autocast = capsys.readouterr().out.splitlines()
    assert "float32, seed 0;" in plain[0] and "bf16 autocast, seed 0;" in autocast[0]
    assert autocast[1] == plain[1]  # the same floor


def test_a_drill_with_fewer_keys_than_pairs_is_refused(capsys):
    assert cli.main(["recall", "--scale", "micro", "--pairs", "5", "--keys", "4"]) == 2
    assert "pairs=5 keys=4" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--every", "0"), ("--steps", "0"), ("--heads", "0"), ("--lr", "-1")])
def test_a_value_out_of_range_is_refused_before_the_drill_is_set_up(capsys, flag, value):
    """0 heads read as "not given" (the recipe's 6); --steps 0, --lr -1 failed after the drill was set up and its
    floor printed (the lr in torch's words, naming no flag)."""
    with pytest.raises(SystemExit, match="^2$"):
        cli.main(["recall", "--scale", "micro", flag, value])
    printed = capsys.readouterr()
    assert printed.out == "" and f"argument {flag}: must be" in printed.err
