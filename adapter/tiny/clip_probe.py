"""How much of the image questions' answers the tiny CLIP's features hold, before any adapter is trained.

A small classifier is trained on frozen CLIP features of train pictures (the question as a learned embedding,
the answer as a class) and scored on the held-out image questions that `python -m adapter.tiny eval` asks.
Two readers, one per visual prompt:

    global  an MLP on the class token (CLIP's global feature): what the v1 prompt sees
    tokens  one question-led attention over all tokens (class + patches): what the v2 prompt can see

The image adapter reads through a frozen LLaMA, so its score stays at or below the reader of its prompt's
kind; a CLIP is worth training adapters on when these scores rise. Classifiers are seeded; with a fixed
thread count the figures repeat.

    python -m adapter.tiny clip-probe [--clip assets/tiny/clip] [--pictures 12000] [--epochs 30]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..visual import ImageEncoder, load_image_encoder
from .evaluate import held_out, shares
from .questions import Question, image_questions
from .world import render

READERS = ("global", "tokens")


class GlobalReader(nn.Module):
    """Class token and question embedding -> answer logits."""

    def __init__(self, width: int, questions: int, answers: int, hidden: int = 512) -> None:
        super().__init__()
        self.question = nn.Embedding(questions, width)
        self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, answers))

    def forward(self, tokens: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([tokens[:, 0], self.question(question)], dim=-1))


class TokenReader(nn.Module):
    """The question attends over all tokens (with learned positions); its result and the question -> logits."""

    def __init__(self, width: int, length: int, questions: int, answers: int, hidden: int = 512) -> None:
        super().__init__()
        self.question = nn.Embedding(questions, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        self.attention = nn.MultiheadAttention(width, max(1, width // 32), batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.GELU(), nn.Linear(hidden, answers))

    def forward(self, tokens: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        query = self.question(question)[:, None]
        keys = tokens + self.position
        read = self.attention(query, keys, keys, need_weights=False)[0]
        return self.mlp(torch.cat([read[:, 0], query[:, 0]], dim=-1))


@torch.no_grad()
def clip_tokens(encoder: ImageEncoder, questions: Sequence[Question], batch_size: int = 256) -> torch.Tensor:
    """[N, tokens, width] frozen CLIP features of each question's rendered scene."""
    chunks = [encoder(encoder.preprocess([render(q.scene) for q in questions[i: i + batch_size]]))
              for i in range(0, len(questions), batch_size)]
    return torch.cat(chunks).float()


def train_reader(reader: nn.Module, features: torch.Tensor, question: torch.Tensor, answer: torch.Tensor,
                 epochs: int, seed: int, batch_size: int = 128, lr: float = 2e-3) -> nn.Module:
    """Cross-entropy with AdamW over shuffled batches, seeded."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr)
    reader.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            loss = nn.functional.cross_entropy(reader(features[batch], question[batch]), answer[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return reader.eval()


def read_accuracy(train: tuple[torch.Tensor, Sequence[Question]], test: tuple[torch.Tensor, Sequence[Question]],
                  epochs: int, seed: int, readers: Sequence[str] = READERS) -> dict[str, dict[str, float]]:
    """Per reader: held-out accuracy (per category and "all") of a classifier trained on `train` features."""
    (train_features, train_questions), (test_features, test_questions) = train, test
    every = list(train_questions) + list(test_questions)
    question_ids = {q: i for i, q in enumerate(sorted({q.question for q in every}))}
    answer_ids = {a: i for i, a in enumerate(sorted({q.answer for q in every}))}

    def ids(questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor([question_ids[q.question] for q in questions]),
                torch.tensor([answer_ids[q.answer] for q in questions]))

    (train_q, train_a), (test_q, test_a) = ids(train_questions), ids(test_questions)
    _, length, width = train_features.shape
    result = {}
    for name in readers:
        torch.manual_seed(seed)
        reader = (GlobalReader(width, len(question_ids), len(answer_ids)) if name == "global"
                  else TokenReader(width, length, len(question_ids), len(answer_ids)))
        reader = train_reader(reader, train_features, train_q, train_a, epochs, seed)
        with torch.no_grad():
            right = (reader(test_features, test_q).argmax(dim=-1) == test_a).tolist()
        result[name] = shares(test_questions, right)
    return result


def clip_probe(clip: Path, seed: int, pictures: int, epochs: int, per_category: int,
               log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Both readers on the CLIP in `clip` (a folder with visual.safetensors and tiny-clip.json), trained on
    the first `pictures` of the image adapter's own train questions and scored on the eval's held-out ones."""
    from .clip import CONFIG_NAME, WEIGHTS_NAME

    encoder = load_image_encoder(clip / WEIGHTS_NAME, str(clip / CONFIG_NAME))
    train_questions = image_questions(seed, "train", pictures)
    test_questions = held_out("image", seed, per_category)
    log(f"clip probe: features of {len(train_questions)} train and {len(test_questions)} held-out pictures")
    train = clip_tokens(encoder, train_questions), train_questions
    test = clip_tokens(encoder, test_questions), test_questions
    return read_accuracy(train, test, epochs, seed)
