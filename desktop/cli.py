"""The ``hediff`` command: serve, token, generate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hediff.common.errors import EXIT_ATTESTATION, EXIT_CANCELLED, EXIT_USAGE, HEDiffusionError, UsageError


def default_torch_threads() -> int:
    """Every core but one for the model: the server's HTTP side keeps a core of its own."""
    return max(1, (os.cpu_count() or 1) - 1)


def _serve_on_ray(args, tokens_path: Path, limits, tls, torch_threads: int) -> int:
    """`hediff serve --ray` / `--ray-config`: the same limits and tokens, on three Ray Serve deployments."""
    for flag, value in (
        ("--session-replicas", args.session_replicas),
        ("--session-workers", args.session_workers),
        ("--unet-replicas", args.unet_replicas),
        ("--max-batch-size", args.max_batch_size),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.batch_wait_ms < 0 or (args.unet_gpus is not None and args.unet_gpus < 0):
        raise UsageError("--batch-wait-ms and --unet-gpus cannot be negative")
    try:
        from hediff.backend.ray_serve import RayServeConfig, serve_config_file, start_ray_backend
    except ImportError as e:
        raise UsageError(
            f"--ray needs Ray Serve and the Redis client ({e.name} is missing): pip install 'he-diffusion[ray]'"
        ) from None
    from hediff.common.models import resolve_model

    if args.ray_config is None:
        _check_redis(args.redis)  # before the model resolves (a hub id may download): fail in a second
    unet_gpus = args.unet_gpus if args.unet_gpus is not None else (1.0 if args.device == "cuda" else 0.0)
    config = RayServeConfig(
        model_path=str(resolve_model(args.model)),
        model_id=args.model,
        lora=tuple(args.lora),
        tokens_path=str(Path(tokens_path).resolve()),
        redis_url=args.redis,
        limits=limits,
        session_replicas=args.session_replicas,
        session_workers=args.session_workers,
        unet_replicas=args.unet_replicas,
        unet_gpus=unet_gpus,
        device=args.device,
        dtype=args.dtype,
        torch_threads=torch_threads,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
    )
    if args.ray_config is not None:
        # JSON is YAML: `serve deploy` reads it as it is
        args.ray_config.write_text(json.dumps(serve_config_file(config, args.host, args.port, tls), indent=2) + "\n")
        print(f"wrote {args.ray_config}; deploy it with: serve deploy {args.ray_config}", file=sys.stderr)
        return 0
    address = None if args.ray == "local" else args.ray
    print(
        f"hediff backend on Ray Serve: model {args.model}, {args.session_replicas} session and {args.unet_replicas} "
        f"UNet replica(s), batches of up to {args.max_batch_size}; starting (this takes a while) ...",
        file=sys.stderr,
    )
    running = start_ray_backend(config, address=address, host=args.host, port=args.port, tls=tls)
    print(f"hediff backend: serving at {running.url} (Ctrl-C stops it)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("hediff backend: stopping the Ray Serve deployments", file=sys.stderr)
    finally:
        running.stop()
    return 0


def _check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except (redis.RedisError, ValueError) as e:
        raise UsageError(
            f"--redis {url} does not answer ({type(e).__name__}: {e}); start a redis-server (e.g. `apt-get install "
            "redis-server`) or point --redis at yours"
        ) from None


def _add_serve(sub, with_options: bool = True) -> None:
    p = sub.add_parser(
        "serve",
        help="run the backend (UNet body + HE update)",
        description="Run the backend. Every limit below bounds what one client (with or without a token) can hold; "
        "docs/threat-model.md explains each.",
    )
    if not with_options:  # the limits' defaults live with the engine (torch): `hediff --help` does not need them
        return
    from hediff.backend.auth import DEFAULT_RELOAD_INTERVAL_S
    from hediff.backend.guard import ConnectionLimits
    from hediff.backend.limits import Limits

    lim, conn = Limits(), ConnectionLimits()
    p.add_argument("--model", default="embedded", help="diffusers folder, hub id, or 'embedded' (default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8470, help="TCP port to listen on, 1-65535 (default 8470)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the UNet runs")
    p.add_argument(
        "--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto", help="the UNet's precision"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads of the UNet's forward passes (default: every core but one, which stays free to answer "
        "HTTP: a model that takes every core slows down many times over when connections need one too)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="DIR[:SCALE]",
        help="a LoRA folded into the UNet (repeatable); clients must name the same LoRAs at the same scales",
    )
    p.add_argument(
        "--tokens-file",
        type=Path,
        default=None,
        help="hashed API tokens (default ~/.config/hediff/tokens.json); `hediff token create/revoke` take effect "
        f"on the running server within {DEFAULT_RELOAD_INTERVAL_S:.0f} s, and a revoked token's sessions close",
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (chain) to serve HTTPS with")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    g = p.add_argument_group("limits (per request and session)")
    g.add_argument(
        "--session-ttl", type=float, default=lim.session_ttl_s, help="seconds an idle session is kept (%(default)s)"
    )
    g.add_argument(
        "--max-request-mb",
        type=float,
        default=lim.max_request_bytes / (1 << 20),
        help="largest request body accepted, MiB (%(default)s); a session whose steps would need more is refused",
    )
    g.add_argument("--max-sessions", type=int, default=lim.max_sessions, help="open sessions in total (%(default)s)")
    g.add_argument(
        "--max-sessions-per-token",
        type=int,
        default=lim.max_sessions_per_token,
        help="open sessions one API token may hold (%(default)s)",
    )
    g = p.add_argument_group("limits (memory and scheduling)")
    g.add_argument(
        "--max-inflight-mb",
        type=float,
        default=lim.max_inflight_bytes / (1 << 20),
        help="request bytes held in memory at once, all clients together, MiB (%(default)s; one token may hold "
        "half; each request counts twice while parsed); over it: 429",
    )
    g.add_argument(
        "--max-steps-per-token",
        type=int,
        default=lim.max_steps_per_token,
        help="steps one token may have queued or running (%(default)s); tokens take turns round-robin",
    )
    g.add_argument(
        "--max-queued-steps", type=int, default=lim.max_queued_steps, help="steps queued in total (%(default)s); 503"
    )
    g.add_argument(
        "--model-workers", type=int, default=lim.model_workers, help="threads running model steps (%(default)s)"
    )
    g.add_argument(
        "--failures-before-cooldown",
        type=int,
        default=lim.failures_before_cooldown,
        help=f"malformed requests (400/413/415) one token may send within {lim.failure_window_s:g} s before the "
        "server stops reading its requests for --failure-cooldown (%(default)s)",
    )
    g.add_argument(
        "--failure-cooldown",
        type=float,
        default=lim.failure_cooldown_s,
        help="seconds such a token is refused unread, 429 token_cooling_down (%(default)s)",
    )
    g = p.add_argument_group("limits (connections)")
    g.add_argument(
        "--header-timeout",
        type=float,
        default=conn.header_timeout_s,
        help="seconds a client has to send complete request headers (%(default)s); then 408 and close",
    )
    g.add_argument(
        "--body-idle-timeout",
        type=float,
        default=conn.body_idle_timeout_s,
        help="longest silence while a request body arrives, seconds (%(default)s)",
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        default=conn.body_timeout_s,
        help="seconds for a whole request body (%(default)s)",
    )
    g.add_argument("--keep-alive", type=float, default=conn.keep_alive_s, help="idle keep-alive seconds (%(default)s)")
    g.add_argument(
        "--max-connections",
        type=int,
        default=conn.max_connections,
        help="open connections in total (%(default)s); keep under the open-file limit (ulimit -n)",
    )
    g.add_argument(
        "--max-connections-per-address",
        type=int,
        default=conn.max_connections_per_address,
        help="open connections from one client address (%(default)s)",
    )
    _add_ray_options(p)


def _add_ray_options(p) -> None:
    g = p.add_argument_group("scale-out on Ray Serve (needs `pip install he-diffusion[ray]` and a redis-server)")
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="serve on Ray Serve: no value starts a cluster in this process, 'auto' joins the running cluster, "
        "or a cluster address (ray://head:10001); without --ray, the single-process server",
    )
    g.add_argument(
        "--ray-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a `serve deploy FILE` config for these options and exit (nothing is started)",
    )
    g.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="the session store every replica shares (%(default)s)"
    )
    g.add_argument("--session-replicas", type=int, default=2, help="session-tier replicas, CPU (%(default)s)")
    g.add_argument(
        "--session-workers", type=int, default=4, help="steps one session replica works on at once (%(default)s)"
    )
    g.add_argument("--unet-replicas", type=int, default=1, help="UNet-tier replicas (%(default)s)")
    g.add_argument(
        "--unet-gpus", type=float, default=None, help="GPUs per UNet replica (default: 1 with --device cuda, else 0)"
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="steps of different sessions in one UNet call (%(default)s; 1 turns batching off)",
    )
    g.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill, ms (%(default)s)"
    )


def _add_token(sub) -> None:
    p = sub.add_parser("token", help="make, list or revoke API tokens for `hediff serve`")
    p.add_argument(
        "--tokens-file", type=Path, default=None, help="hashed API tokens (default ~/.config/hediff/tokens.json)"
    )
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    c = tsub.add_parser("create", help="make a token; it is printed once and stored only as a hash")
    c.add_argument("--label", default="", help="a name to recognise the token by in `hediff token list`")
    tsub.add_parser("list", help="the tokens' ids, creation dates and labels (never the tokens)")
    r = tsub.add_parser("revoke", help="make a token stop working")
    r.add_argument("token_id", help="the id `hediff token list` shows")


# how a setting's default is chosen when the option is not given, where it is not simply the model's default
_DEFAULT_HELP = {
    "prompt": "none, required",
    "steps": "the model's recommendation (hediff.json), else {default}",
    "guidance": "the model's recommendation (hediff.json), else {default}",
    "width": "the model's native size; img2img: the picture's",
    "height": "the model's native size; img2img: the picture's",
    "init_image": "none: start from noise",
    "lora": "none",
}


# None when not given: the model's recommendation or native size applies, or --plaintext may set encryption
_METAVARS = {"init_image": "PNG", "lora": "DIR[:SCALE]"}
_UNSET_BY_DEFAULT = ("steps", "guidance", "width", "height", "encryption")


def _add_generate(sub, with_settings: bool = True) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image: on this device (default, private), through a loopback backend, or a server",
    )
    if not with_settings:  # `hediff --help` lists the command only; its options need the settings model (pydantic)
        return
    from hediff.common import settings

    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--on-device",
        action="store_true",
        help="the whole pipeline in this process; nothing leaves this machine (the default without --server or "
        "--local-backend)",
    )
    where.add_argument(
        "--server",
        help="backend URL, e.g. https://gpu-box:8470 (token from --token or $HEDIFF_TOKEN); a server that proves "
        "nothing needs --accept-not-private, an attested one --confidential",
    )
    where.add_argument(
        "--local-backend",
        action="store_true",
        help="the paper's encrypted split through a backend started on loopback for this run (still this machine)",
    )
    p.add_argument(
        "--accept-not-private",
        action="store_true",
        help="send to a --server that proves nothing about what it runs: it can rebuild your images and read your "
        "prompts (measured; see docs/threat-model.md)",
    )
    p.add_argument("--token", default=None, help="API token (prefer $HEDIFF_TOKEN: arguments show up in process lists)")
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="CA bundle or self-signed certificate to verify an https:// --server with (default: system CAs)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow sending the token over plain http:// to another machine (anyone on the path can read it)",
    )
    p.add_argument("--model", default="embedded", help="diffusers folder, hub id, or 'embedded' (default)")
    # one option per field of the settings model: its help, choices and range come from there
    group = p.add_argument_group("generation settings")
    for name, info in settings.GenerationSettings.__pydantic_fields__.items():
        options = settings.choices(name)
        kind = str if options is not None else info.annotation
        when_absent = _DEFAULT_HELP.get(name, "{default!r}").format(default=info.default)
        if getattr(kind, "__origin__", None) is tuple:  # a list setting: the option repeats
            group.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                action="append",
                default=None,
                metavar=_METAVARS.get(name, "TEXT"),
                help=f"{settings.help_text(name)}; {settings.allowed(name)}, one per option (default: {when_absent})",
            )
            continue
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            choices=options,
            default=None if name in _UNSET_BY_DEFAULT else info.default,
            required=name == "prompt",
            metavar=None if options is not None else _METAVARS.get(name, kind.__name__.upper()),
            help=f"{settings.help_text(name)}; {settings.allowed(name)} (default: {when_absent})",
        )
    p.add_argument("--plaintext", action="store_true", help="same as --encryption none: the split without HE")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="the PNG to write (default out.png)")
    p.add_argument("--embed-prompt", action="store_true", help="also write the prompts into the PNG metadata")
    p.add_argument("--latents-out", type=Path, default=None, help="save the final latent (before VAE scaling) as .npy")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one server answer")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device for the local backend")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_gui(sub) -> None:
    # listed for `hediff --help` only: main() hands everything after "gui" to the app, which parses its options
    sub.add_parser("gui", help="open the desktop app (its options: hediff gui --help)", add_help=False)


class _VersionAction(argparse.Action):
    # argparse's own "version" action wants the text when the parser is built: reading the installed version
    # costs more than the rest of `hediff --help`
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from hediff import __version__

        print(f"hediff {__version__}")
        parser.exit()


def build_parser(
    with_generate_settings: bool = True, with_serve_options: bool | None = None
) -> argparse.ArgumentParser:
    """The whole command line. ``with_generate_settings=False`` leaves out generate's options, which import the
    settings model, and serve's, whose limits come from the engine (unless ``with_serve_options`` says otherwise):
    main() builds only the options of the command it runs, so ``hediff --help`` stays fast."""
    if with_serve_options is None:
        with_serve_options = with_generate_settings
    parser = argparse.ArgumentParser(prog="hediff", description="HE-Diffusion: private Stable Diffusion")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_gui(sub)
    _add_serve(sub, with_serve_options)
    _add_token(sub)
    _add_generate(sub, with_generate_settings)
    _add_attest(sub)
    _add_confidential_options(sub.choices["generate"], sub.choices["serve"])
    return parser


def _quiet_libraries() -> None:
    # library chatter (optional-dependency notices, per-load progress bars) hides our own progress and summary
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gui"]:
        return cmd_gui(argv[1:])
    command = argv[:1]
    args = build_parser(command == ["generate"], command == ["serve"]).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"serve": cmd_serve, "token": cmd_token, "generate": cmd_generate, "attest": cmd_attest}
        if args.cmd == "generate" and args.confidential:
            return cmd_generate_confidential(args)
        return commands[args.cmd](args)
    except KeyboardInterrupt:
        print("hediff: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except HEDiffusionError as e:  # written for the user; the class says how the command ends (common.errors)
        print("hediff: cancelled" if e.exit_code == EXIT_CANCELLED else f"hediff: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, OSError) as e:  # a bad value or an unusable file: the command line cannot work
        print(f"hediff: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def cmd_gui(gui_args: list[str]) -> int:
    try:
        from hediff.desktop.ui.app import run_gui
    except ImportError as e:
        missing = e.name or "PySide6"
        print(
            f"hediff: error: the desktop app needs {missing}: install the gui extra (./setup.sh does)", file=sys.stderr
        )
        return EXIT_USAGE
    return run_gui(["hediff gui", *gui_args])


def cmd_token(args) -> int:
    from hediff.backend.auth import TokenStore, default_tokens_path

    store = TokenStore.load(args.tokens_file or default_tokens_path())
    if args.token_cmd == "create":
        token = store.create(args.label)
        print(token)
        print(f"(stored as a hash in {store.path}; this is the only time the token is shown)", file=sys.stderr)
    elif args.token_cmd == "list":
        for r in store.records():
            print(f"{r.id}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(r.created))}  {r.label}")
    else:
        if not store.revoke(args.token_id):
            raise UsageError(f"no token with id {args.token_id!r} in {store.path}")
        print(f"revoked {args.token_id}")
    return 0


def cmd_serve(args) -> int:
    if args.ray_config is None:  # a config file is deployed elsewhere: this machine's ports do not matter
        check_port_free(args.host, args.port)  # before the imports below pull in torch: seconds
    from hediff.backend.app import create_app
    from hediff.backend.auth import TokenStore, default_tokens_path
    from hediff.backend.engine import ServerModel
    from hediff.backend.guard import ConnectionLimits
    from hediff.backend.limits import Limits
    from hediff.backend.serve import check_tls_files, serve_forever
    from hediff.common.models import resolve_model

    if args.confidential and (args.ray is not None or args.ray_config is not None):
        raise UsageError("--confidential runs one attested process; it cannot be combined with --ray")
    tls = check_tls_files(args.tls_cert, args.tls_key)  # before the model loads: a typo should fail fast
    if args.confidential:
        _check_confidential_serve(args, tls)
    for flag, value in (
        ("--max-sessions", args.max_sessions),
        ("--max-sessions-per-token", args.max_sessions_per_token),
        ("--session-ttl", args.session_ttl),
        ("--max-request-mb", args.max_request_mb),
        ("--max-inflight-mb", args.max_inflight_mb),
        ("--max-steps-per-token", args.max_steps_per_token),
        ("--max-queued-steps", args.max_queued_steps),
        ("--model-workers", args.model_workers),
        ("--failures-before-cooldown", args.failures_before_cooldown),
        ("--failure-cooldown", args.failure_cooldown),
        ("--header-timeout", args.header_timeout),
        ("--body-idle-timeout", args.body_idle_timeout),
        ("--body-timeout", args.body_timeout),
        ("--keep-alive", args.keep_alive),
        ("--max-connections", args.max_connections),
        ("--max-connections-per-address", args.max_connections_per_address),
        ("--torch-threads", args.torch_threads if args.torch_threads is not None else 1),
    ):
        if not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    torch_threads = args.torch_threads or default_torch_threads()
    if args.max_inflight_mb < 4 * args.max_request_mb:
        raise UsageError(
            f"--max-inflight-mb {args.max_inflight_mb:g} must be at least 4 x --max-request-mb "
            f"{args.max_request_mb:g}: a request counts twice while it is parsed and one token may hold half the "
            "budget, so a smaller budget could never take the largest request"
        )
    tokens_path = args.tokens_file or default_tokens_path()
    tokens = TokenStore.load(tokens_path)
    if not tokens.records():
        raise UsageError(f"no API tokens in {tokens_path}; make one with `hediff token create` first")
    limits = Limits(
        max_request_bytes=int(args.max_request_mb * (1 << 20)),
        session_ttl_s=args.session_ttl,
        max_sessions=args.max_sessions,
        max_sessions_per_token=args.max_sessions_per_token,
        max_inflight_bytes=int(args.max_inflight_mb * (1 << 20)),
        max_steps_per_token=args.max_steps_per_token,
        max_queued_steps=args.max_queued_steps,
        model_workers=args.model_workers,
        failures_before_cooldown=args.failures_before_cooldown,
        failure_cooldown_s=args.failure_cooldown,
    )
    connections = ConnectionLimits(
        header_timeout_s=args.header_timeout,
        body_idle_timeout_s=args.body_idle_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        keep_alive_s=args.keep_alive,
    )
    if args.ray is not None or args.ray_config is not None:
        return _serve_on_ray(args, tokens_path, limits, tls, torch_threads)
    import torch

    torch.set_num_threads(torch_threads)
    model_path = resolve_model(args.model)
    model = ServerModel(model_path, args.model, device=args.device, dtype=args.dtype, lora=tuple(args.lora))
    scheme = "https" if tls else "http"
    print(
        f"hediff backend: model {args.model} on {model.device} ({model.dtype}), {scheme}://{args.host}:{args.port}",
        file=sys.stderr,
    )
    app = create_app(model, tokens, limits)
    if args.confidential:
        from hediff.backend import confidential

        confidential.enable(app, tokens, model_path, args.device, tls.cert, args.tsm_dir, args.vcek)
        print("hediff backend: confidential mode, evidence from " + str(args.tsm_dir), file=sys.stderr)
    serve_forever(app, args.host, args.port, tls=tls, connections=connections)
    return 0


def check_port_free(host: str, port: int) -> None:
    """UsageError unless ``port`` is a TCP port this process could listen on at ``host`` right now."""
    import socket

    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be an integer in [1, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} is not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as e:
            raise UsageError(
                f"--port {port} cannot be used on {host} ({e.strerror}); stop what listens there or pick another port"
            ) from None


def generation_settings(args):
    """The generation settings the options ask for (the model's recommendations fill what is not given later).
    UsageError naming the option and its allowed range."""
    from hediff.common.settings import GenerationSettings, SettingsError

    given = {name: getattr(args, name) for name in GenerationSettings.__pydantic_fields__}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    if args.plaintext:
        if given.get("encryption", "none") != "none":
            raise UsageError(f"--plaintext means --encryption none, but --encryption {given['encryption']} was given")
        given["encryption"] = "none"
    try:
        settings = GenerationSettings(**given)
        settings.validate()
    except SettingsError as e:
        raise UsageError(e.for_option()) from None
    return settings, given


def check_writable(path: Path, option: str, suffix: str) -> None:
    """UsageError unless ``path`` can be written (its folder exists or can be made) and ends in ``suffix``."""
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a folder; give a file name ending in {suffix}")
    if path.suffix.lower() != suffix:
        raise UsageError(f"{option} must be a {suffix} file, got {str(path)!r}")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    target = path if path.exists() else existing
    if not existing.is_dir() or not os.access(target, os.W_OK):
        raise UsageError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is not a writable folder")


def cmd_generate(args) -> int:
    settings, given = generation_settings(args)
    check_writable(args.out, "--out", ".png")
    if args.latents_out is not None:
        check_writable(args.latents_out, "--latents-out", ".npy")
    from hediff.common.settings import SettingsError
    from hediff.desktop.core.api import HEDiffusion
    from hediff.desktop.core.privacy import Where, label_for

    t0 = time.perf_counter()
    token = None
    if args.server:
        if not args.accept_not_private:
            label = label_for(Where.SERVER, settings.split, settings.encryption).text
            raise UsageError(
                f"{args.server} proves nothing about what it runs. {label}. Add --accept-not-private to send to it "
                "anyway, use --confidential for an attested server, or leave out --server to generate on this device"
            )
        token = args.token or os.environ.get("HEDIFF_TOKEN")
        if not token:
            raise UsageError("--server needs an API token: pass --token or set HEDIFF_TOKEN")
        from hediff.desktop.core.backend_client import refuse_plaintext_token

        refuse_plaintext_token(args.server, args.insecure)  # before the model loads: fail fast
    elif args.token:
        where = "--local-backend makes its own" if args.local_backend else "on this device nothing is sent anywhere"
        raise UsageError(f"--token is for --server; {where}")
    with HEDiffusion(
        args.model,
        server=args.server,
        token=token,
        local_backend=args.local_backend,
        split=settings.split,
        backend_device=args.device,
        timeout_s=args.timeout,
        tls_ca=args.tls_ca,
        accept_not_private=args.accept_not_private,
        insecure=args.insecure,
    ) as hd:
        try:  # the given values against the model's config or the server's capabilities: no torch, no weights
            hd.check(settings)
            settings = hd.settings(**given)  # the model's recommendations for what was not given
        except SettingsError as e:
            raise UsageError(e.for_option()) from None
        from tqdm import tqdm

        bar = tqdm(total=None, unit="step", disable=args.quiet, file=sys.stderr, desc="denoising")

        def on_step(update):
            bar.total = update.total
            bar.set_postfix_str(f"sent {update.bytes_sent / 1e6:.2f} MB, recv {update.bytes_received / 1e6:.2f} MB")
            bar.update(1)

        if not args.quiet:
            print(hd.privacy(settings.split, settings.encryption).text, file=sys.stderr)
        try:
            result = hd.generate(settings, on_step=on_step)
        finally:
            bar.close()
    load_s = time.perf_counter() - t0 - result.total_s  # the models load on the first generation
    from hediff.desktop.core.gallery import save_png_private

    images = result.images or [result.image]
    for k, path in enumerate(image_paths(args.out, len(images))):  # 0600: the images are the private output
        save_png_private(_one_image(result, k) if len(images) > 1 else result, path, args.embed_prompt)
    if args.latents_out:
        import numpy as np

        latents = result.latent if result.latent.ndim == 4 else result.latent[None]  # (count, C, h, w)
        _write_whole(args.latents_out, lambda tmp: np.save(tmp, latents.astype(np.float32)))
    _print_summary(result, load_s, args.out)
    return 0


def image_paths(out: Path, count: int) -> list[Path]:
    """Where --count images go: --out itself for the first (seed s), ``<stem>-<k>.png`` for seed s+k."""
    return [out] + [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(1, count)]


def _one_image(result, k: int):
    """The result as saved for its k-th image: the metadata names that image's own seed (rerunning those
    settings makes that image alone)."""
    import dataclasses

    params = dataclasses.replace(result.params, seed=result.params.seed + k, count=1)
    return dataclasses.replace(result, image=result.images[k], params=params)


def _write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary file next to ``path``, then rename it: Ctrl-C or a full disk never leaves half a
    file under the name the user asked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # same suffix: PIL and numpy pick the format by it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _print_summary(result, load_s: float, out: Path) -> None:
    from hediff.common.split import is_u_shaped

    totals = result.timing_totals()
    n = len(result.step_timings)
    mode = result.params.encryption if result.params.encryption != "none" else "plaintext split"
    if is_u_shaped(result.params.split):
        mode = f"U-shaped split {result.params.split}: the latent stayed on this machine"
    if result.mode == "on-device":
        mode = "on this device: nothing left this machine"
    lines = [
        f"saved {out}  ({result.params.width}x{result.params.height}, {n} steps, {result.params.scheduler}, {mode})",
        f"model load {load_s:.2f} s, session set-up {result.setup_s:.2f} s, denoising "
        f"{result.total_s - result.setup_s - result.decode_s:.2f} s, VAE decode {result.decode_s:.2f} s",
        "per step (mean ms): " + ", ".join(f"{k} {1e3 * v / max(n, 1):.1f}" for k, v in totals.items()),
        f"bytes per step: sent {sum(result.bytes_sent) / max(n, 1) / 1e6:.3f} MB, "
        f"received {sum(result.bytes_received) / max(n, 1) / 1e6:.3f} MB",
    ]
    if result.encrypted_fractions:
        lines.append(f"encrypted fraction of the latent: mean {sum(result.encrypted_fractions) / n:.3f}")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"out": str(out), "total_s": round(result.total_s, 3)}))


# --- confidential servers and attestation (docs/attestation.md) -------------------------------------------------


def _add_attest(sub) -> None:
    p = sub.add_parser("attest", help="verify attestation evidence of a confidential backend")
    asub = p.add_subparsers(dest="attest_cmd", required=True)
    v = asub.add_parser(
        "verify",
        help="verify an SEV-SNP report: exit 0 and the verified fields, or non-zero and the reason in one line",
    )
    v.add_argument("--report", type=Path, required=True, help="the raw 1,184-byte ATTESTATION_REPORT")
    v.add_argument("--vcek", type=Path, required=True, help="the chip's VCEK certificate (DER or PEM)")
    v.add_argument("--ask", type=Path, default=None, help="AMD ASK (default: the built-in one of the VCEK's product)")
    v.add_argument("--ark", type=Path, default=None, help="AMD ARK; refused unless it is one of the pinned AMD roots")
    v.add_argument("--measurement", action="append", default=[], help="an allowed launch measurement (96 hex digits)")
    v.add_argument("--report-data", default=None, help="the expected report_data (128 hex digits)")
    v.add_argument("--min-tcb", default=None, help="TCB floor BOOT_LOADER:TEE:SNP:MICROCODE, e.g. 3:0:8:115")
    v.add_argument("--allow-debug", action="store_true", help="accept a guest whose policy allows debugging")


def _add_confidential_options(generate, serve) -> None:
    g = generate.add_argument_group("confidential server (the whole pipeline runs in an attested TEE)")
    g.add_argument(
        "--confidential",
        action="store_true",
        help="verify the https:// --server's SEV-SNP evidence (bound to this TLS connection and a fresh nonce) and "
        "send the prompt only if it holds",
    )
    g.add_argument("--measurement", action="append", default=[], help="an allowed launch measurement (96 hex digits)")
    g.add_argument("--min-tcb", default=None, help="TCB floor BOOT_LOADER:TEE:SNP:MICROCODE")
    g.add_argument("--allow-debug", action="store_true", help="accept a debuggable guest (testing only)")
    g.add_argument(
        "--allow-cpu-only-tee",
        action="store_true",
        help="accept the server although its GPU evidence is not verified (this client cannot verify it yet)",
    )
    s = serve.add_argument_group("confidential mode")
    s.add_argument("--confidential", action="store_true", help="serve attestation evidence and whole-pipeline runs")
    s.add_argument("--tsm-dir", type=Path, default=Path("/sys/kernel/config/tsm/report"), help="configfs-tsm reports")
    s.add_argument("--vcek", type=Path, default=None, help="this chip's VCEK, if the host does not supply it")


def _read_evidence_file(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be read ({e.strerror or e})") from None


def cmd_attest(args) -> int:
    from hediff.common.attest.snp import Tcb
    from hediff.common.attest.verify import AttestationError, Policy, verify_snp_report

    try:
        expected = bytes.fromhex(args.report_data) if args.report_data is not None else None
    except ValueError:
        raise UsageError(f"--report-data {args.report_data!r} is not hex") from None
    if expected is not None and len(expected) != 64:
        raise UsageError(f"--report-data is {len(expected)} bytes; report_data is 64 (128 hex digits)")
    policy = Policy(
        measurements=Policy.parse_measurements(args.measurement),
        report_data=expected,
        allow_debug=args.allow_debug,
        min_tcb=Tcb.parse(args.min_tcb) if args.min_tcb else None,
    )
    try:
        verified = verify_snp_report(
            _read_evidence_file(args.report, "--report"),
            _read_evidence_file(args.vcek, "--vcek"),
            ask_der=_read_evidence_file(args.ask, "--ask") if args.ask else None,
            ark_der=_read_evidence_file(args.ark, "--ark") if args.ark else None,
            policy=policy,
        )
    except AttestationError as e:
        print(f"hediff attest: REFUSED ({e.check}): {e.reason}", file=sys.stderr)
        return EXIT_ATTESTATION
    print(json.dumps({"verified": True, **verified.fields()}, indent=2))
    return 0


def _check_confidential_serve(args, tls) -> None:
    from hediff.backend.confidential import ConfigfsTsm, EvidenceError

    if tls is None:
        raise UsageError(
            "--confidential needs --tls-cert/--tls-key: the evidence binds the TLS key, so make the key inside this "
            "confidential VM and serve HTTPS with it"
        )
    try:
        ConfigfsTsm(args.tsm_dir).check()
    except EvidenceError as e:
        raise UsageError(str(e)) from None


def cmd_generate_confidential(args) -> int:
    from hediff.common.attest.verify import AttestationError
    from hediff.desktop.core.confidential_client import ConfidentialClient, ConfidentialError, ConfidentialPolicy

    if not args.server:
        raise UsageError("--confidential needs --server https://...: a local backend is not a confidential one")
    # the confidential server's request takes a prompt and sampling settings only: refuse what it would ignore
    confidential_unused = (
        ("--init-image", not args.init_image),
        ("--count", args.count in (None, 1)),
        ("--lora", not args.lora),
    )
    for option, unused in confidential_unused:
        if not unused:
            raise UsageError(f"{option} is not supported with --confidential yet; generate on this device or drop it")
    token = args.token or os.environ.get("HEDIFF_TOKEN")
    if not token:
        raise UsageError("--server needs an API token: pass --token or set HEDIFF_TOKEN")
    policy = ConfidentialPolicy.from_options(args.measurement, args.allow_debug, args.min_tcb, args.allow_cpu_only_tee)
    client = ConfidentialClient(args.server, token, policy, tls_ca=args.tls_ca, timeout_s=args.timeout)

    def attested(attestation) -> None:
        print("\n".join([attestation.label(), *attestation.summary()]), file=sys.stderr)

    def step(s) -> None:
        if not args.quiet:
            print(f"step {s.index + 1}/{s.total}", file=sys.stderr)

    try:
        result = client.generate(
            args.prompt,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            width=args.width,
            height=args.height,
            scheduler=args.scheduler,
            on_attested=attested,
            on_step=step,
        )
    except AttestationError as e:
        print(f"hediff: REFUSED, nothing was sent ({e.check}): {e.reason}", file=sys.stderr)
        return EXIT_ATTESTATION
    except ConfidentialError as e:
        print(f"hediff: error: {e}", file=sys.stderr)
        return e.exit_code
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.out)
    print(json.dumps({"out": str(args.out), "steps": len(result.steps)}))
    return 0


def run() -> None:
    """The `hediff` command (console script, `python -m hediff`): ``main()``, ending the process with its code.

    A cancelled run (Ctrl-C, answered with "hediff: cancelled" and nothing half-written) ends at once: after a
    KeyboardInterrupt, the interpreter's own shutdown ended the process by SIGINT instead of exit 130 in about one
    run in three (measured with `tests/test_cli_daily.py`'s Ctrl-C test), and there is nothing left to clean up."""
    code = main()
    if code == EXIT_CANCELLED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
