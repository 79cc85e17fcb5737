"""`python -m adapter.space OWNER/NAME [the app's flags]`: this app deployed to a Hugging Face Space in one command.

The Space gets this checkout's files (those git tracks or would; tests, benchmarks and CI aside) and runs
`python app.py` as the flags given here would: they become its `ADAPTER_*` variables (those of an earlier deploy that
these flags do not set are removed), checked first as the app checks them, so that a Space is not built only to stop
on a bad flag. A Space
reads no file of this machine, so its base, adapters and CLIP tower are named as it will fetch them: `hf:owner/name`
(`python -m adapter.push` puts an adapter there), `official:NAME`, an open_clip tag, or the embedded `tiny`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .app_config import CLIP_WEIGHT_SUFFIXES, build_parser, env_name, parse_config
from .arg_types import refused, unicode_output
from .hub import hub_failures, hub_module, is_remote, repo_id
from .push import check_token
from .space_fit import check_fit
from .tiny.assets import BASE_NAME, CLIP_NAME, IMAGE_NAME, TEXT_NAME

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = ("tests/", "bench/", ".ci/", "requirements-test.txt")  # what only development needs
SPACE_CHOOSES = ("host", "port", "share")  # a Space serves on its own address and port, publicly
SECRETS = ("api_key", "auth")  # flags whose values a Space keeps as secrets, never as its (public) variables
NAMED = {"base": (BASE_NAME,), "adapter": (TEXT_NAME, IMAGE_NAME), "clip": (CLIP_NAME,), "clip_model": ()}
DEFAULT_HARDWARE = "cpu-basic"  # a new Space's
ZERO_GPU = "zero-"  # zero-a10g: a GPU lent per call of a function decorated with @spaces.GPU
ZERO_GPU_WHY = ("ZeroGPU, which lends a GPU only while a function decorated with @spaces.GPU runs, but this app "
                "keeps its model on one device between requests (it decodes users' chats together and trains while "
                "it serves)")
MAX_LISTED = 10  # untracked files a dry run names
ADVICE = "check that your token may write there (HF_TOKEN, or `hf auth login`) and that you are online"


def space_variables(flags: Sequence[str]) -> dict[str, str]:
    """The ADAPTER_* variables under which `python app.py` runs as `python app.py FLAGS` would, checked as the app
    checks them; ValueError naming a flag the Space cannot follow (a path on this machine, its own address)."""
    parser = build_parser({})
    parser.prog = "python -m adapter.space OWNER/NAME [the app's flags]"  # its usage errors name this command
    given, defaults = vars(parser.parse_args(flags)), vars(parser.parse_args([]))
    variables = {}
    for key, value in given.items():
        if key.startswith("_") or value == defaults[key]:
            continue
        if key in SPACE_CHOOSES:
            raise ValueError(f"--{key.replace('_', '-')}: a Space serves on its own address and port, publicly")
        if key in SECRETS:  # a Space's variables are public
            raise ValueError(f"--{key.replace('_', '-')}: a Space's variables are public; set {env_name(key)} as a "
                             "secret of the Space instead (its Settings, or huggingface_hub's add_space_secret)")
        for item in value if isinstance(value, list) else [value] if key in NAMED else []:
            _check_fetchable(key, item)
        variables[env_name(key)] = ",".join(value) if isinstance(value, list) else "1" if value is True else str(value)
    device = variables.get(env_name("device"), "")
    checked = {k: v for k, v in variables.items() if not (k == env_name("device") and device.startswith("cuda"))}
    parse_config([], environ=checked)  # a GPU asked for is the Space's, not this machine's
    return variables


def _check_fetchable(key: str, value: str) -> None:
    """A value the Space can resolve itself: a name it fetches, an embedded model's name, an open_clip name."""
    if value in NAMED[key] or is_remote(value):
        return
    looks_like_path = os.sep in value or value.endswith((*CLIP_WEIGHT_SUFFIXES, ".json")) or Path(value).exists()
    if key in ("clip", "clip_model") and not looks_like_path:
        return  # an open_clip pretrained tag or model name, fetched by open_clip on the Space
    raise ValueError(f"--{key.replace('_', '-')}: {value} is a path on this machine, which a Space cannot read; name "
                     "what it fetches: hf:owner/name (python -m adapter.push puts an adapter there), official:NAME"
                     + (", an open_clip tag" if key.startswith("clip") else "") + " or the embedded model's name")


def space_files(root: Path = ROOT) -> list[str]:
    """The checkout's files a Space needs, as they are in the work tree: those git tracks (an untracked file, such
    as a .env, a run's folder or a merged base, is never sent; `untracked_files` says which stay behind), tests,
    benchmarks and CI aside."""
    return [name for name in _git_files(root, "--cached") if (root / name).is_file()]  # deleted, not yet committed


def untracked_files(root: Path = ROOT) -> list[str]:
    """The checkout's files that git neither tracks nor ignores, which a Space is not sent."""
    return _git_files(root, "--others", "--exclude-standard")


def _files_lines(root: Path) -> list[str]:
    """What a dry run says of the files: how many are sent, and the untracked ones left behind."""
    files, behind = space_files(root), untracked_files(root)
    size = sum((root / name).stat().st_size for name in files)
    lines = [f"{len(files)} files, {size / 2**20:.1f} MiB"]
    if behind:
        more = f" and {len(behind) - MAX_LISTED} more" if len(behind) > MAX_LISTED else ""
        lines.append(f"not sent (git does not track them): {', '.join(behind[:MAX_LISTED])}{more}")
    return lines


def _git_files(root: Path, *which: str) -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", *which], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise ValueError(f"space: {root} is not a git checkout (git ls-files: {error}); a Space gets the tracked "
                         "files of a clone of this project (an installed package has no app.py): run this command "
                         "from one") from error
    return [name for name in listed.decode().split("\0") if name and not name.startswith(LEFT_OUT)]


def deploy(space: str, flags: Sequence[str] = (), private: bool = False, hardware: str | None = None,
           with_token: bool = False, root: Path = ROOT, fit_check: bool = True, sleep_time: int | None = None) -> str:
    """Create (or update) Space `space` serving this app as `python app.py FLAGS`; its URL. `hardware`: a Space
    hardware name (t4-small, ...; default: the Space's own, a new one's the free CPU); `with_token`: the deploying
    token becomes the Space's HF_TOKEN secret, which gated bases (Llama 2, Llama 3) need. With `fit_check`, it
    first prints how that hardware holds the base and refuses (ValueError, nothing sent) where it cannot.
    `sleep_time`: seconds without a visitor after which paid hardware sleeps (and is not billed); -1: never."""
    space = repo_id(space, "space")
    variables, files = space_variables(flags), space_files(root)
    hub = hub_module("space", space)
    check_token(hub, space, what="space")
    check_hardware(hub, hardware)
    api = hub.HfApi()
    with hub_failures("space", f"could not read {space}'s hardware on the Hugging Face hub", ADVICE):
        serves_on = hardware or _current_hardware(hub, api, space)
    if serves_on.startswith(ZERO_GPU):
        raise ValueError(f"space: {space} runs on {serves_on}, {ZERO_GPU_WHY}; name a GPU of its own with "
                         "--hardware, e.g. t4-small")
    sleep_note = _sleep_time_note(sleep_time, serves_on, asked=hardware is not None)
    if fit_check:
        print("\n".join(_fit_lines(serves_on, variables, *_open_base(variables))))
    if sleep_note:
        print(sleep_note)
    with hub_failures("space", f"could not deploy to {space} on the Hugging Face hub", ADVICE):
        api.create_repo(space, repo_type="space", space_sdk="gradio", private=True if private else None,
                        exist_ok=True)
        _set_variables(api, space, variables)
        if with_token:
            api.add_space_secret(space, "HF_TOKEN", hub.get_token())
        if hardware:
            api.request_space_hardware(space, hardware, sleep_time=sleep_time)
        elif sleep_time is not None:
            api.set_space_sleep_time(space, sleep_time)
        api.upload_folder(repo_id=space, repo_type="space", folder_path=root, allow_patterns=files,
                          commit_message="Deploy the LLaMA-Adapter app (python -m adapter.space)")
    return f"https://huggingface.co/spaces/{space}"


def _set_variables(api, space: str, variables: Mapping[str, str]) -> None:
    """The Space's ADAPTER_* variables become exactly `variables` (its other variables are left as they are)."""
    for key in api.get_space_variables(space):
        if key.startswith("ADAPTER_") and key not in variables:
            api.delete_space_variable(space, key)
    for key, value in variables.items():
        api.add_space_variable(space, key, value)


def _sleep_time_note(sleep_time: int | None, hardware: str | None, asked: bool) -> str | None:
    """ValueError for a sleep time the hub would refuse; a note where paid hardware is asked for without one (it
    would be billed around the clock). `hardware` None: not known (a dry run's existing Space)."""
    if sleep_time is not None and not (sleep_time == -1 or sleep_time >= 1):
        raise ValueError(f"--sleep-time: give seconds without a visitor (at least 1) or -1 (never), got {sleep_time}")
    if sleep_time is not None and hardware == DEFAULT_HARDWARE:
        raise ValueError(f"--sleep-time: the free {DEFAULT_HARDWARE} sleeps after 48 hours without a visitor "
                         "whatever is asked; a sleep time needs paid hardware (--hardware)")
    if sleep_time is None and asked and hardware != DEFAULT_HARDWARE:
        return (f"note: {hardware} is billed while the Space runs, and paid hardware does not sleep unless asked: "
                "--sleep-time SECONDS puts it to sleep after that long without a visitor")
    return None


def check_hardware(hub, hardware: str | None) -> None:
    """ValueError where `hardware` is not one the hub offers Spaces (huggingface_hub's list: nothing is fetched), or
    is ZeroGPU, which this app cannot run on."""
    kinds = [kind.value for kind in hub.SpaceHardware]
    if hardware is not None and hardware not in kinds:
        raise ValueError(f"--hardware: {hardware!r} is not a Space hardware; choose from {', '.join(kinds)}")
    if hardware is not None and hardware.startswith(ZERO_GPU):
        raise ValueError(f"--hardware: {hardware} is {ZERO_GPU_WHY}; choose a GPU of the Space's own, e.g. t4-small")


def _current_hardware(hub, api, space: str) -> str:
    """The hardware an existing Space has asked for (a deploy without --hardware keeps it); a new one's: cpu-basic."""
    try:
        runtime = api.get_space_runtime(space)
    except hub.errors.RepositoryNotFoundError:
        return DEFAULT_HARDWARE
    return runtime.requested_hardware or runtime.hardware or DEFAULT_HARDWARE


def _open_base(variables: Mapping[str, str]):
    """(the base the Space will serve, opened without its weights, or the reason it cannot be read from here: a hub
    base that is not a repository of safetensors weights, a GGUF file say, would be downloaded whole to be read)."""
    from .loading import hub_base_without_weights, open_base_shape

    base = variables.get(env_name("base"), BASE_NAME)
    try:
        if not is_remote(base):
            return base, open_base_shape(base)  # the embedded model: the only local base a Space can serve
        return base, hub_base_without_weights(base) or ValueError(
            "only a repository of safetensors weights is read without downloading them; python -m adapter.inspect "
            f"{base} describes this one once downloaded")
    except (ValueError, OSError) as error:
        if is_remote(base) and (cause := error.__cause__) is not None:  # not hub's advice to pass a path: refused here
            return base, ValueError(f"could not read it from the hub here ({type(cause).__name__}: {cause})")
        return base, error


def _base_lines(base: str, checkpoint) -> list[str]:
    """The base the Space will serve, as inspect describes it (its memory per precision), read without its weights;
    a line saying why where it cannot be read from here."""
    from .inspect import describe_base

    if isinstance(checkpoint, Exception):
        return [f"{base}: not described from here ({checkpoint})"]
    return describe_base(base, checkpoint)


def _fit_lines(hardware: str, variables: Mapping[str, str], base: str, checkpoint) -> list[str]:
    """How `hardware` holds what the Space serves (adapter.space_fit); ValueError where it cannot."""
    if isinstance(checkpoint, Exception):
        return [f"hardware {hardware}: not checked, the base is not read from here ({checkpoint})"]
    return check_fit(variables, hardware, checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = argparse.ArgumentParser(prog="python -m adapter.space", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False,  # the app's flags pass through whole
                                     epilog="Every other flag is the app's (python app.py --help), e.g. --base "
                                            "hf:owner/llama-7b --quantize nf4 --adapter hf:owner/my-adapter")
    parser.add_argument("space", help="the Space to create or update, owner/name")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--hardware", help="the Space's hardware, e.g. t4-small (default: the Space's own; a new "
                                           "Space's is the free CPU, cpu-basic)")
    parser.add_argument("--sleep-time", type=int, metavar="SECONDS",
                        help="paid hardware sleeps (unbilled) after this long without a visitor, and wakes for the "
                             "next; -1: never (paid hardware's default)")
    parser.add_argument("--no-fit-check", action="store_true",
                        help="deploy even where the hardware's memory does not hold the base as asked")
    parser.add_argument("--with-token", action="store_true",
                        help="give the Space your token as its HF_TOKEN secret (a gated base needs one)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the variables and files the Space would get, and deploy nothing")
    options, flags = parser.parse_known_args(argv)
    try:
        if options.dry_run:
            check_hardware(hub_module("space", repo_id(options.space, "space")), options.hardware)
            variables = space_variables(flags)
            # without --hardware, a new Space's is assumed; an existing Space's own is read when deploying
            note = _sleep_time_note(options.sleep_time, options.hardware, asked=options.hardware is not None)
            base = _open_base(variables)
            print("\n".join([*(f"{key}={value}" for key, value in variables.items()), *_files_lines(ROOT),
                             *_base_lines(*base)]))
            if not options.no_fit_check:
                print("\n".join(_fit_lines(options.hardware or DEFAULT_HARDWARE, variables, *base)))
                if options.hardware is None:
                    print(f"(a new Space's {DEFAULT_HARDWARE}; a deploy checks an existing Space's own hardware)")
            if note:
                print(note)
        else:
            url = deploy(options.space, flags, options.private, options.hardware, options.with_token,
                         fit_check=not options.no_fit_check, sleep_time=options.sleep_time)
            print(f"deployed {url}")
    except (ValueError, OSError) as error:
        return refused(error, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
