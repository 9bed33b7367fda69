"""`strata serve [MODEL]`: the OpenAI-compatible HTTP server (FastAPI + uvicorn, one process).

Engine flags are generated from EngineConfig's fields, server flags from ServerConfig's, so help text lives
in one place. The model loads in the engine thread after the socket is open; /health says 503 until then.
SIGTERM: uvicorn stops accepting connections and waits up to --drain-timeout for running requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass

from strata.config import EngineConfig, ModelConfig
from strata.errors import ConfigError, StrataError

ENGINE_HELP = {
    "tokenizer": "folder with tokenizer.json and tokenizer_config.json (default: the model folder)",
    "seed": "seed for the sampling of requests without a seed of their own",
    "dtype": "weights/activations dtype: auto, float32, bfloat16, float16",
    "max_model_len": "context length (default: the model's, capped at 4096)",
    "max_num_seqs": "sequences decoded together",
    "max_num_batched_tokens": "token budget of one engine step (longer prompts are prefilled in chunks)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "bytes for the KV cache",
    "enable_prefix_caching": "share KV blocks of identical prompt prefixes",
    "num_threads": "torch CPU threads",
    "memory_budget": "bytes for weights; tiered experts engage when the model exceeds it",
    "check_weights": "refuse weights holding NaN or inf at load (--no-check-weights skips the pass)",
    "speculative_config": 'speculative decoding as JSON (vLLM keys), e.g. \'{"method": "ngram", '
                          '"num_speculative_tokens": 4}\'; see docs/speculative.md',
}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    served_model_name: str | None = None  # default: the model folder's name
    api_key: str | None = None  # Bearer key required on /v1/* (also read from STRATA_API_KEY)
    max_queued_requests: int | None = 256  # waiting requests beyond this get 429
    request_timeout: float | None = None  # seconds; a request running longer is aborted (504 / error event)
    max_body_bytes: int = 2 * 2**20  # larger request bodies get 413
    body_timeout: float = 30.0  # seconds to receive a request body (a stalled upload gets 408)
    limit_concurrency: int = 1024  # open connections beyond this get 503 (uvicorn's limit)
    allowed_origins: str | None = None  # comma-separated CORS origins; None = no CORS headers (browsers refuse)
    drain_timeout: float = 30.0  # seconds SIGTERM waits for running requests
    chat_template: str | None = None  # a template file, or the template itself (replaces the tokenizer's)
    log_level: str = "info"
    tool_call_parser: str | None = None  # hermes, llama3_json, mistral (strata/server/tool_parsers.py)
    enable_auto_tool_choice: bool = False  # tool_choice "auto": parse tool calls out of free model output


SERVER_HELP = {
    "host": "address to bind (default loopback only)",
    "port": "TCP port",
    "served_model_name": "model id clients send (default: the model folder's name)",
    "api_key": "require 'Authorization: Bearer KEY' on /v1/* (default: $STRATA_API_KEY if set)",
    "max_queued_requests": "bounded waiting queue: requests beyond it get 429 with Retry-After",
    "request_timeout": "abort a request after this many seconds",
    "max_body_bytes": "reject larger request bodies with 413",
    "body_timeout": "seconds a client may take to send its request body (then 408)",
    "limit_concurrency": "most open connections and requests at once; more get 503",
    "allowed_origins": "comma-separated origins allowed to call the API from a browser (CORS), or '*'; "
                       "default none",
    "drain_timeout": "on SIGTERM, seconds to let running requests finish",
    "chat_template": "chat template file, or the Jinja template itself (replaces the tokenizer's)",
    "log_level": "uvicorn log level",
    "tool_call_parser": "how tool calls are read from the model's text: hermes, llama3_json, mistral",
    "enable_auto_tool_choice": "allow tool_choice 'auto' (needs --tool-call-parser)",
}


def _flag_type(field: dataclasses.Field):
    t = str(field.type)
    if "bool" in t:
        return None
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def _add_dataclass_flags(p: argparse.ArgumentParser, cls, helps: dict, skip=()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in helps:
            continue
        flag = "--" + f.name.replace("_", "-")
        if _flag_type(f) is None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            p.add_argument(flag, type=_flag_type(f), default=f.default, help=f"{helps[f.name]} (default {f.default})")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve a model over the OpenAI Chat Completions and Completions APIs.")
    p.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                   help="HF model folder or GGUF file (default: the bundled model); the same as --model")
    p.add_argument("--model", default=None, help="HF model folder or GGUF file (default: the bundled model)")
    _add_dataclass_flags(p, ServerConfig, SERVER_HELP)
    _add_dataclass_flags(p, EngineConfig, ENGINE_HELP, skip=("model",))
    p.set_defaults(func=run)


def build_app(args: argparse.Namespace, on_load_failure=None):
    """The app for parsed `serve` arguments."""
    from strata.engine.llm_engine import BUNDLED_MODEL, LLMEngine, resolve_max_model_len
    from strata.engine.spec.config import SpeculativeConfig
    from strata.server.app import create_app
    from strata.server.async_engine import AsyncEngine
    from strata.server.metrics import EngineMetrics
    from strata.server.request_checks import LOOPBACK_HOSTS

    engine_kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
                 if f.name in ENGINE_HELP and hasattr(args, f.name)}
    tag = getattr(args, "model_tag", None)
    if tag and args.model and os.path.normpath(tag) != os.path.normpath(args.model):
        raise ConfigError(f"serve: the model is given twice ({tag!r} and --model {args.model!r}); give one")
    model = tag or args.model or BUNDLED_MODEL
    SpeculativeConfig.from_value(engine_kw.get("speculative_config"))  # a bad value fails before the port opens
    config = EngineConfig(model=model, **engine_kw)  # nonsensical flags fail here, before the port is bound
    if os.path.isfile(os.path.join(model, "config.json")):  # refuse a bad --max-model-len before binding the port
        resolve_max_model_len(config, ModelConfig.from_pretrained(model), model)
    template = load_chat_template(args.chat_template) if getattr(args, "chat_template", None) else None
    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    api_key = args.api_key or os.environ.get("STRATA_API_KEY") or None
    metrics = EngineMetrics(name)

    def make_engine() -> LLMEngine:
        engine = LLMEngine(config, progress=False)
        if template is not None:
            if engine.tokenizer is None:
                raise ConfigError(f"--chat-template: {model} has no tokenizer.json to apply it to")
            engine.tokenizer.chat_template = template
        return engine

    engine = AsyncEngine(make_engine, metrics, max_queued_requests=args.max_queued_requests,
                         request_timeout=args.request_timeout, on_load_failure=on_load_failure)
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()]
    # a server on loopback answers only loopback Host names (a DNS-rebinding page would use its own)
    hosts = LOOPBACK_HOSTS if args.host.strip("[]") in LOOPBACK_HOSTS else None
    return create_app(engine, name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                      drain_timeout=args.drain_timeout, allowed_origins=origins,
                      tool_call_parser=args.tool_call_parser,
                      enable_auto_tool_choice=args.enable_auto_tool_choice, allowed_hosts=hosts,
                      body_timeout=args.body_timeout)


_JINJA_MARKERS = ("{{", "{%", "\n")


def load_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the value itself when it holds Jinja; checked to compile."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif any(m in value for m in _JINJA_MARKERS):
        text = value
    else:
        raise ConfigError(f"--chat-template: no file {value!r}, and the value holds no Jinja ({{{{ or {{%)")
    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return text


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(message: str) -> None:  # a server that can never answer should not keep the port
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = build_app(args, on_load_failure)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout, timeout_keep_alive=5,
                                           limit_concurrency=args.limit_concurrency))
    server.run()
    if failed:
        raise ModelLoadError(failed[0])
    return 0


class ModelLoadError(StrataError):
    """The model could not be loaded by the server's engine thread."""
