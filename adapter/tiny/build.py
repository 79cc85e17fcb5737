"""`python -m adapter.tiny build`: the tiny model from nothing but the seed, one stage after another.

    data       corpus (plain text), text-question and image-question training files, in the work folder
    tokenizer  sentencepiece on the corpus                       -> OUT/base/tokenizer.model
    base       next-token pretraining on the corpus              -> OUT/base/params.json, consolidated.00.pth
    clip       contrastive CLIP on rendered scenes               -> OUT/clip/tiny-clip.json, visual.safetensors
    text       adapter.finetune on the text questions            -> OUT/text/adapter.safetensors
    image      adapter.finetune on the image questions           -> OUT/image/adapter.safetensors
    examples   a few held-out pictures and questions (for the app and people) -> OUT/examples/
    card       OUT/manifest.json (sizes, hashes, times) and OUT/MODEL_CARD.md

Every stage is seeded and runs with deterministic algorithms on a fixed number of threads, so a rebuild
gives the same bytes; manifest.json lists each file's SHA-256 to check that. A stage reads what the
earlier ones wrote, so `--stages` can redo some of them alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cpu_features import bf16_emulation_warning, describe_cpu
from ..formats.common import write_text_atomically
from . import assets
from .recipe import Recipe

STAGES = ("data", "tokenizer", "base", "clip", "text", "image", "examples", "card")
MANIFEST = "manifest.json"


def deterministic(threads: int) -> None:
    """Same bytes every run: fixed threads (reductions split the same way), deterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Build:
    recipe: Recipe
    out: Path
    work: Path
    log: Callable[[str], None] = print

    # ----- paths --------------------------------------------------------------------------------------
    @property
    def corpus_path(self) -> Path:
        return self.work / "corpus.txt"

    @property
    def base(self) -> Path:
        return self.out / assets.BASE

    @property
    def clip_files(self) -> tuple[Path, Path]:
        return self.out / assets.CLIP_WEIGHTS, self.out / assets.CLIP_CONFIG

    # ----- running -----------------------------------------------------------------------------------
    def run(self, stages: Sequence[str] = STAGES) -> dict[str, Any]:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
        deterministic(self.recipe.threads)
        warning = self.bf16_warning(stages)
        if warning:
            self.log(warning)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        manifest = self.read_manifest()
        for stage in STAGES:
            if stage not in stages:
                continue
            started = time.perf_counter()
            self.log(f"== {stage}")
            info = getattr(self, f"stage_{stage}")(manifest) or {}
            info["seconds"] = round(time.perf_counter() - started, 1)
            info["cpu"] = f"{describe_cpu()}, {self.recipe.threads} threads"  # what the time depends on
            manifest.setdefault("stages", {})[stage] = info
            self.log(f"== {stage} done in {info['seconds']:.0f} s")
            self.write_manifest(manifest)
        return manifest

    def bf16_warning(self, stages: Sequence[str]) -> str | None:
        """What to tell a user whose CPU would emulate the bf16 of the stages about to run."""
        slow = [stage for stage in self.recipe.bf16_stages if stage in stages]
        emulated = slow and bf16_emulation_warning(f"bf16 autocast in stage(s) {', '.join(slow)}")
        if not emulated:
            return None
        return (f"warning: {emulated}; expect hours, not the card's minutes (--fp32 trains a model of the same "
                "recipe in float32, over ten times faster here)")

    def read_manifest(self) -> dict[str, Any]:
        path = self.out / MANIFEST
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["recipe"] = self.recipe.to_dict()
        manifest["build_seconds"] = round(sum(s["seconds"] for s in manifest.get("stages", {}).values()), 1)
        manifest["files"] = {str(p.relative_to(self.out)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                             for p in sorted(self.out.rglob("*"))
                             if p.is_file() and p.name not in (MANIFEST, "MODEL_CARD.md", "accuracy.json",
                                                                "accuracy.png")}
        write_text_atomically(self.out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    # ----- stages -----------------------------------------------------------------------------------
    def stage_data(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from .corpus import corpus
        from .questions import image_questions, text_questions
        from .records import write_image_records, write_text_records

        r = self.recipe
        documents = corpus(r.seed, r.documents)
        write_text_atomically(self.corpus_path, "".join(d + "\n" for d in documents))
        write_text_records(text_questions(r.seed, "train", r.text.examples), self.work / "text.jsonl")
        write_image_records(image_questions(r.seed, "train", r.image.examples), self.work / "image.jsonl",
                            self.work / "images")
        return {"documents": len(documents), "text_examples": r.text.examples, "image_examples": r.image.examples}

    def documents(self) -> list[str]:
        return self.corpus_path.read_text(encoding="utf-8").splitlines()

    def stage_tokenizer(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from ..tokenizer import open_tokenizer
        from .vocab import train_tokenizer

        path = train_tokenizer(self.documents(), self.base / "tokenizer.model", self.recipe.vocab_size)
        return {"pieces": open_tokenizer(path).n_words}

    def stage_base(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from ..config import ModelArgs
        from ..tokenizer import open_tokenizer
        from .corpus import corpus
        from .pretrain import mean_loss, pack, pretrain, round_to_fp16, write_meta_folder

        r = self.recipe
        tokenizer = open_tokenizer(self.base / "tokenizer.model")
        windows = pack(self.documents(), tokenizer, r.max_seq_len)
        args = ModelArgs(dim=r.dim, n_layers=r.n_layers, n_heads=r.n_heads, vocab_size=tokenizer.n_words,
                         multiple_of=64, max_seq_len=r.max_seq_len)
        self.log(f"pretraining {args.dim}-dim, {args.n_layers}-layer LLaMA on {windows.numel():,} tokens "
                 f"({len(windows)} windows of {r.max_seq_len})")
        model = pretrain(args, windows, r.pretrain, r.seed, self.log)
        held_out = pack(corpus(r.seed, max(8, r.documents // 50), split="held-out"), tokenizer, r.max_seq_len)
        loss32 = mean_loss(model, held_out)
        loss16 = mean_loss(round_to_fp16(model), held_out)
        write_meta_folder(model, self.base, self.base / "tokenizer.model")
        return {"parameters": model.count_parameters(), "corpus_tokens": windows.numel(),
                "held_out_loss_fp32": round(loss32, 4), "held_out_loss_fp16": round(loss16, 4)}

    def stage_clip(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from ..tokenizer import open_tokenizer
        from .clip import retrieval_accuracy, train_clip, write_clip

        r = self.recipe
        tokenizer = open_tokenizer(self.base / "tokenizer.model")
        model, config = train_clip(r.clip, tokenizer, r.seed, self.log)
        accuracy = retrieval_accuracy(model, tokenizer, r.clip.context_length, r.seed)
        write_clip(model, config, self.out / assets.CLIP)
        return {"vision_parameters": sum(p.numel() for p in model.visual.parameters()),
                "held_out_retrieval_top1_of_256": round(accuracy, 4)}

    def stage_text(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from .adapters import install, train_adapter

        run = train_adapter(self.recipe.text, self.base, self.work / "text.jsonl", self.work / "text-run",
                            self.recipe.seed, max_seq_len=self.recipe.max_seq_len)
        install(run, self.out / assets.TEXT)
        return {"run": str(self.work / "text-run")}

    def stage_image(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from .adapters import install, train_adapter

        run = train_adapter(self.recipe.image, self.base, self.work / "image.jsonl", self.work / "image-run",
                            self.recipe.seed, max_seq_len=self.recipe.max_seq_len, image_folder=self.work / "images",
                            clip=self.clip_files)
        install(run, self.out / assets.IMAGE, clip_model=self.clip_files[1])
        return {"run": str(self.work / "image-run")}

    def stage_examples(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from .examples import write_examples

        return {"examples": write_examples(self.out / assets.EXAMPLES, self.recipe.seed)}

    def stage_card(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from .card import write_card

        self.write_manifest(manifest)
        write_card(self.out)
        return {}
