"""`python -m adapter.evaluate`: how well adapters answer held-out data, at each gate scale.

The data is a file in the fine-tuning layouts (Alpaca instructions, LLaVA conversations), written in each
adapter's prompt format. Per gate scale it reports the mean cross-entropy of the reference answers' tokens
(each answer's end included) and its perplexity, exactly as `adapter.finetune` computes its validation loss,
and the share of those tokens the model ranks first; with `--exact`, also how many greedy answers equal the
reference (surrounding whitespace aside). Gate scale 0 silences the adaption prompts (with delta scale 0
too, a v2 adapter is the frozen base), so one table shows what the adapter adds. With `--choices` the data are
multiple-choice questions instead, scored by which choice the model finds likeliest (adapter.choices); with
`--text`, plain text, every token of it scored (`evaluate_text`): what the adapter does to the base's own language
modelling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .arg_types import refused, unicode_output
from .choices import ChoiceEvaluation, evaluate_choices, scorable_questions
from .choices import table as choices_table
from .finetune.batching import collate, eval_batches
from .finetune.encode import Encoded, encode_example, text_windows
from .finetune.records import DATA_HELP, Example, read_documents, read_records
from .finetune.step import scored_positions
from .formats import BASE_HELP
from .formats.common import atomic_write, check_file_target, write_text_atomically
from .gate_layers import (
    FLAG_HELP,
    LAYER_SWEEP_ROWS,
    Speaker,
    describe,
    gate_scale_rows,
    layer_sweep,
    layers_from_flag,
    normalized,
)
from .generate import generate_batch, require_tokenizer, scales_from_text
from .hub import resolve_data
from .kv_cache import KV_CACHE_DTYPES
from .paths import not_a_file
from .progress import terminal_progress
from .prompts import PROMPT_FORMATS, PromptFormat, format_named

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .model import Transformer

EXACT_SLACK = 4  # new tokens allowed beyond the reference's own: a longer answer cannot equal it


@dataclass(frozen=True)
class Score:
    """One gate scale's figures."""

    gate_scale: float
    loss: float  # mean cross-entropy per answer token
    token_accuracy: float  # share of answer tokens ranked first
    exact: int | None = None  # greedy answers equal to the reference (None: not measured)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass(frozen=True)
class Evaluation:
    """One adapter on one data file."""

    adapter: str | None
    prompt_format: str
    examples: int
    tokens: int  # answer tokens scored
    truncated: int  # examples cut at max_seq_len (their cut-off tokens are not scored)
    delta_scale: float
    scores: list[Score]
    # with exact answers: each example's prompt, reference and greedy answer at each gate scale (in order)
    answers: list[dict]
    gate_layers: list[Speaker] | None = None  # the adapter layers (or heads) whose prompts spoke (None: all)
    text_bytes: int | None = None  # plain text (evaluate_text): the UTF-8 bytes of its documents

    def bits_per_byte(self, score: Score) -> float | None:
        """Plain text: the loss summed over its tokens, in bits, per byte of text (comparable across tokenizers)."""
        if self.text_bytes is None:
            return None
        return score.loss * self.tokens / math.log(2) / max(self.text_bytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "scores": [{**asdict(s), "perplexity": s.perplexity,
                                            **({} if self.text_bytes is None
                                               else {"bits_per_byte": self.bits_per_byte(s)})}
                                           for s in self.scores]}


def evaluate(
    model: "Transformer",
    data: str | Path,
    *,
    image_folder: str | Path | None = None,
    gate_scales: Sequence[float] = (0.0, 1.0),
    delta_scale: float = 1.0,
    micro_batch_size: int = 4,
    max_seq_len: int | None = None,
    limit: int | None = None,
    exact: bool = False,
    prompt_format: str | None = None,
    layers: Sequence[Speaker] | None = None,
    max_cached_tokens: int | None = None,
) -> Evaluation:
    """Score `model` on the records of `data` at each of `gate_scales` (see the module docstring).

    `prompt_format` overrides the adapter's own; `limit` keeps the first records; `max_seq_len` (default the
    model's) cuts longer examples, as training does; with `layers`, only those adapter layers' prompts speak
    (adapter.gate_layers); `max_cached_tokens` bounds the KV cache the exact answers' decodes hold at once (the
    app's, what its Space fit check counts; rows beyond it decode in turns).
    """
    scales = checked_request(gate_scales, micro_batch_size, max_seq_len, limit, model)
    if max_cached_tokens is not None:
        _check_count("max_cached_tokens", max_cached_tokens, 1)
    written, examples = scorable_examples(model, data, image_folder, prompt_format, limit)
    tokenizer = model.tokenizer
    end = written.answer_end_id(tokenizer)
    length = max_seq_len or model.args.max_seq_len
    encoded, cut = [], 0
    for example in examples:
        item, truncated = encode_example(example, tokenizer, length, end)
        encoded.append(item)
        cut += truncated
    if not any(item.targets for item in encoded):
        raise ValueError(f"--data: none of the {len(encoded)} examples of {data} keeps an answer token within "
                         f"{length} tokens (each is cut before its answer): there is nothing to score; "
                         "raise --max-seq-len or shorten the prompts")
    layers = None if layers is None else normalized(model, layers)
    losses, hits, tokens = _token_scores(model, encoded, scales, delta_scale, micro_batch_size, layers)
    said = _greedy_answers(model, examples, scales, delta_scale, micro_batch_size, written.stop_strings, layers,
                           max_cached_tokens) if exact else []
    matches = [sum(row["answers"][index].strip() == row["reference"].strip() for row in said) if exact else None
               for index in range(len(scales))]
    scores = [Score(scale, loss / max(tokens, 1), hit / max(tokens, 1), match)
              for scale, loss, hit, match in zip(scales, losses, hits, matches)]
    return Evaluation(model.adapter_path, written.name, len(examples), tokens, cut, delta_scale, scores, said,
                      layers)


def scorable_examples(model: "Transformer", data: str | Path, image_folder: str | Path | None,
                      prompt_format: str | None, limit: int | None) -> tuple[PromptFormat, list[Example]]:
    """The prompt format and the examples of `data` that `evaluate` scores `model` on, once checked that the
    format can write them for the model's tokenizer, they have answers, and their pictures can be seen (ValueError
    or DataError naming the file): the command line checks every adapter so before scoring any."""
    written = format_named(prompt_format or model.prompt_format)
    written.check(model.tokenizer)
    records = read_records(data, image_folder, written)[:limit]
    examples = [example for record in records for example in record]
    if any(e.plain for e in examples):
        raise ValueError(f"--data: {data} holds plain text ('text' records), which has no answers to score: "
                         "score a file of it alone as plain text (python -m adapter.evaluate --text)")
    if any(e.image is not None for e in examples) and (model.visual_prompt is None or model.image_encoder is None):
        raise ValueError(f"--data: {data} has image records; they need an adapter that sees images (a visual prompt "
                         "and the CLIP tower it reads)")
    return written, examples


def evaluate_text(
    model: "Transformer",
    data: str | Path,
    *,
    gate_scales: Sequence[float] = (0.0, 1.0),
    delta_scale: float = 1.0,
    micro_batch_size: int = 4,
    max_seq_len: int | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    layers: Sequence[Speaker] | None = None,
    stride: int | None = None,
) -> Evaluation:
    """The perplexity of plain text at each of `gate_scales`: what the adapter does to the base's own language
    modelling (at gate 0, a v1 adapter's is the base's). `data` is a `.txt` file (one document) or records with a
    "text" field (`limit`: the first ones); each document is read after BOS, in windows of `max_seq_len` (default
    the model's) that overlap by one token, so every token but BOS is scored once (finetune.encode.text_windows),
    up to `max_tokens` tokens in all (the text's first; bits per byte then count the bytes of the documents read).
    `stride`: windows start that many tokens apart instead (1 to `max_seq_len` - 1), each token still scored once,
    but after at least `max_seq_len` - `stride` tokens of context (transformers' sliding-window perplexity).
    """
    scales = checked_request(gate_scales, micro_batch_size, max_seq_len, limit, model)
    if max_tokens is not None:
        _check_count("max_tokens", max_tokens, 1)
    length = max_seq_len or model.args.max_seq_len
    if stride is not None:
        _check_count("stride", stride, 1)
    if stride is not None and not 1 <= stride < length:
        raise ValueError(f"stride: must be between 1 and the window's {length} - 1, got {stride}")
    documents = read_documents(data)[:limit]
    encoded, read, left = [], [], max_tokens
    for document in documents:
        tokens = model.tokenizer.encode(document, bos=True, eos=False)
        if left is not None and len(tokens) - 1 > left:  # the last document read, cut
            tokens = tokens[:left + 1]
            document = model.tokenizer.decode(tokens[1:])
        encoded += text_windows(tokens, length, stride)
        read.append(document)
        if left is not None:
            left -= len(tokens) - 1
            if left <= 0:
                break
    layers = None if layers is None else normalized(model, layers)
    losses, hits, tokens = _token_scores(model, encoded, scales, delta_scale, micro_batch_size, layers)
    if not tokens:
        raise ValueError(f"--data: {data} holds no text to score (its documents are empty once tokenized)")
    scores = [Score(scale, loss / tokens, hit / tokens) for scale, loss, hit in zip(scales, losses, hits)]
    return Evaluation(model.adapter_path, "plain text", len(read), tokens, 0, delta_scale, scores, [], layers,
                      sum(len(document.encode()) for document in read))


def checked_request(gate_scales: Sequence[float], micro_batch_size: int, max_seq_len: int | None,
                    limit: int | None, model: "Transformer") -> list[float]:
    """The gate scales as floats, once the request's scales, batch size, length and limit are checked (ValueError
    naming the one at fault) and the model has a tokenizer; shared with adapter.choices."""
    if isinstance(gate_scales, str):  # "0, 0.5 1", as the command line and the app read them
        gate_scales = scales_from_text(gate_scales, "gate_scales")
    try:  # (a text was read one character at a time: "10" scored at 1 and 0)
        scales = [float(s) for s in gate_scales if not isinstance(s, bool)]
    except (TypeError, ValueError):
        raise ValueError(f"gate_scales: give a list of numbers (or a text such as \"0, 0.5, 1\"), got "
                         f"{gate_scales!r}"[:200]) from None
    if not scales or len(scales) != len(gate_scales) or any(not math.isfinite(s) or s < 0 for s in scales):
        raise ValueError(f"gate_scales: give one or more finite scales >= 0, got {list(gate_scales)}")
    _check_count("micro_batch_size", micro_batch_size, 1)
    if max_seq_len is not None:
        _check_count("max_seq_len", max_seq_len, 2, model.args.max_seq_len)
    if limit is not None:
        _check_count("limit", limit, 1)
    require_tokenizer(model)
    return scales


def _check_count(name: str, value: Any, low: int, model_high: int | None = None) -> None:
    """A whole number from `low` (to the model's `model_high`); ValueError naming `name` (None or 2.5 failed deep
    inside range() or a slice)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected a whole number, got {value!r}"[:200])
    if model_high is not None and not low <= value <= model_high:
        raise ValueError(f"{name}: must be between {low} and the model's {model_high}, got {value}")
    if value < low:
        raise ValueError(f"{name}: must be at least {low}, got {value}")


def _token_scores(model: "Transformer", encoded: list[Encoded], scales: list[float], delta_scale: float,
                  micro_batch_size: int, layers: list[Speaker] | None) -> tuple[list[float], list[int], int]:
    """(summed loss, tokens ranked first) per scale, and the tokens scored: each micro-batch runs once, its
    rows repeated once per gate scale (scale-major, each copy with its own scale), its images encoded once."""
    from .visual import encode_images

    device = model.tok_embeddings.weight.device
    losses = [0.0] * len(scales)
    hits = [0] * len(scales)
    scored_tokens = 0
    batches = eval_batches([len(e.tokens) for e in encoded], micro_batch_size, 0, 1)
    for indices in terminal_progress(batches, "scoring", "batch"):
        batch = collate([encoded[i] for i in indices], device)
        positions, targets = scored_positions(batch.labels)
        scored_tokens += targets.numel()
        if not targets.numel():
            continue
        with torch.no_grad():
            visual = encode_images(model, batch.images) if batch.images is not None else None
        copies = len(scales)
        rows = gate_scale_rows(model, [scale for scale in scales for _ in range(batch.tokens.shape[0])], layers)
        loss, hit = model.score(batch.tokens.repeat(copies, 1), positions.repeat(copies, 1), targets.repeat(copies),
                                gate_scale=rows, delta_scale=delta_scale,
                                visual_prompt=None if visual is None else visual.repeat(copies, 1, 1))
        for index, (summed, ranked) in enumerate(zip(loss.double().view(copies, -1).sum(1).tolist(),
                                                     hit.view(copies, -1).sum(1).tolist())):
            losses[index] += summed
            hits[index] += int(ranked)
    return losses, hits, scored_tokens


def _greedy_answers(model: "Transformer", examples: list[Example], scales: list[float], delta_scale: float,
                    micro_batch_size: int, stop: Sequence[str], layers: list[Speaker] | None,
                    max_cached_tokens: int | None = None) -> list[dict]:
    """Each example's greedy answer at every scale (`micro_batch_size` examples x every scale a batch), decoded
    up to a few tokens past its own reference's length (whatever else shares its batch). An example whose prompt
    leaves no room for an answer in the model's context gets empty answers."""
    tokenizer = model.tokenizer
    rows_of = [{"prompt": e.prompt, "reference": e.response, "answers": [""] * len(scales)} for e in examples]
    fits = [i for i, e in enumerate(examples) if len(tokenizer.encode(e.prompt)) < model.args.max_seq_len]
    for start in terminal_progress(range(0, len(fits), micro_batch_size), "answering", "batch"):
        chunk = fits[start:start + micro_batch_size]
        rows = [(i, index) for i in chunk for index in range(len(scales))]
        room = {i: len(tokenizer.encode(examples[i].response, bos=False)) + EXACT_SLACK for i in chunk}
        images = [examples[i].image for i, _ in rows] if any(examples[i].image is not None for i in chunk) else None
        gate_scale = gate_scale_rows(model, [scales[s] for _, s in rows], layers)
        answers = generate_batch(model, [examples[i].prompt for i, _ in rows], gate_scale=gate_scale,
                                 delta_scale=delta_scale, images=images, temperature=0.0,
                                 rows=[{"max_new_tokens": room[i]} for i, _ in rows], stop=list(stop),
                                 max_cached_tokens=max_cached_tokens)
        for (i, index), answer in zip(rows, answers):
            rows_of[i]["answers"][index] = answer
    return rows_of


def table(evaluation: Evaluation) -> str:
    """The figures as text, one line per gate scale."""
    e, text = evaluation, evaluation.text_bytes is not None
    read = f"plain text: {e.examples} document(s), {e.tokens:,} tokens" if text else \
        f"prompt format {e.prompt_format}: {e.examples} examples, {e.tokens:,} answer tokens"
    lines = [f"adapter {e.adapter or 'none (the base)'}, {read}"
             + (f" ({e.truncated} examples cut at max_seq_len)" if e.truncated else "")
             + f", delta scale {e.delta_scale:g}"
             + ("" if e.gate_layers is None else f", prompts only in layers {describe(e.gate_layers)}"
                if e.gate_layers else ", every prompt silent"),
             f"{'gate scale':>10}  {'loss':>8}  {'perplexity':>10}  {'token accuracy':>14}"
             + ("  bits per byte" if text else "") + ("  exact answers" if e.scores[0].exact is not None else "")]
    for s in e.scores:
        line = f"{s.gate_scale:>10g}  {s.loss:>8.4f}  {s.perplexity:>10.3f}  {s.token_accuracy:>13.1%}"
        if text:
            line += f"  {e.bits_per_byte(s):>13.4f}"
        if s.exact is not None:
            line += f"  {s.exact:>5} / {e.examples} ({s.exact / max(e.examples, 1):.0%})"
        lines.append(line)
    return "\n".join(lines)


def write_json(evaluations: Sequence[Evaluation | ChoiceEvaluation], path: str | Path) -> None:
    text = json.dumps([e.to_dict() for e in evaluations], indent=2) + "\n"
    write_text_atomically(Path(path), text)


def plot(evaluations: Sequence[Evaluation | ChoiceEvaluation], path: str | Path) -> None:
    """`figure` written to a PNG file (atomically)."""
    drawn = figure(evaluations)
    atomic_write(Path(path), lambda tmp: drawn.savefig(tmp, format="png"))


def figure(evaluations: Sequence[Evaluation | ChoiceEvaluation]) -> "Figure":
    """Loss and accuracy against the gate scale, one line per adapter (on the Agg canvas directly, as
    adapter.gate_view draws: nothing kept in pyplot's registry, so a server can draw one per request); for
    multiple-choice questions, their accuracy and the right choice's probability."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(drawn)
    if any(isinstance(e, ChoiceEvaluation) for e in evaluations):
        return _choices_figure(drawn, evaluations)
    loss_axis, accuracy_axis = drawn.subplots(1, 2)
    for e in evaluations:
        name = _name(e)
        scales = [s.gate_scale for s in e.scores]
        loss_axis.plot(scales, [s.loss for s in e.scores], marker="o", label=name)
        accuracy_axis.plot(scales, [100 * s.token_accuracy for s in e.scores], marker="o", label=f"{name}: tokens")
        if e.scores[0].exact is not None:
            accuracy_axis.plot(scales, [100 * s.exact / max(e.examples, 1) for s in e.scores], marker="s",
                               linestyle="--", label=f"{name}: exact answers")
    per = "token" if all(e.text_bytes is not None for e in evaluations) else "answer token"
    loss_axis.set(xlabel="gate scale", ylabel=f"loss per {per}", title="Loss")
    return _finished(drawn, (loss_axis, accuracy_axis), accuracy_axis)


def _choices_figure(drawn: "Figure", evaluations: Sequence[ChoiceEvaluation]) -> "Figure":
    accuracy_axis, probability_axis = drawn.subplots(1, 2)
    for e in evaluations:
        scales = [s.gate_scale for s in e.scores]
        accuracy_axis.plot(scales, [100 * s.accuracy for s in e.scores], marker="o", label=_name(e))
        accuracy_axis.plot(scales, [100 * s.accuracy_per_byte for s in e.scores], marker="s", linestyle="--",
                           label=f"{_name(e)}: per byte")
        probability_axis.plot(scales, [100 * s.right_probability for s in e.scores], marker="o", label=_name(e))
    probability_axis.set(xlabel="gate scale", ylabel="%", ylim=(0, 100), title="Probability of the right choice")
    return _finished(drawn, (accuracy_axis, probability_axis), accuracy_axis)


def _name(evaluation: Evaluation | ChoiceEvaluation) -> str:
    name = Path(evaluation.adapter).name if evaluation.adapter else "base"
    if evaluation.gate_layers is not None:
        name += f", layers {describe(evaluation.gate_layers)}"
    if evaluation.delta_scale != 1:
        name += f", delta {evaluation.delta_scale:g}"
    return name


def _finished(drawn: "Figure", axes, accuracy_axis) -> "Figure":
    """The accuracy axis labelled, every axis gridded with its legend, the layout tightened."""
    accuracy_axis.set(xlabel="gate scale", ylabel="%", ylim=(0, 100), title="Accuracy")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    drawn.tight_layout()
    return drawn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapter.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--adapter", nargs="+", action="extend", metavar="ADAPTER",
                        help="adapter file or folder, any format; several are scored in turn on one shared base")
    parser.add_argument("--data", required=True,
                        help=f"{DATA_HELP} of {{instruction, input?, output}} or LLaVA records (with --choices: "
                             "{question, choices, answer})")
    parser.add_argument("--image-folder", help="folder that LLaVA records' 'image' paths are relative to")
    parser.add_argument("--clip", help="CLIP weights for the adapters with a visual prompt (a file or open_clip tag)")
    parser.add_argument("--clip-model", help="open_clip model name or config .json (default: the adapter's)")
    parser.add_argument("--gate-sweep", default="0,1", metavar="SCALES", help="gate scales to score at (default 0,1)")
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--gate-layers", metavar="LAYERS", help=FLAG_HELP)
    layers.add_argument("--layer-sweep", action="store_true",
                        help="score with the top N adapter layers' prompts speaking, N from 0 to all (at most "
                             f"{LAYER_SWEEP_ROWS} values of N, evenly spread), one table each")
    parser.add_argument("--delta-scale", default="1", metavar="S[,S...]",
                        help="scale of the v2 bias/LoRA/norm deltas; several (0,1) score at each, one table each")
    parser.add_argument("--exact", action="store_true", help="also decode greedy answers and count exact ones")
    parser.add_argument("--choices", action="store_true",
                        help="the data are multiple-choice questions ({question, choices, answer}, ARC's, MMLU's): "
                             "report how often the likeliest choice is right (adapter.choices)")
    parser.add_argument("--text", action="store_true",
                        help="the data are plain text (a .txt file, or records' \"text\" field, wikitext's for one): "
                             "report its perplexity and bits per byte, every token scored in windows of "
                             "--max-seq-len (what the adapter does to the base's own language modelling)")
    parser.add_argument("--stride", type=int, metavar="N",
                        help="with --text: windows start N tokens apart, so each token is read after at least "
                             "--max-seq-len - N tokens of context (default: --max-seq-len - 1, windows overlapping "
                             "by one; smaller is slower and closer to the model's full-context perplexity)")
    parser.add_argument("--choice-delimiter", default=" ", metavar="TEXT",
                        help="what goes before each choice as an answer (default a space, as lm-evaluation-harness; "
                             "'' for none)")
    parser.add_argument("--limit", type=int, help="score the first N records only")
    parser.add_argument("--max-seq-len", type=int, help="cut longer examples (default: the model's)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass")
    parser.add_argument("--prompt-format", choices=("auto", *PROMPT_FORMATS), default="auto",
                        help="how the records are written (default auto: each adapter's own)")
    parser.add_argument("--quantize", choices=("none", "nf4", "int8"), default="none")
    parser.add_argument("--clip-quantize", choices=("none", "nf4", "int8"), default="none")
    parser.add_argument("--device", help="e.g. cpu, cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="auto", help="for --exact's decoding")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--plot", metavar="PNG", help="also draw loss and accuracy against the gate scale")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loading import load_many

    try:
        scales = scales_from_text(args.gate_sweep, "--gate-sweep")
        if not scales or any(not math.isfinite(s) or s < 0 for s in scales):  # (named gate_scales, the argument's)
            raise ValueError(f"--gate-sweep: give one or more finite scales >= 0, got {args.gate_sweep!r}")
        deltas = scales_from_text(args.delta_scale, "--delta-scale")
        if not deltas or any(not math.isfinite(d) for d in deltas):
            raise ValueError(f"--delta-scale: give one or more finite numbers, got {args.delta_scale!r}")
        if args.choices and (args.exact or args.max_seq_len or args.text):
            raise ValueError("--choices scores whole choices: --exact, --max-seq-len and --text do not apply")
        if args.text and (args.exact or args.image_folder or args.prompt_format != "auto"):
            raise ValueError("--text scores plain text: --exact, --image-folder and --prompt-format do not apply")
        if args.stride is not None and not args.text:
            raise ValueError("--stride: only with --text (the windows plain text is read in)")
        data = resolve_data(args.data, "--data")  # a hub dataset's file is fetched before the model is loaded
        if not data.is_file():
            raise FileNotFoundError(f"--data: {not_a_file(data)}")
        inputs = {"--data": data}
        for flag, target in (("--json", args.json), ("--plot", args.plot)):
            if target is not None:  # before the evaluation, not after; not an input, nor the other's file
                check_file_target(target, f"{flag}: ", inputs)
                inputs[flag] = target
        models = load_many(args.base, args.adapter or [None], clip=args.clip, clip_model=args.clip_model,
                           clip_quantize=args.clip_quantize, quantize=args.quantize, device=args.device,
                           dtype=args.dtype, kv_cache=args.kv_cache)
        if len(models) > 1:  # every adapter can read the file before any is scored (one: its evaluation checks)
            for model in models:
                _check_readable(model, args, data)
        evaluations = []
        for model in models:
            for layers in selections(model, args):
                for delta in deltas:
                    evaluations.append(_evaluation(model, args, data, scales, delta, layers))
                    shown = choices_table if args.choices else table
                    print(("\n" if len(evaluations) > 1 else "") + shown(evaluations[-1]), flush=True)
        if args.json:
            write_json(evaluations, args.json)
        if args.plot:
            plot(evaluations, args.plot)
    except (ValueError, OSError) as error:
        return refused(error, parser)
    return 0


def _evaluation(model: "Transformer", args: argparse.Namespace, data: Path, scales: list[float], delta: float,
                layers: list[int] | None) -> Evaluation | ChoiceEvaluation:
    """The command line's one evaluation of `model` on `data` at delta scale `delta` with `layers` speaking."""
    common = dict(gate_scales=scales, delta_scale=delta, micro_batch_size=args.micro_batch_size, limit=args.limit,
                  layers=layers)
    prompt_format = _prompt_format(args)
    if args.choices:
        return evaluate_choices(model, data, prompt_format=prompt_format, delimiter=args.choice_delimiter,
                                image_folder=args.image_folder, **common)
    if args.text:
        return evaluate_text(model, data, max_seq_len=args.max_seq_len, stride=args.stride, **common)
    return evaluate(model, data, image_folder=args.image_folder, exact=args.exact, prompt_format=prompt_format,
                    max_seq_len=args.max_seq_len, **common)


def _prompt_format(args: argparse.Namespace) -> str | None:
    """--prompt-format's format (None: each adapter's own)."""
    return None if args.prompt_format == "auto" else args.prompt_format


def _check_readable(model: "Transformer", args: argparse.Namespace, data: Path) -> None:
    """Refuse (ValueError or DataError) what `_evaluation` would refuse of `model` on reading `data`."""
    prompt_format = _prompt_format(args)
    if args.choices:
        scorable_questions(model, data, prompt_format, args.choice_delimiter, args.image_folder, args.limit)
    elif not args.text:  # plain text reads the same for every adapter
        scorable_examples(model, data, args.image_folder, prompt_format, args.limit)


def selections(model: "Transformer", args: argparse.Namespace) -> list[list[int] | None]:
    """The layer selections `model` is scored with: --gate-layers', --layer-sweep's top N layers, or all."""
    if not args.layer_sweep:
        return [layers_from_flag(args.gate_layers, model)]
    return layer_sweep(model, LAYER_SWEEP_ROWS, "--layer-sweep")


if __name__ == "__main__":
    sys.exit(main())
