"""`python -m adapter.tiny build|eval|probe|clip-probe|recall|held-out`: rebuild the shipped tiny model, measure
it, or write its held-out questions as fine-tuning records (for `python -m adapter.evaluate`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..arg_types import positive_int, positive_number, unicode_output
from ..interrupts import stoppable
from .assets import ASSETS
from .build import STAGES
from .recipe import RECIPES, Recipe

DEFAULT_DOCUMENTS = 200  # held-out corpus documents


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapter.tiny", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train everything and write the assets folder")
    build.add_argument("--out", type=Path, default=ASSETS, help="assets folder (default: assets/tiny)")
    build.add_argument("--work", type=Path, default=Path("build/tiny"), help="corpus, training files, runs")
    build.add_argument("--stages", default=",".join(STAGES),
                       help=f"comma-separated subset of {','.join(STAGES)} (each reads what earlier ones wrote)")
    build.add_argument("--fp32", action="store_true",
                       help="train in float32, not the recipe's bf16: not the shipped bytes, but over 10x faster "
                            "on CPUs without native bf16 (no AMX or AVX512-BF16; BENCHMARKS.md, Training precision)")
    evaluate = commands.add_parser("eval", help="held-out accuracy at gate scales 0..2; plot, card, BENCHMARKS.md")
    evaluate.add_argument("--out", type=Path, default=ASSETS, help="assets folder to evaluate (default: assets/tiny)")
    evaluate.add_argument("--write", type=Path, default=Path("BENCHMARKS.md"), help="benchmarks file to update")
    probe = commands.add_parser("probe", help="how well the base alone reads held-out scenes, in its corpus's forms")
    probe.add_argument("--out", type=Path, default=ASSETS, help="assets folder whose base to probe")
    probe.add_argument("--wrong", type=int, default=0, metavar="N",
                       help="also print up to N wrong answers per category (of the dialogue form)")
    probe.add_argument("--by-template", action="store_true",
                       help="also print the dialogue form's score per question template ('Where is the <shape>?')")
    clip_probe = commands.add_parser("clip-probe", help="how much of the image answers the CLIP's features hold")
    clip_probe.add_argument("--clip", type=Path, default=ASSETS / "clip",
                            help="folder with visual.safetensors and tiny-clip.json (default: assets/tiny/clip)")
    clip_probe.add_argument("--pictures", type=positive_int,
                            help="train pictures for the classifiers (default: the recipe's)")
    clip_probe.add_argument("--epochs", type=positive_int, help="classifier epochs (default: the recipe's)")
    recall = commands.add_parser("recall", help="how many steps a fresh base of the recipe's shape needs to learn "
                                                "key -> value lookups (a drill without scenes)")
    recall.add_argument("--steps", type=positive_int, default=2000, help="training steps (default: 2000, the base's)")
    recall.add_argument("--every", type=positive_int, default=250, help="report held-out accuracy every N steps")
    recall.add_argument("--batch", type=positive_int, default=32, help="sequences per step")
    recall.add_argument("--lr", type=positive_number, help="peak lr (default: the recipe's base lr)")
    recall.add_argument("--pairs", type=positive_int, default=4, help="key -> value pairs per sequence (default: 4)")
    recall.add_argument("--keys", type=positive_int, default=100, help="distinct keys (default: 100)")
    recall.add_argument("--values", type=positive_int, default=6, help="distinct values (default: 6)")
    recall.add_argument("--bf16", action="store_true",
                        help="train under bf16 autocast, as the base pretrains (default: float32)")
    recall.add_argument("--seed", type=int, help="seed of the initial weights and the sequences (default: the "
                        "recipe's); the step at which the lookup forms varies with it")
    for name in ("dim", "layers", "heads"):
        recall.add_argument(f"--{name}", type=positive_int, help=f"model {name} (default: the recipe's base)")
    held = commands.add_parser("held-out", help="write the held-out questions eval asks as fine-tuning records "
                                                "(Alpaca for text, LLaVA + PNGs for images), or held-out documents "
                                                "of the base's corpus as plain-text records (corpus)")
    held.add_argument("kind", choices=("text", "image", "corpus"))
    held.add_argument("--documents", type=positive_int,
                      help=f"corpus: how many documents (default {DEFAULT_DOCUMENTS})")
    held.add_argument("out", type=Path, help="JSONL file to write (image records: PNGs in a folder beside it; "
                                             "corpus: a .txt file gets the documents as one text, a line each)")
    held.add_argument("--per-category", type=positive_int, help="questions per category (default: the recipe's eval's)")
    held.add_argument("--choices", action="store_true",
                      help="the colour, shape, position and count questions as multiple-choice records")
    for sub in (build, evaluate, probe, clip_probe, recall, held):
        sub.add_argument("--scale", choices=sorted(RECIPES), default="full", help="recipe (micro: a few steps)")
        sub.set_defaults(command_parser=sub)  # its flags name a refusal (held-out's OUT is no --out)
    return parser


def run_recall(options: argparse.Namespace, recipe: Recipe) -> None:
    """The recall drill with the base's schedule (float32 unless --bf16); prints one row of slot accuracies per
    report."""
    import dataclasses

    from ..config import ModelArgs
    from .build import deterministic
    from .recall import RecallDrill, guess_floor, recall_curve

    deterministic(recipe.threads)
    seed = recipe.seed if options.seed is None else options.seed
    drill = RecallDrill(options.pairs, options.keys, options.values)
    args = ModelArgs(dim=options.dim or recipe.dim, n_layers=options.layers or recipe.n_layers,
                     n_heads=options.heads or recipe.n_heads, vocab_size=drill.vocab_size, multiple_of=64,
                     max_seq_len=drill.length)
    settings = dataclasses.replace(recipe.pretrain, steps=options.steps, batch_size=options.batch,
                                   lr=options.lr or recipe.pretrain.lr, bf16=options.bf16, copy_steps=0)
    print(f"recall drill: {drill.pairs} pairs of {drill.keys} keys and {drill.values} values; model "
          f"{args.n_layers}x{args.dim}, {args.n_heads} heads; batch {settings.batch_size}, lr {settings.lr}, "
          f"{'bf16 autocast' if settings.bf16 else 'float32'}, seed {seed}; "
          f"held-out accuracy per question slot (the last needs no lookup)")
    print("no lookup (a guess among the values not yet given back)  "
          + "  ".join(f"{a:4.0%}" for a in guess_floor(drill)))
    recall_curve(args, drill, settings, seed, options.every)


def write_held_out(options: argparse.Namespace, recipe: Recipe) -> None:
    """The questions `eval` asks, as the adapters were trained on them (answers " red"), so that
    `python -m adapter.evaluate` scores what `eval` scores, with the loss besides."""
    from .evaluate import held_out
    from .records import CHOICES, write_choice_records, write_corpus_records, write_image_records, write_text_records

    if options.kind == "corpus":
        unused = "--per-category" if options.per_category is not None else "--choices" if options.choices else None
        if unused:
            raise ValueError(f"{unused}: not with corpus (documents, not questions: --documents says how many)")
        documents = options.documents or DEFAULT_DOCUMENTS
        write_corpus_records(recipe.seed, documents, options.out)
        print(f"wrote {documents} held-out documents of the base's corpus to {options.out}; score them with "
              "python -m adapter.evaluate --text")
        return
    if options.documents is not None:
        raise ValueError("--documents: only with corpus (questions are --per-category per category)")
    per_category = recipe.eval_per_category if options.per_category is None else options.per_category
    pictures = options.out.with_suffix("") if options.kind == "image" else None  # a folder beside OUT
    if pictures == options.out:  # the pictures went into OUT itself, which then could not be written
        raise ValueError(f"out: name a file such as {options.out}.jsonl (the pictures go in {options.out}/ beside it)")
    questions = held_out(options.kind, recipe.seed, per_category)
    if options.choices:
        count = write_choice_records(questions, options.out, pictures)
        print(f"wrote {count} multiple-choice questions ({', '.join(CHOICES)}) to {options.out}; score them with "
              "python -m adapter.evaluate --choices" + (f" --image-folder {pictures}" if pictures else ""))
    elif options.kind == "text":
        write_text_records(questions, options.out)
        print(f"wrote {len(questions)} text questions to {options.out}")
    else:
        write_image_records(questions, options.out, pictures)
        print(f"wrote {len(questions)} image questions to {options.out}; pass --image-folder {pictures}")


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    options = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress of a half-hour build shows in a log file as it happens
    kept = (f"the stages finished so far are in {options.work} (--stages goes on from there)"
            if options.command == "build" else "no file or folder is left half-written")
    # Ctrl-C, SIGTERM: one line
    return stoppable(lambda: run(options, RECIPES[options.scale]), kept, options.command_parser)


def run(options: argparse.Namespace, recipe: Recipe) -> None:
    """The subcommand `options` name, with `recipe`'s settings."""
    if options.command == "build":
        from .build import Build

        manifest = Build(recipe.in_fp32() if options.fp32 else recipe, options.out,
                         options.work).run(options.stages.split(","))
        print(f"built {options.out} in {manifest['build_seconds'] / 60:.1f} min of stage time")
    elif options.command == "probe":
        from .build import deterministic
        from .probe import probe, scores, template_scores, wrong_answers

        deterministic(recipe.threads)
        answered = probe(options.out, recipe.seed, recipe.eval_per_category)
        for form, rows in answered.items():
            print(f"{form:9s} " + "  ".join(f"{c} {v:.0%}" for c, v in scores(rows).items()))
        if options.by_template:
            for category, text, right, asked in template_scores(answered["dialogue"]):
                print(f"{category:10s} {text:44s} {right:4d}/{asked:<4d} {right / asked:4.0%}")
        for line in wrong_answers(answered["dialogue"], options.wrong):
            print(line)
    elif options.command == "clip-probe":
        from .build import deterministic
        from .clip_probe import clip_probe

        deterministic(recipe.threads)
        found = clip_probe(options.clip, recipe.seed, options.pictures or recipe.clip_probe_pictures,
                           options.epochs or recipe.clip_probe_epochs, recipe.eval_per_category)
        for reader, row in found.items():
            print(f"{reader:7s} " + "  ".join(f"{c} {v:.0%}" for c, v in row.items()))
    elif options.command == "recall":
        run_recall(options, recipe)
    elif options.command == "held-out":
        write_held_out(options, recipe)
    else:
        from .assets import CLIP
        from .build import deterministic
        from .card import write_card
        from .clip_probe import clip_probe
        from .evaluate import evaluate
        from .probe import probe, scores
        from .report import ACCURACY_PNG, write_accuracy, write_benchmarks

        deterministic(recipe.threads)
        results, counts = evaluate(recipe.seed, recipe.eval_per_category, recipe.gate_scales, options.out)
        native = scores(probe(options.out, recipe.seed, recipe.eval_per_category, ["dialogue"])["dialogue"])
        clip_read = None
        if (options.out / CLIP).is_dir():
            clip_read = clip_probe(options.out / CLIP, recipe.seed, recipe.clip_probe_pictures,
                                   recipe.clip_probe_epochs, recipe.eval_per_category)
        write_accuracy(results, options.out, counts, native, clip_read)
        write_benchmarks(results, counts, options.write, options.out / ACCURACY_PNG)
        write_card(options.out)
