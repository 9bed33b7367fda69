"""`strata serve [MODEL]`: the OpenAI-compatible HTTP server (FastAPI + uvicorn, one process).

Engine flags are generated from EngineConfig's fields, server flags from ServerConfig's, so help text lives
in one place. The model loads in the engine thread after the socket is open; /health says 503 until then.
SIGTERM: uvicorn stops accepting connections and waits up to --drain-timeout for running requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import threading
from dataclasses import dataclass

from strata.commands.engine_args import add_dataclass_args, add_engine_args, engine_config_from_args
from strata.config import knob
from strata.errors import ConfigError, StrataError
from strata.models.registry import load_config
from strata.replicas.live_migration import MigrationConfig


@dataclass
class ServerConfig:
    """The server's own knobs; `serve` gets their flags from the same generator as the engine's."""

    host: str = knob("127.0.0.1", "address to bind (the default is loopback only)")
    port: int = knob(8000, "TCP port", type=int)
    served_model_name: str | None = knob(None, "model id clients send (default: the model folder's name)")
    api_key: str | None = knob(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $STRATA_API_KEY if set)")
    max_queued_requests: int | None = knob(256, "bounded waiting queue: requests beyond it get 429 with Retry-After",
                                           type=int)
    request_timeout: float | None = knob(None, "abort a request after this many seconds (then 504 / an error "
                                               "event)", type=float)
    max_body_bytes: int = knob(2 * 2**20, "reject larger request bodies with 413", type=int)
    body_timeout: float = knob(30.0, "seconds a client may take to send its request body (then 408)", type=float)
    limit_concurrency: int = knob(1024, "most open connections and requests at once; more get 503 (uvicorn's "
                                        "limit)", type=int)
    allowed_origins: str | None = knob(None, "comma-separated origins allowed to call the API from a browser "
                                             "(CORS), or '*'; default none")
    drain_timeout: float = knob(30.0, "on SIGTERM, seconds to let running requests finish", type=float)
    chat_template: str | None = knob(None, "chat template file, or the Jinja template itself (replaces the "
                                           "tokenizer's)")
    log_level: str = knob("info", "uvicorn log level")
    stream_interval_ms: float = knob(5.0, "hand streamed outputs to the HTTP side at most once per this many "
                                          "milliseconds (a first token, the last one and errors go at once); the "
                                          "tokens of the steps in between go out as one chunk", type=float)
    engine_nice: int | None = knob(None, "nice value of the engine thread and the threads it starts (Linux, "
                                         "-20..19), not of the HTTP side: below the process's, the step keeps its "
                                         "core when the event loop, clients or other processes want the same cores "
                                         "(lowering it needs root or CAP_SYS_NICE)", type=int)
    tool_call_parser: str | None = knob(None, "how tool calls are read from the model's text: hermes, llama3_json, "
                                              "mistral (strata/server/tool_parsers.py)")
    enable_auto_tool_choice: bool = knob(False, "allow tool_choice 'auto' (needs --tool-call-parser)")
    data_parallel_size: int = knob(1, "engine replicas behind this server, each a Ray actor with its own model and "
                                      "KV cache; a router sends each request to the one with the most free KV "
                                      "blocks (needs ray: pip install 'strata[distributed]'); see "
                                      "docs/distributed.md", type=int)
    ray_address: str | None = knob(None, "Ray cluster for the replicas (default: start a local one)")
    pd_disaggregation: bool = knob(False, "with --data-parallel-size N: the first N/2 replicas only prefill and "
                                          "hand each request with its KV to a decode replica")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve a model over the OpenAI Chat Completions and Completions APIs.")
    p.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                   help="HF model folder or GGUF file (default: the bundled model); the same as --model")
    p.add_argument("--model", default=None, help="HF model folder or GGUF file (default: the bundled model)")
    add_dataclass_args(p, ServerConfig)
    add_dataclass_args(p, MigrationConfig)
    add_engine_args(p, skip=("model",))
    p.set_defaults(func=run)


def build_app(args: argparse.Namespace, on_load_failure=None):
    """The app for parsed `serve` arguments."""
    from strata.engine.admission import resolve_max_model_len
    from strata.engine.llm_engine import BUNDLED_MODEL, LLMEngine
    from strata.engine.spec.config import SpeculativeConfig
    from strata.server.app import create_app
    from strata.server.async_engine import AsyncEngine
    from strata.server.metrics import EngineMetrics
    from strata.server.request_checks import LOOPBACK_HOSTS

    tag = getattr(args, "model_tag", None)
    if tag and args.model and os.path.normpath(tag) != os.path.normpath(args.model):
        raise ConfigError(f"serve: the model is given twice ({tag!r} and --model {args.model!r}); give one")
    model = tag or args.model or BUNDLED_MODEL
    SpeculativeConfig.from_value(getattr(args, "speculative_config", None))  # a bad value fails before the port opens
    config = engine_config_from_args(args, model=model)  # nonsensical flags fail here, before the port is bound
    if os.path.isfile(os.path.join(model, "config.json")):  # refuse a bad --max-model-len before binding the port
        resolve_max_model_len(config, load_config(model), model)
    template = load_chat_template(args.chat_template) if getattr(args, "chat_template", None) else None
    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    api_key = args.api_key or os.environ.get("STRATA_API_KEY") or None
    metrics = EngineMetrics(name)

    def make_engine() -> LLMEngine:  # runs in the engine thread
        from strata.weights.file_guard import guard_model_files

        if nice is not None:
            set_thread_nice(nice)
        engine = LLMEngine(config, progress=False)
        guard_model_files(engine.model_path)  # a model file changed under the server: one line and exit 75
        engine.warm_up()  # small models: what a prompt builds on first use is built before the first request
        if template is not None:
            if engine.tokenizer is None:
                raise ConfigError(f"--chat-template: {model} has no tokenizer.json to apply it to")
            engine.tokenizer.chat_template = template
        # the model, tokenizer and modules live as long as this process: out of the collector's generations, the
        # collections that each step's outputs trigger no longer walk them (vLLM's server does the same)
        gc.collect()
        gc.freeze()
        return engine

    nice = getattr(args, "engine_nice", None)
    if nice is not None and not -20 <= nice <= 19:
        raise ConfigError(f"--engine-nice must be an integer in -20..19, got {nice}")
    stream_interval_ms = getattr(args, "stream_interval_ms", 0.0)
    if not stream_interval_ms >= 0:  # also NaN
        raise ConfigError(f"--stream-interval-ms must be a number >= 0, got {stream_interval_ms!r}")
    dp = getattr(args, "data_parallel_size", 1)
    if not isinstance(dp, int) or dp < 1:
        raise ConfigError(f"--data-parallel-size must be an integer >= 1, got {dp!r}")
    if getattr(args, "enable_migration", False) and dp < 2:
        raise ConfigError("--enable-migration moves requests between replicas: it needs --data-parallel-size >= 2")
    if dp > 1 and nice is not None:
        raise ConfigError("--engine-nice sets this process's engine thread; with --data-parallel-size the engines "
                          "run in Ray actors (set their priority there)")
    if dp > 1:
        from strata.replicas.router import ReplicaRouter

        migration = MigrationConfig(**{f.name: getattr(args, f.name, f.default)
                                       for f in dataclasses.fields(MigrationConfig)})
        engine = ReplicaRouter(config, dp, args.ray_address, metrics, request_timeout=args.request_timeout,
                               chat_template=template, on_load_failure=on_load_failure,
                               pd_disaggregation=args.pd_disaggregation, migration=migration,
                               stream_interval_ms=stream_interval_ms)
    else:
        engine = AsyncEngine(make_engine, metrics, max_queued_requests=args.max_queued_requests,
                             request_timeout=args.request_timeout, on_load_failure=on_load_failure,
                             stream_interval_ms=stream_interval_ms)
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()]
    # a server on loopback answers only loopback Host names (a DNS-rebinding page would use its own)
    hosts = LOOPBACK_HOSTS if args.host.strip("[]") in LOOPBACK_HOSTS else None
    return create_app(engine, name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                      drain_timeout=args.drain_timeout, allowed_origins=origins,
                      tool_call_parser=args.tool_call_parser,
                      enable_auto_tool_choice=args.enable_auto_tool_choice, allowed_hosts=hosts,
                      body_timeout=args.body_timeout)


def set_thread_nice(nice: int) -> None:
    """The calling thread's nice value (Linux schedules threads as tasks of their own; elsewhere refused)."""
    if not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):
        raise ConfigError("--engine-nice: per-thread priorities need Linux")
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except PermissionError:
        raise ConfigError(f"--engine-nice {nice}: not permitted to raise a thread's priority (needs root or "
                          "CAP_SYS_NICE; a value at or above the process's nice needs neither)") from None


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
