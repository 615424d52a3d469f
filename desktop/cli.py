"""The ``hediff`` command: serve, token, generate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


def _add_serve(sub) -> None:
    from hediff.backend.auth import DEFAULT_RELOAD_INTERVAL_S
    from hediff.backend.engine import Limits
    from hediff.backend.guard import ConnectionLimits

    lim, conn = Limits(), ConnectionLimits()
    p = sub.add_parser(
        "serve",
        help="run the backend (UNet body + HE update)",
        description="Run the backend. Every limit below bounds what one client (with or without a token) can hold; "
        "docs/threat-model.md explains each.",
    )
    p.add_argument("--model", default="embedded", help="diffusers folder, hub id, or 'embedded' (default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
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


def _add_token(sub) -> None:
    p = sub.add_parser("token", help="make, list or revoke API tokens for `hediff serve`")
    p.add_argument("--tokens-file", type=Path, default=None)
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    c = tsub.add_parser("create", help="make a token; it is printed once and stored only as a hash")
    c.add_argument("--label", default="")
    tsub.add_parser("list")
    r = tsub.add_parser("revoke")
    r.add_argument("token_id")


def _add_generate(sub) -> None:
    from hediff.common import he, protocol, selection
    from hediff.common.schedulers import SCHEDULER_NAMES
    from hediff.common.split import SPLIT_POINTS

    p = sub.add_parser("generate", help="generate an image; the latent leaves this machine only encrypted")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="backend URL, e.g. http://127.0.0.1:8470 (token from --token or $HEDIFF_TOKEN)")
    where.add_argument("--local-backend", action="store_true", help="start a backend on loopback for this run")
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
    p.add_argument("--model", default="embedded")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=None, help="default: the model's recommendation (hediff.json), else 20")
    p.add_argument(
        "--guidance", type=float, default=None, help="default: the model's recommendation (hediff.json), else 7.5"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="plms")
    p.add_argument(
        "--encryption",
        choices=selection.ENCRYPTION_MODES,
        default="full",
        help="which latent elements are encrypted: all; the paper's min-distortion selection (its index set is a "
        "saliency map of the image); or random-mask, a data-independent set drawn once per generation from a "
        "secret seed. Only matters with the paper's splits: a U-shaped --split never sends the latent",
    )
    p.add_argument(
        "--tau", type=float, default=selection.DEFAULT_TAU, help="min-distortion budget (smaller encrypts more)"
    )
    p.add_argument(
        "--mask-fraction",
        type=float,
        default=selection.DEFAULT_MASK_FRACTION,
        help="random-mask: share of the latent encrypted (default: the paper's share at tau 0.01)",
    )
    p.add_argument("--he-preset", choices=tuple(he.PRESETS), default=he.DEFAULT_PRESET)
    p.add_argument(
        "--split",
        choices=SPLIT_POINTS,
        default=SPLIT_POINTS[0],
        help="where the UNet is split: the paper's conv_in / down0.resnet0 send a linear, invertible function of "
        "the latent; U-shaped u1 / u2 keep the first and last 1 / 2 UNet blocks, the latent and the noise "
        "prediction on this machine (no HE needed)",
    )
    p.add_argument("--activation-dtype", choices=protocol.ACTIVATION_DTYPES, default="float32")
    p.add_argument("--plaintext", action="store_true", help="same split protocol without HE (comparison baseline)")
    p.add_argument("--out", type=Path, default=Path("out.png"))
    p.add_argument("--embed-prompt", action="store_true", help="also write the prompts into the PNG metadata")
    p.add_argument("--latents-out", type=Path, default=None, help="save the final latent (before VAE scaling) as .npy")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one server answer")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device for the local backend")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_gui(sub) -> None:
    p = sub.add_parser("gui", help="open the desktop app")
    p.add_argument("--data-dir", type=Path, default=None, help="app data (settings, wrapped keys, gallery)")
    p.add_argument("--screenshot", type=Path, default=None, help="save the window as PNG once it is up, then quit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hediff", description="HE-Diffusion: private Stable Diffusion")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_gui(sub)
    _add_serve(sub)
    _add_token(sub)
    _add_generate(sub)
    return parser


def _quiet_libraries() -> None:
    # library chatter (optional-dependency notices, per-load progress bars) hides our own progress and summary
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from hediff.common.models import ModelFolderError, ModelNotFoundError
    from hediff.desktop.core.backend_client import BackendError
    from hediff.desktop.core.engine import GenerationCancelled

    try:
        commands = {"gui": cmd_gui, "serve": cmd_serve, "token": cmd_token, "generate": cmd_generate}
        return commands[args.cmd](args)
    except (BackendError, ModelFolderError, ModelNotFoundError, ValueError, OSError) as e:
        print(f"hediff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, GenerationCancelled):
        print("hediff: cancelled", file=sys.stderr)
        return 130


def cmd_gui(args) -> int:
    try:
        from hediff.desktop.ui.app import run_gui
    except ImportError as e:
        missing = e.name or "PySide6"
        raise ValueError(f"the desktop app needs {missing}: install the gui extra (./setup.sh does)") from None
    argv = [sys.argv[0]]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    if args.screenshot is not None:
        argv += ["--screenshot", str(args.screenshot)]
    return run_gui(argv)


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
            raise ValueError(f"no token with id {args.token_id!r} in {store.path}")
        print(f"revoked {args.token_id}")
    return 0


def cmd_serve(args) -> int:
    from hediff.backend.app import create_app
    from hediff.backend.auth import TokenStore, default_tokens_path
    from hediff.backend.engine import Limits, ServerModel
    from hediff.backend.guard import ConnectionLimits
    from hediff.backend.serve import check_tls_files, serve_forever
    from hediff.common.models import resolve_model

    tls = check_tls_files(args.tls_cert, args.tls_key)  # before the model loads: a typo should fail fast
    for flag, value in (
        ("--max-sessions", args.max_sessions),
        ("--max-sessions-per-token", args.max_sessions_per_token),
        ("--session-ttl", args.session_ttl),
        ("--max-request-mb", args.max_request_mb),
        ("--max-inflight-mb", args.max_inflight_mb),
        ("--max-steps-per-token", args.max_steps_per_token),
        ("--max-queued-steps", args.max_queued_steps),
        ("--model-workers", args.model_workers),
        ("--header-timeout", args.header_timeout),
        ("--body-idle-timeout", args.body_idle_timeout),
        ("--body-timeout", args.body_timeout),
        ("--keep-alive", args.keep_alive),
        ("--max-connections", args.max_connections),
        ("--max-connections-per-address", args.max_connections_per_address),
    ):
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_inflight_mb < 4 * args.max_request_mb:
        raise ValueError(
            f"--max-inflight-mb {args.max_inflight_mb:g} must be at least 4 x --max-request-mb "
            f"{args.max_request_mb:g}: a request counts twice while it is parsed and one token may hold half the "
            "budget, so a smaller budget could never take the largest request"
        )
    tokens_path = args.tokens_file or default_tokens_path()
    tokens = TokenStore.load(tokens_path)
    if not tokens.records():
        raise ValueError(f"no API tokens in {tokens_path}; make one with `hediff token create` first")
    model_path = resolve_model(args.model)
    model = ServerModel(model_path, args.model, device=args.device, dtype=args.dtype)
    limits = Limits(
        max_request_bytes=int(args.max_request_mb * (1 << 20)),
        session_ttl_s=args.session_ttl,
        max_sessions=args.max_sessions,
        max_sessions_per_token=args.max_sessions_per_token,
        max_inflight_bytes=int(args.max_inflight_mb * (1 << 20)),
        max_steps_per_token=args.max_steps_per_token,
        max_queued_steps=args.max_queued_steps,
        model_workers=args.model_workers,
    )
    connections = ConnectionLimits(
        header_timeout_s=args.header_timeout,
        body_idle_timeout_s=args.body_idle_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        keep_alive_s=args.keep_alive,
    )
    scheme = "https" if tls else "http"
    print(
        f"hediff backend: model {args.model} on {model.device} ({model.dtype}), {scheme}://{args.host}:{args.port}",
        file=sys.stderr,
    )
    serve_forever(create_app(model, tokens, limits), args.host, args.port, tls=tls, connections=connections)
    return 0


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from hediff.desktop.core.api import HEDiffusion

    t0 = time.perf_counter()
    token = args.token if args.local_backend else (args.token or os.environ.get("HEDIFF_TOKEN"))
    if not args.local_backend and not token:
        raise ValueError("--server needs an API token: pass --token or set HEDIFF_TOKEN")
    if not args.local_backend:
        from hediff.desktop.core.backend_client import refuse_plaintext_token

        refuse_plaintext_token(args.server, args.insecure)  # before the model loads: fail fast
    with HEDiffusion(
        args.model,
        server=None if args.local_backend else args.server,
        token=token,
        local_backend=args.local_backend,
        split=args.split,
        backend_device=args.device,
        timeout_s=args.timeout,
        tls_ca=args.tls_ca,
        insecure=args.insecure,
    ) as hd:
        params = hd.params(
            args.prompt,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            width=args.width or 0,
            height=args.height or 0,
            scheduler=args.scheduler,
            encryption="none" if args.plaintext else args.encryption,
            tau=args.tau,
            mask_fraction=args.mask_fraction,
            he_preset=args.he_preset,
            activation_dtype=args.activation_dtype,
        )
        params.validate()
        load_s = time.perf_counter() - t0
        bar = tqdm(total=None, unit="step", disable=args.quiet, file=sys.stderr, desc="denoising")

        def on_step(update):
            bar.total = update.total
            bar.set_postfix_str(f"sent {update.bytes_sent / 1e6:.2f} MB, recv {update.bytes_received / 1e6:.2f} MB")
            bar.update(1)

        try:
            result = hd.generate(params, on_step=on_step)
        finally:
            bar.close()

    from hediff.desktop.core.gallery import save_png_private

    save_png_private(result, args.out, include_prompt=args.embed_prompt)  # 0600: the image is the private output
    if args.latents_out:
        import numpy as np

        args.latents_out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.latents_out, result.latent[None].astype(np.float32))
    _print_summary(result, load_s, args.out)
    return 0


def _print_summary(result, load_s: float, out: Path) -> None:
    from hediff.common.split import is_u_shaped

    totals = result.timing_totals()
    n = len(result.step_timings)
    mode = result.params.encryption if result.params.encryption != "none" else "plaintext split"
    if is_u_shaped(result.params.split):
        mode = f"U-shaped split {result.params.split}: the latent stayed on this machine"
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


if __name__ == "__main__":
    sys.exit(main())
