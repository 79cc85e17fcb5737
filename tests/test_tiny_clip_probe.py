"""The CLIP feature probe: the global reader sees only the class token, the token reader sees every token."""

from __future__ import annotations

import torch

from adapter.tiny import cli
from adapter.tiny.clip_probe import read_accuracy
from adapter.tiny.questions import Question

ANSWERS = ("red", "green", "blue", "yellow")


def _pictures(count: int, seed: int) -> tuple[torch.Tensor, list[Question]]:
    """Four slots, each with an answer; the class token holds slot 0's, patch token i slot i's. A "colour"
    question asks about slot 0 (in the class token), a "shape" question about slots 1 to 3 (patches only)."""
    generator = torch.Generator().manual_seed(seed)
    answers = torch.randint(len(ANSWERS), (count, 4), generator=generator)
    slots = torch.randint(4, (count,), generator=generator)
    features = 0.1 * torch.randn(count, 5, 8, generator=generator)
    features[:, 0, :4] += torch.nn.functional.one_hot(answers[:, 0], 4)
    features[:, 1:, 4:] += torch.nn.functional.one_hot(answers, 4)
    questions = [Question("colour" if slot == 0 else "shape", f"What is in slot {slot}?", ANSWERS[answers[i, slot]])
                 for i, slot in enumerate(slots.tolist())]
    return features, questions


def test_the_global_reader_reads_only_the_class_token_and_the_token_reader_reads_all():
    found = read_accuracy(_pictures(1500, 0), _pictures(300, 1), epochs=25, seed=0)
    assert found["global"]["colour"] > 0.9
    assert found["global"]["shape"] < 0.5  # a guess among four answers: what the class token cannot say
    assert found["tokens"]["colour"] > 0.9 and found["tokens"]["shape"] > 0.9
    assert set(found["tokens"]) == {"colour", "shape", "all"}


def test_the_clip_probe_command_names_a_missing_clip(tmp_path, capsys):
    assert cli.main(["clip-probe", "--clip", str(tmp_path / "nowhere"), "--pictures", "8", "--epochs", "1"]) == 2
    assert "nowhere" in capsys.readouterr().err
