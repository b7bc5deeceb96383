"""The ``vita-ext`` command line (also ``python -m vita_ext``).

    vita-ext generate [--model DIR] [--image PATH ...] [--video PATH ...] --prompt TEXT [...]
    vita-ext serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--media-root DIR] [...]
    vita-ext random-checkpoint DIR [--preset tiny|long-vita-14b] [--dtype bfloat16] [...]
    vita-ext train --stage N --data FILE.jsonl --model DIR --out DIR [--seq-len N] [--max-steps N] [--config FILE] [...]
    vita-ext plot-train OUT_OR_METRICS [...] --out loss.png

Errors a user can fix (a missing file, an unreadable image, a tag/media mismatch, a bad setting)
print one line and exit with status 2; anything else is a bug and keeps its traceback. Warnings
(a truncated video, a skipped checkpoint) print one line each. Under torchrun (--context-parallel),
every rank stops with the same line when any rank fails (``vita_ext.parallel.failure``).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

import torch

from vita_ext.parallel.failure import USER_ERRORS, RankFailure, agree
from vita_ext.processing.image import MAX_TILES
from vita_ext.processing.video import MAX_FRAMES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MAX_PROMPT_BYTES = 64 * 2**20  # --prompt-file: far beyond any context (1M tokens ~ 4 MB of text)


def _log(msg: str) -> None:
    print(f"[vita-ext] {msg}", file=sys.stderr, flush=True)


def _device(name: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N (N an existing GPU); a ValueError naming the flag otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def _positive(value, flag: str, high: int | None = None) -> None:
    if value is not None and (value < 1 or (high is not None and value > high)):
        bound = f"in [1, {high}]" if high is not None else ">= 1"
        raise ValueError(f"{flag} must be {bound}, got {value}")


def _prompt(args) -> str:
    """The prompt from --prompt or --prompt-file (``-``: stdin), checked to be valid UTF-8."""
    if args.prompt_file is None:
        text = args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # the shell passed bytes that are not UTF-8
            bad = text[e.start].encode("utf-8", "surrogateescape") if "\udc80" <= text[e.start] <= "\udcff" \
                else text[e.start]
            raise ValueError(f"--prompt is not valid UTF-8 (byte {bad!r} at character {e.start}); pass UTF-8 "
                             "text, or the text in a UTF-8 file with --prompt-file") from None
        return text
    path = args.prompt_file
    if path == "-":
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        name = "stdin"
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--prompt-file {path}: no such file")
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
        name = path
    if len(data) > MAX_PROMPT_BYTES:
        raise ValueError(f"--prompt-file {name}: more than {MAX_PROMPT_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {name}: not valid UTF-8 (byte {data[e.start:e.start + 1]!r} at offset "
                         f"{e.start})") from None


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _load(args, device: torch.device, dtype: torch.dtype):
    from vita_ext.generation import GenerationConfig
    from vita_ext.model.long_vita import LongVITAForCausalLM
    from vita_ext.processing import LongVITAProcessor

    if args.model is None:
        from vita_ext.model.default import default_model

        model, processor, gen_cfg, label = default_model(dtype=dtype, device=device)
        _log(label)
        return model, processor, gen_cfg
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such checkpoint directory")
    model = LongVITAForCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
    return model, LongVITAProcessor.from_pretrained(args.model), GenerationConfig.from_pretrained(args.model)


def cmd_generate(args) -> int:
    if not args.context_parallel:
        return _generate(args, _prepare(args, _device(args.device)), is_main=True)
    from vita_ext.parallel import init_distributed

    device = init_distributed(args.cp_timeout)
    return _together(lambda: _generate(args, agree(None, _prepare, args, device),
                                       is_main=torch.distributed.get_rank() == 0))


def _together(run) -> int:
    """Run a context-parallel command so that a failure on any rank stops every rank with the same
    one-line reason (exit 2 for a user error, 1 otherwise) within about a second: the failing rank
    publishes it, the others hear it even while blocked in a collective (parallel.failure)."""
    from vita_ext.parallel import FailureWatch, exit_on_failure, shutdown_distributed

    watch = FailureWatch(lambda failure: exit_on_failure(failure, watch.acknowledge))
    with watch:
        try:
            code = run()
        except Exception as exc:  # noqa: BLE001 - reported on every rank, then this process ends
            failure = watch.publish(exc)
            if failure.rank == watch.rank and not isinstance(exc, USER_ERRORS + (RankFailure,)):
                traceback.print_exc()  # a bug: its traceback, on the rank where it happened
            exit_on_failure(failure, watch.acknowledge)  # every rank waits until every line is out
    shutdown_distributed()
    return code


def _prepare(args, device: torch.device) -> dict:
    """Everything local before the first collective: read the prompt and media, load the model,
    tokenise, check the settings and the context length. Returns what _generate needs."""
    from vita_ext.processing import insert_media_tags

    prompt = _prompt(args)
    for path in args.image + args.video:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file: {path}")
    _positive(args.max_tiles, "--max-tiles", MAX_TILES)
    _positive(args.max_frames, "--max-frames", MAX_FRAMES)
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.seed is not None and not -2**63 <= args.seed < 2**64:  # what torch.Generator accepts
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    dtype = _dtype(args.dtype, device)
    model, processor, gen_cfg = _load(args, device, dtype)
    max_positions = model.config.text.max_position_embeddings
    prompt = insert_media_tags(prompt, len(args.image), len(args.video))
    inputs = processor(prompt, images=args.image or None, videos=args.video or None, max_frames=args.max_frames,
                       max_tiles=args.max_tiles, max_length=max_positions)
    overrides = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    if args.temperature is not None:
        overrides["do_sample"] = args.temperature > 0
    gen_cfg = gen_cfg.updated(**overrides)  # validates the sampling flags
    room = max_positions - inputs["input_ids"].shape[1]
    if gen_cfg.max_new_tokens > room:
        if args.max_new_tokens is not None:
            raise ValueError(f"the prompt is {inputs['input_ids'].shape[1]} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} it exceeds the model's max_position_embeddings "
                             f"{max_positions} (use --max-new-tokens {room} or less)")
        _log(f"note: max_new_tokens lowered from {gen_cfg.max_new_tokens} to {room}: the prompt is "
             f"{inputs['input_ids'].shape[1]} tokens of the model's {max_positions} positions")
        gen_cfg = gen_cfg.updated(max_new_tokens=room)
    return {"model": model, "processor": processor, "gen_cfg": gen_cfg, "inputs": inputs, "device": device}


def _generate(args, prepared: dict, is_main: bool) -> int:
    from vita_ext.generation import generate

    model, processor, gen_cfg, inputs, device = (prepared[k] for k in ("model", "processor", "gen_cfg", "inputs",
                                                                      "device"))
    stream = processor.tokenizer.stream(skip_special_tokens=True)

    def on_token(token: int) -> None:
        piece = stream.put(token)
        if piece and is_main:
            print(piece, end="", flush=True)

    if args.context_parallel:
        from vita_ext.parallel import cp_generate

        out = cp_generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["context_positions"],
                          generation_config=gen_cfg, seed=args.seed, streamer=on_token)
    else:
        out = generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["context_positions"],
                       generation_config=gen_cfg, seed=args.seed, streamer=on_token,
                       progress=inputs["pixel_values"].shape[0] > 8)
    tail = stream.finish()
    if not is_main:
        return 0
    print(tail if tail else "", flush=True)
    n_new = out.sequences.shape[1]
    if args.context_parallel:
        _log(f"context parallel: {out.extra['world_size']} ranks, KV cache rows per rank {out.extra['cache_rows']}")
    tiles = inputs["pixel_values"].shape[0]
    _log(f"prompt tokens: {out.prompt_tokens} ({tiles} tile{'s' if tiles != 1 else ''}) | "
         f"vision encode: {out.vision_seconds:.3f} s | prefill: {out.prefill_seconds:.3f} s | "
         f"decode: {n_new} tokens, {out.decode_tokens_per_second:.1f} tokens/s | "
         f"peak memory: {out.peak_memory_bytes / 2**20:.0f} MiB ({device.type}) | "
         f"attention: {_attention_line(out.extra.get('attention', {}))}")
    return 0


def _attention_line(phases: dict[str, str]) -> str:
    """"flash" when one backend served every phase that ran, else "vision flash, prefill flash, decode vita"."""
    ran = {p: b for p, b in phases.items() if b != "none"}
    if not ran:
        return "none"
    if len(set(ran.values())) == 1:
        return next(iter(ran.values()))
    return ", ".join(f"{p} {b}" for p, b in ran.items())


def cmd_serve(args) -> int:
    try:
        from vita_ext.serve import ServeOptions, serve
    except ImportError as exc:
        raise ValueError(f"vita-ext serve needs the server packages ({exc.name} is missing): "
                         f"pip install 'vita_ext[serve]'") from exc
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else
                                      "vita-ext-default")
    options = ServeOptions(host=args.host, port=args.port, model_name=name,
                           api_key=args.api_key or os.environ.get("VITA_EXT_API_KEY") or None,
                           media_root=args.media_root, max_model_len=args.max_model_len, max_frames=args.max_frames,
                           max_tiles=args.max_tiles, max_queue=args.max_queue, max_body_mb=args.max_body_mb,
                           cp_timeout=args.cp_timeout, log_level=args.log_level, access_log=not args.no_access_log)
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise FileNotFoundError(f"--media-root {args.media_root}: no such directory")
    if not args.context_parallel:
        device = _device(args.device)
        model, processor, gen_cfg = _load(args, device, _dtype(args.dtype, device))
        return serve(model, processor, gen_cfg, options)
    from vita_ext.parallel import init_distributed, shutdown_distributed

    device = init_distributed(args.cp_timeout)
    try:
        model, processor, gen_cfg = _load(args, device, _dtype(args.dtype, device))
        return serve(model, processor, gen_cfg, options, context_parallel=True)
    finally:
        shutdown_distributed()


def cmd_random_checkpoint(args) -> int:
    from vita_ext.model.checkpoint import write_random_checkpoint
    from vita_ext.model.config import MAX_LAYERS, LongVITAConfig
    from vita_ext.model.presets import PRESETS

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"random-checkpoint {args.out}: exists and is not a directory")
    _positive(args.layers, "--layers", MAX_LAYERS)
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    if args.config:
        config = LongVITAConfig.from_pretrained(args.config)
    else:
        config = PRESETS[args.preset]()
    if args.layers is not None:
        config.text.num_hidden_layers = args.layers
    dtype = _dtype(args.dtype, torch.device("cpu"))
    path = write_random_checkpoint(args.out, config, dtype=dtype, seed=args.seed,
                                   max_shard_bytes=int(args.max_shard_gb * 1024**3))
    _log(f"wrote a random-weight checkpoint ({args.preset if not args.config else args.config}, {dtype}) to {path}")
    return 0


def cmd_train(args) -> int:
    from vita_ext.train import Trainer, resolve_config
    from vita_ext.train.config import FIELDS

    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = resolve_config(given, args.config)
    if not cfg.context_parallel:
        Trainer(cfg).train()
        return 0
    from vita_ext.parallel import init_distributed

    init_distributed()

    def run() -> int:
        trainer = agree(None, Trainer, cfg)  # every rank's model, data and settings, before any collective
        trainer.train()
        return 0

    return _together(run)


def cmd_plot_train(args) -> int:
    from vita_ext.train.plot import plot_runs

    out = plot_runs(args.runs, args.out, args.label or None, args.smooth)
    _log(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vita-ext", description="Long-VITA inference and training with vita_ext kernels")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images / a video")
    g.add_argument("--model", help="checkpoint directory (HF release layout); default: the embedded tiny model")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    g.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file, animated GIF or directory of frames (repeatable)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the question; <image>/<video> tags place the media")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="read the prompt from a UTF-8 file (- for stdin), for prompts too long for a command line")
    g.add_argument("--max-frames", type=int, default=None,
                   help=f"frames sampled per video (default 128, at most {MAX_FRAMES})")
    g.add_argument("--max-tiles", type=int, default=None, help=f"448-px tiles per image (default 12, at most {MAX_TILES})")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--context-parallel", action="store_true",
                   help="shard the prompt over the ranks of torchrun (ring attention, sharded KV cache)")
    g.add_argument("--cp-timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (POST /v1/chat/completions)",
                       description="Serve the model over HTTP with the OpenAI chat-completions API, one request at "
                                   "a time in arrival order. Under `torchrun --nproc-per-node P -m vita_ext serve "
                                   "--context-parallel`, rank 0 serves and every rank runs each request.")
    s.add_argument("--model", help="checkpoint directory (HF release layout); default: the embedded tiny model")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: the checkpoint directory's name; "
                        "vita-ext-default for the embedded model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $VITA_EXT_API_KEY, else none)")
    s.add_argument("--media-root", default=None,
                   help="read request paths only under this directory (default: any path the server can read)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + new tokens limit (default: the model's max_position_embeddings)")
    s.add_argument("--max-frames", type=int, default=128, help="frames sampled per video, and the most a request "
                                                                 "may ask for (default 128)")
    s.add_argument("--max-tiles", type=int, default=12, help="448-px tiles per image, and the most a request may "
                                                             "ask for (default 12)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, MiB (default 64; 413 past it)")
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    s.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    s.add_argument("--context-parallel", action="store_true",
                   help="run every request over the ranks of torchrun (rank 0 serves HTTP)")
    s.add_argument("--cp-timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--no-access-log", action="store_true", help="no line per HTTP request")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("random-checkpoint", help="write a seeded random-weight checkpoint in the release layout")
    r.add_argument("out", help="output directory")
    r.add_argument("--preset", default="tiny", choices=["tiny", "long-vita-14b"])
    r.add_argument("--config", default=None, help="a config.json to use instead of a preset")
    r.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-shard-gb", type=float, default=4.0)
    r.set_defaults(func=cmd_random_checkpoint)

    from vita_ext.train.config import add_arguments

    t = sub.add_parser("train", help="train one Long-VITA stage on JSONL conversations",
                       description="Train one stage of Long-VITA's recipe. Settings: the --stage preset, then "
                                   "--config FILE (YAML/JSON), then flags (flags win).")
    add_arguments(t)
    t.set_defaults(func=cmd_train)

    pt = sub.add_parser("plot-train", help="draw training loss curves to a PNG")
    pt.add_argument("runs", nargs="+", help="output directories or metrics.jsonl/.csv files (drawn in sequence)")
    pt.add_argument("--out", required=True, help="PNG file to write")
    pt.add_argument("--label", action="append", default=[], help="legend label per run (repeatable)")
    pt.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1 = off)")
    pt.set_defaults(func=cmd_plot_train)
    return p


class _OneLineWarnings:
    """Show warnings as one line each ("vita-ext: warning: ..."), through tqdm so that a progress bar
    stays intact; bad training records say "[vita-ext train] warning:" as before."""

    def __enter__(self):
        self.saved = warnings.showwarning
        warnings.showwarning = self.show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self.saved

    @staticmethod
    def show(message, category, filename, lineno, file=None, line=None):
        from tqdm.auto import tqdm

        from vita_ext.train.data import BadRecordWarning

        prefix = "[vita-ext train] warning" if issubclass(category, BadRecordWarning) else "vita-ext: warning"
        tqdm.write(f"{prefix}: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _OneLineWarnings():
            return args.func(args)
    except RankFailure as exc:  # every rank agreed on it
        print(f"vita-ext: error: {exc.reason}", file=sys.stderr)
        return exc.exit_code
    except USER_ERRORS as exc:
        print(f"vita-ext: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nvita-ext: interrupted", file=sys.stderr)
        return 130
