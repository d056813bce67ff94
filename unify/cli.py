"""The `unify` command (also `python -m unify`): build, inspect and evaluate united-expert checkpoints.

`unify build` only turns its flags into `unify.build.BuildOptions`; the recipe defaults, method parameters and skipped
layers are resolved by `unify.build.build`, so Python callers get the same checkpoint for the same request.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from runtime.errors import BrownoutError

EXAMPLES_BUILD = """examples:
  unify build --model mixtral --groups 4 --out out/mixtral-g4          # recipe name (needs the hub or its cache)
  unify build --model ./Mixtral-8x7B-v0.1 --way 2 --out out/mx-w2      # a local directory
  unify build --model reference --way 4 --grouping frequency --merge distill-routed --out out/ref-w4
  unify build --model ./m --way 2 --merge distill --merge-param init=average --steps 300 --device cuda \\
      --calib my.txt --out out/m-distill
"""


def _method_params_help() -> str:
    from .grouping import GROUPINGS
    from .merge import MERGES

    lines = ["method parameters (--grouping-param / --merge-param KEY=VALUE, repeatable; defaults shown):"]
    for registry in (GROUPINGS, MERGES):
        for name in registry.names():
            params = registry.get(name).param_lines() or ["no parameters"]
            head = f"  {registry.kind} {name}"
            lines += [f"{head:26s}{params[0]}"] + [f"{'':26s}{p}" for p in params[1:]]
    return "\n".join(lines) + "\n"


def _key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """['k=v', ...] -> {k: v}; the values stay text, converted by the method's parameter types."""
    out: dict[str, str] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise BrownoutError(f"{flag} {item!r}: expected KEY=VALUE")
        if key.strip() in out:
            raise BrownoutError(f"{flag} {key.strip()} is given twice")
        out[key.strip()] = value.strip()
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage it would print first is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .build import DEFAULT_SEQ_LEN
    from .calibration import MIN_CALIB_TOKENS
    from .grouping import GROUPINGS
    from .merge import MERGES

    p = _Parser(prog="unify", description="Brownout's offline tool: combine the experts of each MoE layer into fewer "
                "united experts, and evaluate the result.")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build a united-expert checkpoint",
                       epilog=EXAMPLES_BUILD + "\n" + _method_params_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Calibrate, group and merge the experts of every MoE layer, layer by layer from "
                       "the safetensors shards, and write united.safetensors + united.json to --out.")
    b.add_argument("--model", required=True, help="recipe name (see `unify inspect --recipes`), local model directory or hub id")
    size = b.add_argument_group("group size (at most one; default: the recipe's way)")
    size.add_argument("--way", type=int, metavar="K", help="K experts per group (the paper's K-way), a divisor of the "
                      "layer's expert count")
    size.add_argument("--groups", type=int, metavar="N", help="N groups per layer, a divisor of the expert count")
    b.add_argument("--grouping", default=None, choices=GROUPINGS.names(),
                   help="which experts share a united expert (default: the recipe's, else consecutive)")
    b.add_argument("--merge", default=None, choices=MERGES.names(),
                   help="how a group becomes one expert (default: the recipe's, else average)")
    b.add_argument("--grouping-param", action="append", metavar="KEY=VALUE",
                   help="a parameter of the grouping method (repeatable; listed below)")
    b.add_argument("--merge-param", action="append", metavar="KEY=VALUE",
                   help="a parameter of the merge method (repeatable; listed below)")
    b.add_argument("--out", required=True, help="output directory: must not exist, unless --overwrite; written "
                   "beside it and put in place atomically")
    b.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a previous united checkpoint (anything else is refused)")
    c = b.add_argument_group("calibration")
    c.add_argument("--calib", help="a UTF-8 text file (judged by its content, whatever its name), a local "
                   ".json/.jsonl/.csv/.parquet file or dataset directory, or a hub dataset name (default: the "
                   "recipe's sample, else the bundled one). Read only as far as --calib-tokens needs")
    c.add_argument("--calib-split", default="train", help="dataset split (default train)")
    c.add_argument("--calib-column", default="text", help="dataset column holding the text (default text)")
    c.add_argument("--calib-tokens", type=int, default=16384, metavar="N",
                   help=f"calibration tokens, >= {MIN_CALIB_TOKENS}: with fewer, many experts of a layer with dozens "
                   "of them get no routed token at all (default 16384)")
    c.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help=f"tokens per calibration sequence, 1 to the model's max positions (default {DEFAULT_SEQ_LEN}, "
                   "or the model's max positions if fewer)")
    c.add_argument("--samples-per-layer", type=int, default=4096, metavar="N",
                   help="tokens kept per layer for activation-guided methods, >= 1 (default 4096)")
    t = b.add_argument_group("training-based merges (distill, distill-routed)")
    t.add_argument("--steps", type=int, metavar="N", help="Adam steps, >= 1: shortcut for --merge-param steps=N")
    t.add_argument("--lr", type=float, metavar="X", help="learning rate, > 0: shortcut for --merge-param lr=X")
    b.add_argument("--device", default="cpu",
                   help="device for merging: cpu, cuda or cuda:N (refused when this machine or torch has none)")
    b.add_argument("--skip-layers", type=_layer_list, default=None,
                   help="comma-separated decoder layers to leave alone, applied as given (each in -L..L-1 for L "
                   "decoder layers; negative = from the end; '' = none). Default: the recipe's list, from the "
                   "outside in, keeping at least half the MoE layers united")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", help="describe a united checkpoint (or list recipes)",
                       description="Print base model, method, groups per layer and sizes of a united checkpoint.")
    i.add_argument("path", nargs="?", help="united checkpoint directory")
    i.add_argument("--recipes", action="store_true", help="list the bundled recipes")
    i.add_argument("--json", action="store_true", help="print united.json as it is")

    e = sub.add_parser("eval", help="lm-eval accuracy of a model with a united tier over brownout ratios",
                       description="Runs lm-eval for each brownout ratio and writes results.json, results.md and results.png.")
    from .evaluate import add_arguments

    add_arguments(e)
    from .sensitivity import add_parser as add_sensitivity_parser

    add_sensitivity_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 for a user-facing failure (one line on stderr; argparse's own errors too), 130 for Ctrl-C.
    Anything else is a bug and keeps its traceback."""
    try:
        args = _parser().parse_args(argv)
        rc = _run(args)
        sys.stdout.flush()  # a reader that went away (`| head -1`) shows here, not in the interpreter's last flush
        return rc
    except BrownoutError as e:
        print(f"unify: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unify: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # some other pipe: a bug, not the reader leaving
        # the reader has what it wanted: stop quietly, with stdout on devnull so the interpreter's flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2


def _run(args) -> int:
    if args.cmd == "build":
        return _build(args)
    if args.cmd == "inspect":
        return _inspect(args)
    if args.cmd == "sensitivity":
        from .sensitivity import run_cli

        return run_cli(args)
    from .evaluate import run_eval_cli

    return run_eval_cli(args)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has closed it."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: trust the exception
        return True


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _build(args) -> int:
    from .build import BuildOptions, build

    merge_params: dict = _key_values(args.merge_param, "--merge-param")
    for key, value in (("steps", args.steps), ("lr", args.lr)):  # shortcuts for the training merges' parameters
        if value is not None:
            if key in merge_params:
                raise BrownoutError(f"--{key} and --merge-param {key}=... both given; give one")
            merge_params[key] = value
    opts = BuildOptions(
        out=args.out, way=args.way, groups=args.groups, grouping=args.grouping, merge=args.merge,
        grouping_params=_key_values(args.grouping_param, "--grouping-param"), merge_params=merge_params,
        calib=args.calib, calib_split=args.calib_split, calib_column=args.calib_column, calib_tokens=args.calib_tokens,
        seq_len=args.seq_len, samples_per_layer=args.samples_per_layer, device=args.device, seed=args.seed,
        overwrite=args.overwrite, skip_layers=args.skip_layers, progress=not args.quiet,
    )
    out = build(args.model, opts)
    print(f"wrote {out}")
    return 0


def _inspect(args) -> int:
    import recipes

    if args.recipes or not args.path:
        for n in recipes.names():
            r = recipes.load(n)
            print(f"{n:12s} {r.hub_id or r.path}  (model_type {r.model_type}, skip_layers {list(r.skip_layers)})")
        return 0
    from runtime.checkpoint import UnitedCheckpoint

    ck = UnitedCheckpoint(args.path)
    m = ck.meta
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    bm = m["base_model"]
    total = 0
    for layer in ck.layers:
        total += sum(t.numel() * t.element_size() for k, t in ck.tensors(layer).items() if k != "expert_to_group")
    print(f"base model : {bm['name']} ({bm['model_type']}, config {bm['config_hash']})")
    print(f"method     : grouping={m['grouping']} merge={m['merge']} way={m['way']} ({m['num_groups']} groups of {bm['num_experts']} experts)")
    opts = m.get("options", {})
    params = [f"{kind} {k}={str(v).lower() if isinstance(v, bool) else v}"
              for kind in ("grouping", "merge") for k, v in (opts.get(f"{kind}_params") or {}).items()]
    if params:
        print(f"parameters : {', '.join(params)}")
    print(f"layers     : {len(ck.layers)} united, left alone: {m['skip_layers'] or 'none'}")
    print(f"size       : {total / 2**20:.2f} MiB of united experts")
    print(f"built by   : brownout {m['tool_version']} in {m['build_seconds']} s: {m['command']}")
    for layer in ck.layers:
        lm = ck.layer_meta(layer)
        print(f"  layer {layer:3d}: " + " ".join("[" + ",".join(map(str, g)) + "]" for g in lm["groups"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
