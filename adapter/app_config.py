"""Flags and environment variables of `python app.py`, checked before any model is loaded.

Every flag has an environment variable (`--clip-model` -> `ADAPTER_CLIP_MODEL`), which is how a Hugging Face
Space is configured; a flag wins over its variable. A missing file or a combination that cannot work stops
with one line naming the flag, before minutes are spent loading a model. Several adapters may be served on
one frozen base (`--adapter A B`, `ADAPTER_ADAPTER=A,B`): the base is loaded once and shared.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from . import hub
from .device_work import DeviceWork, device_lock, start_compute_thread
from .engine import Engine, Engines, Settings, check_text
from .formats import BASE_HELP
from .kv_cache import check_kv_cache
from .live_training import MAX_STEPS
from .loading import load_many, resolve_device, resolve_dtype
from .model import Transformer
from .paths import missing, not_a_file
from .prompts import PROMPT_FORMATS, chat_formats
from .quantize import check_mode
from .tiny.assets import ASSETS as TINY_FOLDER
from .tiny.assets import BASE_NAME, CLIP_NAME, IMAGE_NAME, TEXT_NAME

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
MAX_CONCURRENCY = 64
QUEUE_PER_WORKER = 16  # waiting requests per concurrent slot before "queue is full"
MAX_SESSIONS = 1000  # gradio keeps a copy of every component's config per session (about 0.3 MB for this app)
MAX_NEW_TOKENS = 4096
MIN_API_KEY = 16  # characters: a key short enough to guess guards nothing
MIN_PASSWORD = 8  # --auth's
NO_ADAPTER = "none"  # the name the bare base is served under when no adapter is


@dataclass(frozen=True)
class ServeConfig:
    """What to load and how to serve it."""

    base: str = BASE_NAME  # the embedded tiny model (assets/tiny/), with both its adapters unless --adapter
    adapter: tuple[str, ...] = ()  # served side by side on the one base; the first is the default choice
    clip: str | None = None
    clip_model: str | None = None
    quantize: str = "none"
    clip_quantize: str = "none"  # the CLIP tower's linears through bitsandbytes too (adapter.quantize)
    device: str | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    max_new_tokens: int = 256
    concurrency: int = 1
    max_sessions: int = MAX_SESSIONS  # sessions (pages, API clients) whose state is kept; the oldest go first
    compile: bool = False  # decode through torch.compile (Transformer.step): faster steps, a slow first answer
    kv_cache: str = "auto"  # "int8": keys/values in int8, half the cache's memory (adapter.kv_cache)
    prompt_format: str = "auto"  # how questions are written (adapter.prompts); auto: each adapter's (or base's) own
    system: str = ""  # the system prompt box's starting text (chat formats only)
    gate_scale: float = 1.0  # the gate slider's starting value, and an API request's that sets none
    delta_scale: float = 1.0
    openai_api: bool = False  # also serve the adapters as an OpenAI-compatible API at /v1 (adapter.openai_api)
    api_key: str | None = None  # the OpenAI-compatible API answers only requests presenting it
    auth: str | None = None  # USER:PASSWORD: the page (and gradio's API) asks for it before anything else
    no_train_tab: bool = False  # hide the Train tab (adapters trained on the served base: adapter.live_training)
    no_upload: bool = False  # no uploaded adapters in the Model tab (adapter.adapter_upload)
    private_adapters: bool = False  # adapters trained or uploaded in the app served to their own session alone
    no_push: bool = False  # no pushing served adapters to the hub from the Model tab (adapter.push)
    train_max_steps: int = MAX_STEPS  # optimizer steps one Train-tab run may take (what a run costs a Space)

    @property
    def login(self) -> tuple[str, str] | None:
        """`auth` as gradio's (user, password), or None."""
        if self.auth is None:
            return None
        user, _, password = self.auth.partition(":")
        return user, password


def env_name(flag: str) -> str:
    """`clip_model` -> `ADAPTER_CLIP_MODEL`."""
    return "ADAPTER_" + flag.upper()


@dataclass(frozen=True)
class _Refused:
    """An environment variable's value that does not read as its flag's: refused (ValueError `reason`) once the
    command line is parsed, only where the flag itself was not given (a flag wins over its variable; --help works)."""

    reason: str


def _switch(environ: Mapping[str, str], name: str) -> bool | _Refused:
    """An on/off variable: 1/true/yes/on, or 0/false/no/off (empty: off); anything else is refused, not read as
    off (ADAPTER_PRIVATE_ADAPTERS=y served each page's adapters to everyone)."""
    variable = env_name(name)
    value = (environ.get(variable) or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return _Refused(f"{variable}: {environ[variable]!r} is not one of 1/true/yes/on (on) or 0/false/no/off (off)")


class Command(NamedTuple):
    """A program that reads the app's flags: its usage line's name and what it is."""

    prog: str
    description: str


APP = Command("python app.py", "The LLaMA-Adapter Gradio app.")


def parsed_flags(argv: Sequence[str] | None, environ: Mapping[str, str], command: Command = APP) -> dict[str, Any]:
    """The flags over their environment variables, as parsed; a variable that cannot be read refused where its
    flag was not given."""
    args = vars(build_parser(environ, command).parse_args(argv))
    refused = next((value for value in args.values() if isinstance(value, _Refused)), None)
    if refused is not None:
        raise ValueError(refused.reason)
    args.pop("_adapter_flag_seen", None)
    return args


class _Adapters(argparse.Action):
    """`--adapter A B` and `--adapter A --adapter B` both serve A and B; given on the command line, the flag
    replaces the environment's list instead of adding to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = getattr(namespace, "_adapter_flag_seen", False)
        setattr(namespace, self.dest, (list(getattr(namespace, self.dest)) if given else []) + list(values))
        namespace._adapter_flag_seen = True


def build_parser(environ: Mapping[str, str], command: Command = APP) -> argparse.ArgumentParser:
    """The flags, each defaulting to its environment variable (then to ServeConfig's default); `command` names
    the program they are read for (its usage line and description)."""
    defaults = ServeConfig()

    def default(name: str, fallback: object = None, kind: type | None = None) -> object:
        """The variable's value (converted to `kind`, refused naming the variable), else `fallback`."""
        value = environ.get(env_name(name))
        if value in (None, ""):
            return fallback
        if kind is None:
            return value
        try:
            return kind(value)
        except ValueError:
            return _Refused(f"{env_name(name)}: {value!r} is not {'a whole number' if kind is int else 'a number'}")

    parser = argparse.ArgumentParser(prog=command.prog, description=f"{command.description} Every flag can also "
                                     "be set by its environment variable ADAPTER_<FLAG>.")
    parser.add_argument("--base", default=default("base", defaults.base),
                        help=f"{BASE_HELP}; default {BASE_NAME}")
    parser.add_argument("--adapter", nargs="+", action=_Adapters, metavar="ADAPTER",
                        default=[a.strip() for a in (default("adapter") or "").split(",") if a.strip()],
                        help=f"adapter file or folder (any format), or the embedded '{TEXT_NAME}' / '{IMAGE_NAME}'; "
                             "several (--adapter A B, or ADAPTER_ADAPTER=A,B) share one base and the app offers "
                             f"a choice (default with base '{BASE_NAME}': both embedded adapters)")
    parser.add_argument("--clip", default=default("clip"),
                        help="CLIP weights for an adapter with a visual prompt: a local file, an open_clip tag "
                             f"(downloads), or the embedded '{CLIP_NAME}'")
    parser.add_argument("--clip-model", default=default("clip_model"),
                        help="open_clip model name or config .json (default: the adapter's)")
    parser.add_argument("--quantize", default=default("quantize", defaults.quantize),
                        help="none, nf4 or int8 (the frozen base through bitsandbytes)")
    parser.add_argument("--clip-quantize", default=default("clip_quantize", defaults.clip_quantize),
                        help="none, nf4 or int8: the CLIP tower's linears too (less memory, slightly different "
                             "image features)")
    parser.add_argument("--device", default=default("device"), help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=default("dtype"), help="float32, bfloat16 or float16")
    parser.add_argument("--host", default=default("host", environ.get("GRADIO_SERVER_NAME") or defaults.host),
                        help="address to listen on (default: GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 = all)")
    parser.add_argument("--port", type=int,
                        default=default("port", environ.get("GRADIO_SERVER_PORT") or defaults.port, int),
                        help="port (default: GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true", default=_switch(environ, "share"),
                        help="also serve through a public gradio.live link")
    parser.add_argument("--openai-api", action="store_true", default=_switch(environ, "openai_api"),
                        help="also serve the adapters as an OpenAI-compatible API at /v1 on the same port "
                             "(adapter.openai_api)")
    parser.add_argument("--api-key", default=default("api_key"),
                        help="the OpenAI-compatible API answers only requests presenting this key (Authorization: "
                             "Bearer KEY, as OpenAI's clients send their api_key; a page's own key too); prefer "
                             "ADAPTER_API_KEY, which the process list does not show")
    parser.add_argument("--auth", default=default("auth"), metavar="USER:PASSWORD",
                        help="the page, and gradio's API (gradio_client's auth=), ask for this user and password "
                             "first; prefer ADAPTER_AUTH, which the process list does not show (the OpenAI-compatible "
                             "API has --api-key)")
    parser.add_argument("--no-train-tab", action="store_true", default=_switch(environ, "no_train_tab"),
                        help="leave out the Train tab, where users train adapters on the served base (one run at a "
                             "time, each step between other users' answers)")
    parser.add_argument("--train-max-steps", type=int,
                        default=default("train_max_steps", defaults.train_max_steps, int),
                        help=f"the most optimizer steps one run of the Train tab may take (default {MAX_STEPS}); a "
                             "run that would take more is refused before it starts")
    parser.add_argument("--no-upload", action="store_true", default=_switch(environ, "no_upload"),
                        help="leave out the Model tab's upload, where users serve adapters of their own to everyone "
                             "(uploaded, or named for the server to fetch from the hub or the official releases)")
    parser.add_argument("--no-push", action="store_true", default=_switch(environ, "no_push"),
                        help="leave out the Model tab's push, where users push a served adapter to a Hugging Face hub "
                             "repository of theirs with their own token")
    parser.add_argument("--private-adapters", action="store_true",
                        default=_switch(environ, "private_adapters"),
                        help="serve an adapter trained or uploaded in the app to the page (or API client) that "
                             "added it alone, until that page is closed, instead of to every user (public Spaces)")
    parser.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens", defaults.max_new_tokens, int),
                        help="the most tokens one answer may have (the slider's maximum)")
    parser.add_argument("--concurrency", type=int, default=default("concurrency", defaults.concurrency, int),
                        help="requests in flight at once (default 1); chats and image questions waiting for the "
                             "device are decoded together, up to this many rows in one batch; other work is one at a "
                             "time per device")
    parser.add_argument("--max-sessions", type=int, default=default("max_sessions", defaults.max_sessions, int),
                        help=f"the most sessions (pages, API clients) whose state is kept in memory, about 0.3 MB "
                             f"each, the least recently active forgotten first (default {MAX_SESSIONS}; gradio's "
                             "own default, 10000, would hold about 3 GB)")
    parser.add_argument("--compile", action="store_true", default=_switch(environ, "compile"),
                        help="decode through torch.compile: faster steps (on a CPU, about 2x for a 512-dim fp32 model: "
                             "BENCHMARKS.md), but the first answer waits for the compilation (tens of seconds; "
                             "a CPU needs a C++ compiler)")
    parser.add_argument("--kv-cache", default=default("kv_cache", defaults.kv_cache),
                        help="auto (the model's dtype) or int8 (half the KV cache's memory, for long contexts on "
                             "small GPUs)")
    parser.add_argument("--prompt-format", default=default("prompt_format", defaults.prompt_format),
                        help=f"how questions are written: auto (each adapter's own: what it was trained with, "
                             f"alpaca unless recorded otherwise; without an adapter, the base's chat template's "
                             f"format, else alpaca) or {' / '.join(PROMPT_FORMATS)} for all")
    parser.add_argument("--system", default=default("system", defaults.system),
                        help="the system prompt each request starts with (users may change it under Advanced); "
                             f"only adapters asked in a chat format ({', '.join(chat_formats())}) take one")
    parser.add_argument("--gate-scale", type=float, default=default("gate_scale", defaults.gate_scale, float),
                        help="the gate slider's starting value, and the gate scale of API requests that set none "
                             "(0: the frozen base), so a client that cannot set it (lm-evaluation-harness) scores "
                             "any gate")
    parser.add_argument("--delta-scale", type=float, default=default("delta_scale", defaults.delta_scale, float),
                        help="the same for the delta scale of the v2 parts (biases, scales, LoRA, norms)")
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                 command: Command = APP) -> ServeConfig:
    """Flags over environment variables, checked (ValueError / FileNotFoundError naming the flag)."""
    args = parsed_flags(argv, os.environ if environ is None else environ, command)
    config = ServeConfig(**{**args, "adapter": tuple(args["adapter"])})
    check_config(config)
    if command == APP and config.api_key is not None and not config.openai_api:
        raise ValueError("--api-key: it guards the OpenAI-compatible API, which --openai-api serves (or python -m "
                         "adapter.openai_api); the page itself is open to whoever reaches it")
    return config


def check_listening(host: str, port: int, ipv6: bool = True) -> None:
    """That a server can listen at `host`:`port`, asked before the model loads: gradio says "Cannot find empty
    port" for a host that does not resolve or is not this machine's as well as for a port in use, uvicorn says
    it after loading. `ipv6=False` for gradio, which writes http://HOST:PORT unbracketed: an IPv6 address failed
    deep inside httpx."""
    if not ipv6 and ":" in host:
        raise ValueError(f"--host: {host!r}: the app listens on an IPv4 address or a name (0.0.0.0: every address)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"--host: cannot listen on {host!r} ({getattr(error, 'strerror', None) or error})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed port is free
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(f"--port: {port} is in use on {host}; choose another") from None
            raise ValueError(f"--host: cannot listen on {host!r} ({error.strerror})") from None


def check_config(config: ServeConfig) -> None:
    """Everything that can be known to fail before loading: files, combinations, ranges."""
    _check_base(config.base)
    for adapter in config.adapter:
        _check_file("adapter", adapter, TEXT_NAME, IMAGE_NAME)
        if config.adapter.count(adapter) > 1:
            raise ValueError(f"--adapter: {adapter} is given twice")
    if config.clip is not None:
        if not config.adapter:
            raise ValueError("--clip: needs an --adapter with a visual prompt (the CLIP tower feeds it)")
        is_path = os.sep in config.clip or config.clip.endswith(CLIP_WEIGHT_SUFFIXES)
        if is_path or _tiny_name(config.clip, CLIP_NAME):
            _check_file("clip", config.clip, CLIP_NAME)
    if config.clip_model is not None:
        if config.clip is None:
            raise ValueError("--clip-model: only used together with --clip")
        if config.clip_model.endswith(".json") and not Path(config.clip_model).is_file():
            raise FileNotFoundError(f"--clip-model: {not_a_file(config.clip_model)}")
    _flag("quantize", check_mode, config.quantize)
    _flag("clip_quantize", lambda mode: check_mode(mode, "clip_quantize"), config.clip_quantize)
    _flag("kv_cache", check_kv_cache, config.kv_cache)
    if config.system.strip():
        _flag("system", lambda text: check_text(text, "system"), config.system)
    _flag("gate_scale", lambda scale: Settings(gate_scale=scale), config.gate_scale)
    _flag("delta_scale", lambda scale: Settings(delta_scale=scale), config.delta_scale)
    if config.prompt_format not in ("auto", *PROMPT_FORMATS):
        raise ValueError(f"--prompt-format: must be one of {('auto', *PROMPT_FORMATS)}, got {config.prompt_format!r}")
    device = _flag("device", resolve_device, config.device)
    _flag("dtype", lambda dtype: resolve_dtype(dtype, device), config.dtype)
    if not 1 <= config.port <= 65535:
        raise ValueError(f"--port: must be between 1 and 65535, got {config.port}")
    if not 1 <= config.max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--max-new-tokens: must be between 1 and {MAX_NEW_TOKENS}, got {config.max_new_tokens}")
    if config.train_max_steps < 1:
        raise ValueError(f"--train-max-steps: must be at least 1, got {config.train_max_steps}")
    if not 1 <= config.concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"--concurrency: must be between 1 and {MAX_CONCURRENCY}, got {config.concurrency}")
    if config.max_sessions < QUEUE_PER_WORKER * config.concurrency:
        raise ValueError(f"--max-sessions: must be at least {QUEUE_PER_WORKER * config.concurrency}, the requests "
                         f"the queue holds ({QUEUE_PER_WORKER} per --concurrency slot), got {config.max_sessions}")
    key = config.api_key
    if key is not None and (len(key) < MIN_API_KEY or key != key.strip() or any(c.isspace() for c in key)):
        raise ValueError(f"--api-key: give a key of at least {MIN_API_KEY} characters, without spaces "
                         "(e.g. python -c \"import secrets; print(secrets.token_urlsafe(24))\")")
    if config.login is not None:
        user, password = config.login
        if not user.strip() or len(password) < MIN_PASSWORD:
            raise ValueError(f"--auth: give USER:PASSWORD, a user name and a password of at least {MIN_PASSWORD} "
                             "characters")
    if config.private_adapters and config.no_train_tab and config.no_upload:
        raise ValueError("--private-adapters: nothing to keep private; --no-train-tab and --no-upload leave out "
                         "both ways of adding adapters")


def tiny_available() -> bool:
    return TINY_FOLDER.is_dir()


def serves_tiny(config: ServeConfig) -> bool:
    """Whether the base is the embedded tiny model (then its shipped examples fit what it was trained on)."""
    return _tiny_name(config.base, BASE_NAME)


def _tiny_name(value: str, *names: str) -> bool:
    """A short name of the embedded model (a local file or folder of that name wins, as in adapter.load)."""
    return value in names and not Path(value).exists()


def _require_tiny(flag: str) -> None:
    if not tiny_available():
        raise FileNotFoundError(f"--{flag}: the embedded tiny model is not built yet ({TINY_FOLDER} is missing: "
                                f"`python -m adapter.tiny build`); pass --{flag} PATH or set {env_name(flag)}")


def _check_base(base: str) -> None:
    if _tiny_name(base, BASE_NAME):
        _require_tiny("base")
    elif not _is_hub(base):
        path = Path(base)
        if not path.exists():
            raise FileNotFoundError(f"--base: {missing(base)}")
        if not path.is_dir():
            raise ValueError(f"--base: {base} is not a folder (a base is a folder with params.json or config.json)")


def _check_file(flag: str, value: str, *tiny_names: str) -> None:
    if _tiny_name(value, *tiny_names):
        _require_tiny(flag)
    elif not _is_hub(value) and not Path(value).exists():
        raise FileNotFoundError(f"--{flag}: {missing(value)}")


def _is_hub(value: str) -> bool:
    return hub.is_remote(value)


def _flag(name: str, check, value):
    """Run a library check, renaming its error to the flag."""
    try:
        return check(value)
    except ValueError as error:
        message = str(error).split(": ", 1)[-1]
        raise ValueError(f"--{name.replace('_', '-')}: {message}") from None


def served_adapters(config: ServeConfig) -> list[tuple[str, str | None]]:
    """(name offered, adapter to load) for each adapter the app serves: the flag's, else both embedded ones on
    the tiny base, else the bare base alone (offered as `NO_ADAPTER`)."""
    if config.adapter:
        return [(name, name) for name in config.adapter]
    return [(TEXT_NAME, TEXT_NAME), (IMAGE_NAME, IMAGE_NAME)] if serves_tiny(config) else [(NO_ADAPTER, None)]


def engine_for(model: Transformer, lock: threading.Lock, config: ServeConfig) -> Engine:
    """`model` served as the flags say (answer length, compiled decode, prompt format, batched chats, the KV
    cache a decode may hold: what the Space fit check counts, so that a gate sweep's 9 rows of a long question
    decode in turns rather than outgrow it); every model on one device shares its `lock`."""
    from .space_fit import served_cache_tokens

    written = None if config.prompt_format == "auto" else config.prompt_format
    return Engine(model, lock, max_new_tokens=config.max_new_tokens, compile=config.compile, prompt_format=written,
                  batch_chats=config.concurrency,
                  max_cached_tokens=served_cache_tokens(config.concurrency, model.args.max_seq_len))


def load_engines(config: ServeConfig) -> Engines:
    """Load the base once and every adapter `config` names on it (`adapter.loading.load_many`: the base's tensors
    shared, and one CLIP tower between image adapters), each wrapped in an Engine holding the device's one lock.

    The device gets its compute thread first (adapter.device_work), which loads the models and then does all their
    work, so that torch runs at full speed whichever of the server's threads asks.

    The Model tab shows the real files behind the embedded model's short names, and the training gate plot is
    looked for next to the real adapter."""
    served = served_adapters(config)
    device = resolve_device(config.device)
    start_compute_thread(device)
    models = DeviceWork(device).run(load_many, config.base, [adapter for _, adapter in served], clip=config.clip,
                                    clip_model=config.clip_model, clip_quantize=config.clip_quantize,
                                    quantize=config.quantize, device=device, dtype=config.dtype,
                                    kv_cache=config.kv_cache)
    lock = device_lock(models[0].tok_embeddings.weight.device)
    try:
        engines = Engines({name: engine_for(model, lock, config) for (name, _), model in zip(served, models)},
                          Settings(gate_scale=config.gate_scale, delta_scale=config.delta_scale))
    except ValueError as error:  # a format the tokenizer cannot write
        if config.prompt_format == "auto":
            raise
        raise ValueError(f"--prompt-format: {error}") from None
    if config.system.strip():
        for name, engine in engines.by_name.items():
            try:
                engine.prompts.check_system(config.system)
            except ValueError as error:
                raise ValueError(f"--system: adapter {name}: {str(error).split(': ', 1)[-1]}") from None
    return engines
