"""The embedded tiny model: a small LLaMA, CLIP and adapters that the project trains itself, shipped in
assets/tiny/ and loaded with `adapter.load("tiny")` (see assets.py for the names).

    world.py      scenes of coloured shapes, their train/held-out split, rendering
    language.py   scenes in words (shared by the corpus and the question inputs)
    questions.py  questions with exact short answers, and the sentences that state them
    corpus.py     the plain-text pretraining corpus (no instruction format)
    records.py    Alpaca / LLaVA training files for adapter.finetune
    vocab.py      the sentencepiece tokenizer
    pretrain.py   base pretraining, written as a Meta folder
    clip.py       the open_clip CLIP, trained with ClipLoss
    adapters.py   the adapter stages, through adapter.finetune
    examples.py   held-out pictures and questions shipped with the model
    recipe.py     every number of the recipe (full and micro)
    build.py      the stages of `python -m adapter.tiny build`
    evaluate.py   exact-answer accuracy against gate scale
    probe.py      how well the base alone reads scenes, asked in its corpus's forms
    clip_probe.py how much of the image answers the frozen CLIP's features hold
    recall.py     a key -> value recall drill: how fast a fresh base of a shape learns lookups
    report.py     accuracy.json, accuracy.png, the BENCHMARKS.md section
    card.py       MODEL_CARD.md
    assets.py     where the files are; the short names adapter.load accepts
    cli.py        the command line, `python -m adapter.tiny ...`

Kept free of imports: adapter.load reads assets.py on every call.
"""
