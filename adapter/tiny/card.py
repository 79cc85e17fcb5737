"""OUT/MODEL_CARD.md, written from OUT/manifest.json (the build) and OUT/accuracy.json (the evaluation), so
that every number in it comes from a run, never from an edit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..formats.common import write_text_atomically
from .build import MANIFEST, STAGES
from .evaluate import FROZEN, FROZEN_LABEL
from .report import ACCURACY_JSON, ACCURACY_PNG

CARD = "MODEL_CARD.md"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _mb(files: dict[str, Any], prefix: str = "") -> str:
    size = sum(f['bytes'] for n, f in files.items() if n.startswith(prefix))
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def _accuracy_lines(accuracy: dict[str, Any]) -> list[str]:
    if not accuracy:
        return ["Not measured yet: run `python -m adapter.tiny eval`."]
    results, counts = accuracy["accuracy"], accuracy["questions"]
    lines = [f"Exact answers on held-out scenes, greedy ({', '.join(f'{n} {k}' for k, n in counts.items())} "
             "questions); every gate scale from 0 to 2 is in BENCHMARKS.md and "
             f"[{ACCURACY_PNG}]({ACCURACY_PNG}).", "",
             f"| questions | category | {FROZEN_LABEL} | gate 1 (adapter) |", "|---|---|---|---|"]
    for kind, table in results.items():
        off, on = table.get(FROZEN, table.get("0", {})), table.get("1", {})
        for category in ["all"] + [c for c in on if c != "all"]:
            label = f"**{category}**" if category == "all" else category
            lines.append(f"| {kind} | {label} | {100 * off.get(category, float('nan')):.1f}% | "
                         f"{100 * on.get(category, float('nan')):.1f}% |")
    native = accuracy.get("base_dialogue_form")
    if native:
        lines += ["", "The base alone (no adapter), asked the held-out scene questions the way its corpus asks "
                  "(\"... a scene ... Ana asked: QUESTION Ben answered:\", `python -m adapter.tiny probe`), "
                  "answers " + ", ".join(f"{c} {100 * v:.0f}%" for c, v in native.items() if c != "all")
                  + f" ({100 * native['all']:.0f}% in all) correctly: what an adapter can draw on, since it "
                  "changes how the base answers, not what it can read."]
    clip_read = accuracy.get("clip_probe")
    if clip_read:
        lines += ["", "A classifier trained on the frozen CLIP's features (the question as a learned embedding, the "
                  "answer as a class; `python -m adapter.tiny clip-probe`) answers the held-out image questions "
                  + " and ".join(f"{100 * clip_read[reader]['all']:.0f}% right from {what} ("
                                 + ", ".join(f"{c} {100 * v:.0f}%" for c, v in clip_read[reader].items() if c != "all")
                                 + ")" for reader, what in (("global", "its global feature, what a v1 visual prompt "
                                                                      "sees"),
                                                            ("tokens", "all its tokens, what a v2 prompt can see"))
                                 if reader in clip_read)
                  + ": what the picture gives an image adapter to read."]
    return lines


def _where(stages: dict[str, Any]) -> str:
    """Where the stages ran: one CPU, or each group's when a stage was re-run on another machine."""
    groups: dict[str | None, list[str]] = {}
    for name in STAGES:
        if name in stages:
            groups.setdefault(stages[name].get("cpu"), []).append(name)
    if len(groups) > 1:
        each = [f"{', '.join(names)} on {cpu or 'a CPU the manifest does not record'}" for cpu, names in groups.items()]
        return f"on machines shared with other jobs ({'; '.join(each)})"
    cpu = next(iter(groups), None)
    return "on a machine shared with other jobs" + (f" ({cpu})" if cpu else "")


def write_card(out: Path) -> Path:
    manifest, accuracy = _read(out / MANIFEST), _read(out / ACCURACY_JSON)
    recipe, stages, files = manifest.get("recipe", {}), manifest.get("stages", {}), manifest.get("files", {})
    base, clip = stages.get("base", {}), stages.get("clip", {})
    pre, clip_recipe, text, image = (recipe.get(k, {}) for k in ("pretrain", "clip", "text", "image"))
    times = ", ".join(f"{name} {stages[name]['seconds'] / 60:.1f}" for name in STAGES if name in stages)
    lines = [
        "# Tiny LLaMA-Adapter (self-trained, shipped with the code)",
        "",
        "A LLaMA small enough to load in well under a second on a CPU, with the two adapters and the CLIP image "
        "encoder the project trains itself, from nothing but a seed: no downloaded weights, no outside data. It "
        "knows one small world (pictures of 1 to 4 coloured shapes) and exists so that the adapter mechanics "
        "(zero-init gates, the gate scale, visual prompts) can be seen working end to end on any machine.",
        "",
        "```python",
        "import adapter",
        "m = adapter.load(\"tiny\")                          # base + text adapter",
        "m.generate(adapter.alpaca(\"What colour is the star?\", \"There is a large red star on the left.\"), "
        "temperature=0)",
        "v = adapter.load(\"tiny\", adapter=\"tiny-image\")    # base + image adapter + tiny CLIP",
        "v.generate(adapter.image_question(\"How many shapes are there?\"), image=\"assets/tiny/examples/00.png\", "
        "temperature=0)",
        "```",
        "",
        "## Files",
        "",
        f"All of `assets/tiny/` is {_mb(files)} (manifest.json lists every file's size and SHA-256).",
        "",
        f"- `base/`: Meta-format LLaMA, {base.get('parameters', 0) / 1e6:.2f} M parameters (dim {recipe.get('dim')}, "
        f"{recipe.get('n_layers')} layers, {recipe.get('n_heads')} heads, max_seq_len {recipe.get('max_seq_len')}), "
        f"fp16, and its sentencepiece tokenizer ({stages.get('tokenizer', {}).get('pieces')} pieces, BPE, byte "
        f"fallback, unk 0 / bos 1 / eos 2): {_mb(files, 'base/')}",
        f"- `text/`: v1 adapter (prompt length {text.get('prompt_len')} on {text.get('prompt_layers')} layers, "
        f"per-head tanh gates), our native safetensors format: {_mb(files, 'text/')}",
        f"- `image/`: prompts and gates, v2 biases and norm deltas, and a {image.get('visual')} visual prompt that "
        f"reads {'all CLIP tokens' if image.get('visual') == 'v2' else 'the CLIP global feature'} "
        "(`adapter.finetune --mode vision`); the gate scale moves the prompts (and so the "
        "picture), the delta scale the biases and norms: "
        f"{_mb(files, 'image/')}",
        f"- `clip/`: the CLIP vision tower (`visual.*`, fp16) and its open_clip model config `tiny-clip.json`: "
        f"{_mb(files, 'clip/')}",
        f"- `examples/`: a few held-out pictures and questions; `{ACCURACY_PNG}`, `accuracy.json`: the evaluation",
        "",
        "## How it was made",
        "",
        "`python -m adapter.tiny build` (code in `adapter/tiny/`; every number in `adapter/tiny/recipe.py`):",
        "",
        "1. **World.** Scenes of 1 to 4 shapes (circle, square, triangle, star), 6 colours, 2 sizes, on the left, "
        "right, top, bottom or centre of a 3x3 grid, rendered with Pillow at 64x64. A scene is held out when a hash "
        "of its canonical description says so (10%), so train and held-out scenes never overlap.",
        f"2. **Corpus.** {recipe.get('documents', 0):,} plain-text documents about train scenes: descriptions, "
        "stories, dialogues and quizzes (a picture described, then someone asks about it and someone answers, in "
        "a sentence or in a word after 'answered:'), lists of coloured shapes said twice, and sums of digits. No "
        "instruction template: a bare answer followed by the end of the text is what only the adapters are "
        "trained to give.",
        "3. **Tokenizer.** sentencepiece BPE trained on the corpus alone; pieces may span spaces, so the world's "
        "phrases are one piece each (\"▁red▁star\", \"▁on▁the▁left\") and a scene is about a third fewer "
        "tokens; digits stay pieces of their own.",
        f"4. **Base.** `adapter.model.Transformer` pretrained with next-token loss on the corpus only: "
        f"{pre.get('steps')} steps of {pre.get('batch_size')} windows of {recipe.get('max_seq_len')} tokens "
        f"({base.get('corpus_tokens', 0) / 1e6:.1f} M corpus tokens), AdamW, peak lr {pre.get('lr')}; the first "
        f"{pre.get('copy_steps', 0)} steps on corpus spans said twice, which only looking back predicts (without "
        "them the base never learnt to look back at all, so it could not read a scene). Loss on text "
        f"about held-out scenes: {base.get('held_out_loss_fp32')} in fp32, {base.get('held_out_loss_fp16')} after "
        "rounding to fp16 (as shipped).",
        f"5. **CLIP.** open_clip `CLIP` (64x64 images, 8x8 patches, width {clip_recipe.get('width')}, "
        f"{clip_recipe.get('layers')} layers; a {clip_recipe.get('text_layers')}-layer text tower on the same "
        f"tokenizer) trained with `open_clip.ClipLoss` for {clip_recipe.get('steps')} batches of "
        f"{clip_recipe.get('batch_size')} new scenes and their descriptions"
        + (f"; after a scene, with chance {clip_recipe['twin_share']:g}, its twin (one thing's colour, shape, size "
           "or place changed, or two things' colours or shapes swapped) as a hard negative in the same batch"
           if clip_recipe.get("twin_share") else "")
        + f". Held-out picture-to-description retrieval, top-1 of 256: "
        f"{100 * clip.get('held_out_retrieval_top1_of_256', 0):.0f}%.",
        f"6. **Text adapter.** `adapter.finetune` (the code users run) on {text.get('examples'):,} Alpaca records "
        "about train scenes (colour, shape, count, position, size comparison, listing), each instruction the "
        f"scene in words then the question, and sums: {text.get('epochs')} epochs, batch {text.get('batch_size')}, "
        f"lr {text.get('lr')}.",
        f"7. **Image adapter.** `adapter.finetune` on {image.get('examples'):,} LLaVA records (rendered train "
        f"scenes; colour, shape, count, position), CLIP frozen: {image.get('epochs')} epochs, batch "
        f"{image.get('batch_size')}, lr {image.get('lr')}, the visual prompt at its own lr "
        f"{image.get('visual_lr') or image.get('lr')} (`--visual-lr`; at the prompts' lr it learnt nothing).",
        "",
        f"Build time: {manifest.get('build_seconds', 0) / 60:.1f} minutes on {recipe.get('threads')} CPU threads "
        f"(by stage, minutes: {times}), {_where(stages)}. Every stage is "
        "seeded and runs deterministic kernels on a "
        "fixed number of threads, so a rebuild on the same software gives the same bytes (compare with the "
        "SHA-256 sums in manifest.json).",
        "",
        "## Accuracy",
        "",
        *_accuracy_lines(accuracy),
        "",
        "## Limits",
        "",
        "- It is still often wrong. The adapters change how the base answers, not what it can read, so each "
        "category does about as well as the base alone (above) at best: where the base is unsure (places, counts, "
        "sizes) the adapter is too. Counts and size comparisons are the weakest. "
        "How well the base reads depends on its pretraining run more than it should (places at 71% and 37% in "
        "two runs that differed only in the number of steps, 2000 and 5000). The image adapter gets under half of the "
        "image questions: its v1 visual prompt adds one vector (CLIP's global feature) to every prompt token, and "
        "since a layer's attention weights over the prompt sum to one, what each layer takes from the picture is "
        "the same whatever the question asks; all CLIP tokens (v2) did no better at this size. The tiny CLIP is the "
        "first limit: see what a classifier reads from its features (Accuracy, above).",
        "- It only knows its world: six colour words, four shapes, two sizes, five places, and sums and differences "
        "of two digits. Anything else gets fluent-looking nonsense.",
        "- Answers are short exact strings by training; the text adapter expects the Alpaca template (or the chat "
        "tab) with the scene in words and then the question in one instruction, the image adapter the plain image "
        "question (`adapter.image_question`).",
        "- Pictures are read at 64x64; photos or drawings unlike the rendered scenes are out of distribution.",
        "- The sums asked in the held-out questions also appear, as statements, in the pretraining corpus: the "
        "held-out arithmetic measures following the instruction, not learning to add.",
        f"- {recipe.get('max_seq_len')} tokens of context. It is a demonstration model, not a language model to use "
        "for anything else.",
        "",
    ]
    path = out / CARD
    write_text_atomically(path, "\n".join(lines))
    return path
