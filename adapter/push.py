"""`python -m adapter.push SOURCE owner/name --base BASE`: share an adapter on the Hugging Face hub, with a model card.

Any adapter the project reads (ours, the official releases, PEFT's, litgpt's, a fine-tuning run's) is pushed in our
format, or in PEFT's (`--to peft`) where PEFT can hold it, beside a README.md that says what it is, how to ask it
and, for a run of adapter.finetune, how it was trained (with the run's loss and gate plots). Others then serve it
with `--adapter hf:owner/name`. The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`); `--folder DIR`
writes what would be pushed into a new folder instead and pushes nothing, to read the card first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .arg_types import refused, unicode_output
from .convert import adapter_on_meta_base, check_target, write_adapter
from .finetune.logs import LOG
from .formats import BASE_HELP
from .formats.common import atomic_folder
from .formats.native import FILE_NAME as ADAPTER_FILE
from .formats.native import clip_config_file, clip_config_name
from .hub import PREFIX, hub_failures, hub_module, is_remote, repo_id, repo_of, resolve
from .model import Transformer
from .model_card import RUN_ADAPTERS, Training, model_card, training_of
from .tiny.assets import resolve as resolve_tiny

TARGETS = ("native", "peft")  # what `--adapter hf:owner/name` reads back from a repository's snapshot
CARD = "README.md"
ADVICE = "check that your token may write to it (HF_TOKEN, or `hf auth login`) and that you are online"


def stage(source: str | Path, base: str | Path | None, folder: Path, repo: str, to: str = "native",
          branch: str | None = None) -> list[Path]:
    """Write into the empty `folder` what `push` uploads (to `branch` of `repo`, None: the main one): the adapter
    in format `to`, its card, a fine-tuning run's plots, the model config file of the CLIP tower an image adapter
    reads (when it names one); the files written. `base` None: the base a fine-tuning run's adapter was trained
    on, as its log names it."""
    check_to(to)
    repo = repo_id(repo, "repo")
    _, named, _, _ = resolve_tiny(str(base or ""), str(source), None, None)
    source_path = resolve(named, "source")
    if (source_path / LOG).is_file() and not (source_path / ADAPTER_FILE).is_file():  # a run, not its adapter
        kept = [source_path / name for name in RUN_ADAPTERS if (source_path / name).is_dir()]
        raise ValueError(f"source: {source_path} is a fine-tuning run; push one of its adapters: "
                         f"{' or '.join(map(str, kept)) or 'none written yet'}")
    training = training_of(source_path)
    base = base or (training.config.get("base") if training else None)
    if not base:
        raise ValueError("base: name the base the adapter belongs to (--base); only a fine-tuning run's adapter "
                         "says its own")
    return stage_model(adapter_on_meta_base(base, source_path), str(base), folder, repo, to, training,
                       str(source) if is_remote(source) else None, branch)


def stage_model(model: Transformer, base: str, folder: Path, repo: str, to: str = "native",
                training: Training | None = None, origin: str | None = None, branch: str | None = None) -> list[Path]:
    """`stage` for an adapter already in a model (a served one: it is left as it is), whose base is named `base`;
    `origin`: the published adapter it was read from, for its card."""
    check_to(to)
    if branch and "/" in branch:  # hf:OWNER/NAME@dev/v2 reads as branch dev, folder v2
        raise ValueError(f"branch: {branch!r} holds a '/', which the card's hf:{repo}@BRANCH cannot name; choose a "
                         "branch name without one")
    write_adapter(model, folder, to, _hub_name(base))  # with its CLIP model config file, if any, beside it
    config = clip_config_file(model.adapter_args)
    clip_config = None if config is None else clip_config_name(config)
    for plot in training.plots if training else []:
        shutil.copyfile(plot, folder / plot.name)
    card = model_card(model, repo, base, to, training, clip_config, origin, branch)
    (folder / CARD).write_text(card, encoding="utf-8")
    return sorted(folder.iterdir())


def push(source: str | Path, repo: str, base: str | Path | None, to: str = "native", private: bool = False,
         branch: str | None = None, message: str | None = None, token: str | None = None) -> str:
    """Push adapter `source` (any format; the base it belongs to is `base`, None for the one a fine-tuning run's
    adapter was trained on) to the hub repository `repo`, created if
    needed (private with `private`; an existing one keeps its visibility), on `branch` (created if needed) or the
    main one, with `token` (default: huggingface_hub's own); the commit's URL. ValueError naming the cause where the
    adapter cannot be written as `to`, there is no token, or the hub refuses."""
    return _upload(lambda folder, checked: stage(source, base, folder, checked, to, branch), repo, to, private,
                   branch, message, token)


def push_model(model: Transformer, base: str, repo: str, training: Training | None = None, to: str = "native",
               private: bool = False, token: str | None = None) -> str:
    """`push` for an adapter already in a model (the app's served ones), whose base is named `base`."""
    return _upload(lambda folder, checked: stage_model(model, base, folder, checked, to, training), repo, to,
                   private, None, None, token)


def _upload(write: Callable[[Path, str], object], repo: str, to: str, private: bool, branch: str | None,
            message: str | None, token: str | None) -> str:
    """`write(folder, repo)` into a temporary folder, then that folder in one commit to `repo`."""
    check_to(to)
    if not isinstance(private, bool):
        raise ValueError(f"private: must be True or False, got {private!r:.80}")
    for name, value in (("branch", branch), ("message", message), ("token", token)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: expected text, got {value!r:.80}")
    repo = repo_id(repo, "repo")
    hub = hub_module("push", repo)
    check_token(hub, repo, token)
    with tempfile.TemporaryDirectory(prefix="llama-adapter-push-") as tmp:
        write(Path(tmp), repo)
        return commit_folder(Path(tmp), repo, private, message or f"Upload a LLaMA-Adapter ({to} format)", branch,
                             token)


def commit_folder(folder: Path, repo: str, private: bool, message: str, branch: str | None = None,
                  token: str | None = None, what: str = "push") -> str:
    """`folder` in one commit to the hub repository `repo`, created if needed (private with `private`; an existing
    one keeps its visibility), on `branch` (created if needed) or the main one; the commit's URL."""
    hub = hub_module(what, repo)
    with hub_failures(what, f"could not push to {repo} on the Hugging Face hub", ADVICE):
        api = hub.HfApi(token=token)
        api.create_repo(repo, private=True if private else None, exist_ok=True)
        if branch:
            api.create_branch(repo, branch=branch, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=folder, revision=branch, commit_message=message)
    return str(commit.commit_url)


def hub_target(value: str | None, private: bool, what: str = "--push-to-hub") -> str | None:
    """A command line's `--push-to-hub` repository (None where not asked) with a token to write to it, checked before
    any long work (training, quantizing); `--hub-private` needs one."""
    if value is None:
        if private:
            raise ValueError(f"--hub-private: give {what} OWNER/NAME too")
        return None
    repo = repo_id(value, what)
    check_token(hub_module(what, repo), repo, what=what)
    return repo


def check_to(to: str) -> None:
    check_target(to)
    if to not in TARGETS:
        raise ValueError(f"to: {to!r} cannot be pushed (a hub repository holds a folder); choose from {TARGETS}")


def check_token(hub, repo: str, token: str | None = None, what: str = "push") -> None:
    """A clear error before any work where there is no token to write with (given, or huggingface_hub's own)."""
    if not token and hub.get_token() is None:
        raise ValueError(f"{what}: no Hugging Face token to write to {repo} with; set HF_TOKEN or run `hf auth login`")


def _hub_name(base: str) -> str:
    """The base as a PEFT config's base_model_name_or_path names it: a hub id without `hf:`, else a local base by
    its folder's name only (its path on this machine is not published)."""
    return repo_of(base) if base.startswith(PREFIX) else Path(base).name or base


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the adapter: a file or folder in any supported format, tiny-text, tiny-image, "
                                       "hf:owner/name or official:NAME")
    parser.add_argument("repo", help="the hub repository to push to, owner/name (created if needed)")
    parser.add_argument("--base", help="the base the adapter belongs to: " + BASE_HELP + "; default for a "
                                       "fine-tuning run's adapter: the base its log names")
    parser.add_argument("--to", choices=TARGETS, default="native",
                        help="native: ours (any adapter); peft: PEFT's, for transformers + peft users (a v1 adapter "
                             "with raw gates, or a LoRA alone)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--branch", help="push to this branch (created if needed) instead of main")
    parser.add_argument("--message", help="the commit message")
    parser.add_argument("--folder", help="write what would be pushed into this new folder and push nothing")
    options = parser.parse_args(argv)
    try:
        if options.folder == "":  # an unset variable in a script: staging was meant, not a push
            raise ValueError("--folder: empty; name the new folder to write into")
        if options.folder is not None:
            repo = repo_id(options.repo, "repo")
            written = atomic_folder(Path(options.folder),
                                    lambda tmp: stage(options.source, options.base, tmp, repo, options.to,
                                                      options.branch))
            print(f"wrote {written}: {', '.join(sorted(p.name for p in written.iterdir()))}")
        else:
            url = push(options.source, options.repo, options.base, options.to, options.private, options.branch,
                       options.message)
            print(f"pushed {url}")
    except (ValueError, OSError) as error:
        return refused(error, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
