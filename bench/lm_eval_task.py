"""Writes an lm-evaluation-harness task of a multiple-choice file, asked as `adapter.evaluate --choices` asks it, so
that the harness scoring through this project's OpenAI-compatible server can be checked against this project's
own scoring (README, "Evaluating adapters").

    python -m bench.lm_eval_task --base tiny --adapter tiny-text --data build/choices.jsonl --out build/lm_eval

Each question is written in the adapter's prompt format after the BOS token's text, each choice after its
delimiter and before the answer's end token's text (the served tokenizer reads both texts as those tokens, see
adapter.tokenizer_api), so the harness's ids are the ones `adapter.choices` scores. The task (`OUT/tiny_choices.yaml`,
data in `OUT/questions.jsonl`) is then run with
`lm_eval --model local-completions --model_args model=NAME,base_url=http://HOST:PORT/v1/completions
--tasks tiny_choices --include_path OUT`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from adapter.arg_types import refused
from adapter.choices import read_questions
from adapter.formats import BASE_HELP
from adapter.loading import load
from adapter.prompts import format_named
from bench.args import run_main

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(base: str, adapter: str | None, data: Path, out: Path, name: str = "tiny_choices") -> Path:
    """The task's YAML and data under `out`; returns the YAML's path."""
    model = load(base, adapter, device="cpu")
    tokenizer, written = model.tokenizer, format_named(model.prompt_format)
    bos, end = tokenizer.token_text(tokenizer.bos_id), tokenizer.token_text(written.answer_end_id(tokenizer))
    questions = read_questions(data, written)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": bos + question.prompt, "choices": [choice + end for choice in question.choices],
             "answer": question.answer} for question in questions]
    (out / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    task = out / f"{name}.yaml"
    task.write_text(TASK.format(name=name, data=(out / "questions.jsonl").resolve()), encoding="utf-8")
    return task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_eval_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--adapter", help="the adapter whose prompt format writes the questions")
    parser.add_argument("--data", required=True, type=Path, help="a multiple-choice file (adapter.choices layouts)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the task's YAML and data")
    options = parser.parse_args(argv)
    try:
        print(write_task(options.base, options.adapter, options.data, options.out))
    except (ValueError, OSError) as error:
        return refused(error, parser)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
