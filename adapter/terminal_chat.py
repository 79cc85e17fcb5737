"""`python -m adapter.terminal_chat`: a conversation in the terminal, answers streamed, the gate set between turns.

The app's chat (adapter.engine: the adapter's prompt format, the oldest turns dropped when the context is full)
on standard input and output. Lines starting with "/" are commands (`/help` lists them): `/gate 0` asks the
next question of the frozen base, `/gate 1` of the trained adapter again, without reloading anything. Ctrl-C
stops the answer being written; Ctrl-D or `/quit` ends the conversation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .arg_types import refused, unicode_output
from .formats import BASE_HELP
from .gate_layers import FLAG_HELP, layers_from_flag, speaking
from .kv_cache import KV_CACHE_DTYPES
from .prompts import PROMPT_FORMATS
from .sampling_flags import add_sampling_flags, sampling_flags

if TYPE_CHECKING:
    from .engine import Engine, Settings
    from .next_token import NextTokens

HELP = """commands:
  /gate S         gate scale from the next answer on (0 = the frozen base, 1 = the trained adapter)
  /delta S        delta scale of the v2 biases, LoRA and norms
  /temperature T  sampling temperature (0 = greedy)
  /layers L       only these adapter layers' prompts speak: all, top N, bottom N or numbers such as 28-31
                  (a layer's heads after a colon: 31:0-3)
  /system TEXT    system prompt (chat formats only); /system alone removes it
  /image PATH     talk about this picture (a conversation of its own); /image alone: back to the chat
  /next QUESTION  the likeliest first tokens of the answer at gate 0 and at the gate set, without answering
  /save FILE      append the chat so far (not a picture's) to FILE (.jsonl) as one training record, in the chat
                  messages layout that fine-tuning reads
  /reset          forget the conversation
  /settings       what the next answer is asked with
  /quit           end (as does Ctrl-D)"""
SCALE_COMMANDS = {"/gate": "gate_scale", "/delta": "delta_scale", "/temperature": "temperature"}


@dataclasses.dataclass
class Conversation:
    """What the terminal chat keeps between lines: the turns so far, the settings, the picture asked about."""

    engine: Engine
    settings: Settings
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    image_history: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # the turns about the picture
    image: Any = None

    def command(self, line: str, out: TextIO) -> bool:
        """Carry out one /command; False when it ends the conversation. Bad values raise ValueError."""
        from .images import load_image

        name, _, value = line.partition(" ")
        value = value.strip()
        if name in ("/quit", "/exit"):
            return False
        if name in SCALE_COMMANDS:
            field = SCALE_COMMANDS[name]
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{name}: give a number, e.g. '{name} 0.5'") from None
            self.settings = self.engine.check(dataclasses.replace(self.settings, **{field: number}))
            out.write(f"{field.replace('_', ' ')} {number:g}\n")
        elif name == "/layers":
            settings = dataclasses.replace(self.settings, gate_layers=value or "all")
            layers = self.engine.layers_of(settings)
            self.settings = settings
            out.write(speaking(self.engine.model, layers) + "\n")
        elif name == "/system":
            self.engine.prompts.check_system(value)
            self.settings = dataclasses.replace(self.settings, system=value or None)
            out.write(f"system prompt: {value!r}\n" if value else "no system prompt\n")
        elif name == "/image":
            if value and not self.engine.can_see_images:
                raise ValueError("/image: this adapter cannot see images (it needs a visual prompt and --clip)")
            self.image = load_image(value) if value else None
            self.image_history.clear()
            out.write(f"asking about {value}\n" if value else "back to the chat\n")
        elif name == "/next":
            out.write(self.next_tokens(value).table() + "\n")
        elif name == "/save":
            self.save(value, out)
        elif name == "/reset":
            self.history.clear()
            self.image_history.clear()
            out.write("conversation forgotten\n")
        elif name == "/settings":
            shown = [f"{key} {value}" for key, value in dataclasses.asdict(self.settings).items()]
            shown += [f"format {self.engine.prompts.name}"] + (["asking about a picture"] if self.image is not None
                                                                else [])
            out.write(", ".join(shown) + "\n")
        elif name == "/help":
            out.write(HELP + "\n")
        else:
            raise ValueError(f"{name}: unknown command; /help lists them")
        return True

    def save(self, path: str, out: TextIO) -> None:
        """Append the chat's answered turns (and its system prompt) to `path` as one `messages` record."""
        from .finetune.records import conversation_record

        if Path(path).suffix != ".jsonl":
            raise ValueError(f"/save: name a .jsonl file (a record a line, each /save appending one), got {path!r}")
        turns = [(question, answer) for question, answer in self.history if answer]
        if not turns and self.image_history:  # "no answered question" while a picture's questions were answered
            raise ValueError("/save: saves the chat, not a picture's questions (a chat record holds no picture); "
                             "/image alone goes back to the chat")
        record = conversation_record(turns, self.settings.system)
        try:
            with open(path, "a+b") as file:  # a file whose last line has no newline: the record on a line of its own
                size = file.seek(0, os.SEEK_END)
                file.seek(max(size - 1, 0))
                ended = size == 0 or file.read(1) == b"\n"
                line = json.dumps(record, ensure_ascii=False) + "\n"
                file.write((line if ended else "\n" + line).encode())
        except OSError as error:
            raise ValueError(f"/save: cannot write {path}: {error.strerror}") from None
        unanswered = len(self.history) - len(turns)  # stopped before a word, or answered with nothing
        out.write(f"saved {len(turns)} answered turn(s) to {path} as one training record" +
                  (f" ({unanswered} without an answer left out)" if unanswered else "") + "\n")

    def next_tokens(self, question: str) -> NextTokens:
        """The next token's probabilities after `question` (in this conversation, or about the picture) at gate 0
        and at the gate set (adapter.next_token)."""
        from .next_token import next_tokens

        if not question:
            raise ValueError("/next: give the question, e.g. '/next What colour is the star?'")
        if self.image is not None:
            prompt = self.engine.image_prompt(question, self.settings, self.image_history)
        else:
            prompt = self.engine.chat_prompt(self.history, question, self.settings)
        scales = sorted({0.0, self.settings.gate_scale})
        return next_tokens(self.engine.model, prompt, scales, delta_scale=self.settings.delta_scale,
                           image=self.image, layers=self.engine.layers_of(self.settings))

    def answer(self, question: str, out: TextIO) -> str:
        """Stream the answer to `question` to `out`; keep the turn (in the chat, or in the conversation about the
        picture)."""
        if self.image is not None:
            answers = self.engine.ask_image(self.image, question, self.settings, self.image_history)
        else:
            answers = self.engine.chat(self.history, question, self.settings)
        written = ""
        try:
            for answer in answers:
                out.write(answer[len(written):])
                written = answer
                out.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            answers.close()
            out.write(" [stopped]")
        out.write("\n")
        (self.history if self.image is None else self.image_history).append((question.strip(), written))
        return written


def run(conversation: Conversation, lines: Iterable[str], out: TextIO, err: TextIO, prompt: str = "") -> None:
    """The conversation over `lines` (questions and /commands); a bad line is said on `err` and the chat goes on."""
    out.write(prompt)
    out.flush()
    for line in lines:
        text = line.strip()
        try:
            if text.startswith("/"):
                if not conversation.command(text, out):
                    return
            elif text:
                conversation.answer(text, out)
        except (ValueError, OSError) as error:
            err.write(f"error: {error}\n")
        out.write(prompt)
        out.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapter.terminal_chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="tiny", help=BASE_HELP)
    parser.add_argument("--adapter", help="adapter file or folder, any format (with --base tiny: tiny-text)")
    parser.add_argument("--clip", help="CLIP weights for an adapter with a visual prompt (a file or open_clip tag)")
    parser.add_argument("--clip-model", help="open_clip model name or config .json (default: the adapter's)")
    parser.add_argument("--quantize", choices=("none", "nf4", "int8"), default="none")
    parser.add_argument("--clip-quantize", choices=("none", "nf4", "int8"), default="none")
    parser.add_argument("--device", help="e.g. cpu, cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="auto")
    parser.add_argument("--compile", action="store_true", help="decode through torch.compile")
    parser.add_argument("--prompt-format", choices=("auto", *PROMPT_FORMATS), default="auto",
                        help="auto: the adapter's own (or the base's chat template's)")
    parser.add_argument("--system", help="system prompt (chat formats only)")
    parser.add_argument("--gate-scale", type=float, default=1.0)
    parser.add_argument("--gate-layers", metavar="LAYERS", default="all", help=FLAG_HELP)
    parser.add_argument("--delta-scale", type=float, default=1.0)
    add_sampling_flags(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, help="seed for sampling (default: a new one each answer)")
    return parser


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None) -> int:
    unicode_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    try:
        from .engine import Engine, Settings  # (torch's first import takes seconds: Ctrl-C may come during it)
        from .loading import load_many

        settings = Settings(gate_scale=args.gate_scale, delta_scale=args.delta_scale, **sampling_flags(args),
                            max_new_tokens=args.max_new_tokens, seed=args.seed, system=args.system,
                            gate_layers=args.gate_layers)
        model, = load_many(args.base, [args.adapter], clip=args.clip, clip_model=args.clip_model,
                           clip_quantize=args.clip_quantize, quantize=args.quantize, device=args.device,
                           dtype=args.dtype, kv_cache=args.kv_cache)
        engine = Engine(model, max_new_tokens=args.max_new_tokens, compile=args.compile,
                        prompt_format=None if args.prompt_format == "auto" else args.prompt_format)
        engine.prompts.check_system(settings.system)
        layers_from_flag(settings.gate_layers, model)
    except (ValueError, OSError) as error:
        return refused(error, parser)
    except KeyboardInterrupt:  # while loading: a quiet exit, as at the prompt
        print(file=sys.stderr)
        return 130
    interactive = stdin.isatty()
    if interactive:
        print(f"{model.adapter_path or model.base_path}, asked in {engine.prompts.name}; /help lists the commands",
              file=sys.stderr)
    try:
        run(Conversation(engine, settings), stdin, sys.stdout, sys.stderr, prompt="> " if interactive else "")
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat (during an answer it stops that answer)
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
