"""Fine-tuning LLaMA-Adapter on instruction data: `train(TrainConfig(...))` or `python -m adapter.finetune`.

    config.py       the run's settings, validated; --mode -> what is learned
    records.py      Alpaca JSON/JSONL and LLaVA conversation records, all checked before training
    encode.py       tokens and labels (loss on the response and EOS only)
    dataset.py      seeded train/validation split, encoded examples, truncation counts
    batching.py     length-grouped order per epoch, per-process shards, padding
    schedule.py     warm-up then cosine learning rate, per optimizer step
    optimizer.py    AdamW as the official recipe sets it up
    step.py         one optimizer step (accumulation, DDP, NaN check, clipping) and validation loss
    distributed.py  torchrun / DistributedDataParallel
    checkpoint.py   atomic, resumable checkpoints
    logs.py, plots.py   progress bar, log.jsonl, loss.png and gates.png
    export.py       --export official-v1
    trainer.py      train(): the run from checks to final adapter
    cli.py          the command line
"""

from .config import TrainConfig, adapter_args_for
from .records import DataError
from .step import TrainingStopped
from .trainer import RunHooks, TrainResult, train

__all__ = ["DataError", "RunHooks", "TrainConfig", "TrainResult", "TrainingStopped", "adapter_args_for", "train"]
