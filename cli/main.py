"""The `taps` command line (CONTRACTS.md), the console script `taps` (also `python -m cli`).
Subcommands that need the cluster or the evaluation import `cluster` / `eval` lazily, so
`taps generate` stays a plain in-process PyTorch run over the core package `taps`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from taps.config import ConfigError, SamplingConfig, TreeConfig

log = logging.getLogger("taps")


def _add_model_args(p: argparse.ArgumentParser, serving: bool = False) -> None:
    """serving: every model default is None (the --config file's value, else cluster.config.AppConfig's),
    so that a flag given on the command line always wins over the file."""
    dflt = (lambda v: None) if serving else (lambda v: v)
    p.add_argument("--verifier", default=None, help="HF Llama dir, .gguf file or hub id (default: shipped SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", "--engine", dest="dtype", default=dflt("float32"),
                   choices=["float32", "bfloat16", "float16", "int8", "int8-avx2", "w8a8-avx2", "auto"],
                   help="verifier engine. float32: exact mode, token-identical to float32 `none` (the default of "
                        "generate and eval). bfloat16: fast mode, each token still the verifier's argmax in its own "
                        "forward, may differ from float32 `none` at near-ties. int8 / int8-avx2: weight-only int8 "
                        "linears (torch's kernel / this project's AVX2 kernel, taps/kernels), a quantized target model "
                        "of its own, fast mode. w8a8-avx2: the same int8 weights, each matmul's input rows quantised "
                        "to int8 too (blocks of 32, as llama.cpp does), integer dot products; fast mode. auto (the serving default): whichever of these runs a whole verifier "
                        "forward fastest here, measured at start-up (float32 unless another wins by 10%%)")
    p.add_argument("--drafter-dtype", default=dflt("auto"),
                   choices=["float32", "bfloat16", "float16", "int8", "int8-avx2", "w8a8-avx2", "auto"],
                   help="drafter compute dtype; int8: weight-only int8 linears with bf16 activations; int8-avx2: the "
                        "same weights on this project's AVX2 kernel, float32 activations; w8a8-avx2: its int8-activation "
                        "kernel; auto (default): the fastest "
                        "of these for each drafter, timed at start-up; never affects the output")
    p.add_argument("--drafter-dir", default=None, help="folder of drafter checkpoints (default: the shipped drafters/)")
    p.add_argument("--tree-depth", type=int, default=dflt(5), help="draft tree depth (default 5)")
    p.add_argument("--tree-top-k", type=int, default=dflt(4), help="children expanded per node (default 4)")
    p.add_argument("--tree-tokens", type=int, default=dflt(16),
                   help="tree size per drafter per step, root included (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")


def _add_tree_mode_arg(p: argparse.ArgumentParser, default: str | None = "fixed") -> None:
    p.add_argument("--tree", default=default, choices=["fixed", "auto"],
                   help="fixed: the --tree-* sizes every step; auto: per strategy, the tree size (or no draft) "
                        "that maximises measured tokens/s, from a cost model timed at start-up (taps.adaptive)")


def _tree(args) -> TreeConfig:
    return TreeConfig(depth=args.tree_depth, top_k=args.tree_top_k, total_tokens=args.tree_tokens)


def _drafter_names(args) -> list[str]:
    from taps.runtime import shipped_drafters

    if args.drafters:
        return [d.strip() for d in args.drafters.split(",") if d.strip()]
    shipped = shipped_drafters(args.drafter_dir)
    if not shipped or {"math", "chat"} <= set(shipped):
        return ["math", "chat"]  # the paper's pair (random-init, labelled, when none is shipped)
    return shipped


def cmd_generate(args) -> int:
    import torch

    from taps.compose import parse_strategy
    from taps.runtime import build_engine, load_default_verifier, parse_drafter_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.prompt or not args.prompt.strip():
        raise ConfigError("--prompt is empty")
    entries = {e.split("=", 1)[0].strip(): e for e in _drafter_names(args)}
    strategy = parse_strategy(args.strategy, list(entries) if args.strategy != "none" else [])
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    tree = _tree(args)
    verifier = load_default_verifier(args.verifier, args.dtype)
    needed = [entries.get(name, name) for name in strategy.drafters]
    engine, info = build_engine(verifier, needed, tree, args.drafter_dir, max_len=args.max_len,
                                drafter_dtype=parse_drafter_dtype(args.drafter_dtype))
    if getattr(args, "tree", "fixed") == "auto":
        from taps.adaptive import attach_auto_policies

        attach_auto_policies(engine, verifier.model, [strategy])
    if args.raw:
        prompt_ids = verifier.tokenizer.encode(args.prompt)
    else:
        prompt_ids = verifier.encode_chat([{"role": "user", "content": args.prompt}])
    result = engine.generate(prompt_ids, strategy, sampling, args.max_new_tokens)
    text = verifier.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "token_ids": result.token_ids, "stats": result.stats.to_dict(),
                          "drafters": info}))
    else:
        print(text)
        s = result.stats
        untrained = [n for n, d in info.items() if not d["trained"]]
        print(f"\n[{s.strategy}] {s.new_tokens} tokens in {s.total_s:.2f}s "
              f"({s.new_tokens / max(s.total_s, 1e-9):.1f} tok/s), acceptance length {s.acceptance_length:.2f}"
              + (f"; RANDOM-INIT drafters: {', '.join(untrained)}" if untrained else ""), file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from cluster.serve import main as serve_main

    return serve_main(args)


def cmd_drafters(args) -> int:
    from cluster.admin import main as admin_main

    return admin_main(args)


def cmd_eval(args) -> int:
    from eval.run import main as eval_main

    return eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="taps", description="TAPS-Serve: task-aware multi-drafter speculative decoding")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode one prompt in-process (no cluster)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--strategy", default="merged", help="none | single:NAME | confidence | entropy | merged")
    g.add_argument("--drafters", default=None, help="comma-separated drafter names or NAME=PATH (default: shipped)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--max-len", type=int, default=2048, help="verifier context window used (prompt + output)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help='print {"text", "token_ids", "stats"} as JSON')
    _add_tree_mode_arg(g)
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="start the local cluster and serve the OpenAI-compatible HTTP API")
    s.add_argument("--config", default=None, help="YAML/JSON app config (same args as the Serve config)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (env TAPS_API_KEY)")
    s.add_argument("--admin-key", default=None, help="guard drafter admin routes (env TAPS_ADMIN_KEY)")
    s.add_argument("--drafters", default=None, help="drafters to start (default: shipped)")
    _add_tree_mode_arg(s, default=None)  # serve: learnt from the router's step times (config tree.mode)
    _add_model_args(s, serving=True)
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("drafters", help="list, add or remove drafters of a running server")
    d.add_argument("action", choices=["list", "add", "remove"])
    d.add_argument("--name", default=None)
    d.add_argument("--checkpoint", default=None)
    d.add_argument("--replicas", type=int, default=1)
    d.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    d.add_argument("--admin-key", default=None, help="admin key (env TAPS_ADMIN_KEY)")
    d.set_defaults(func=cmd_drafters)

    e = sub.add_parser("eval", help="acceptance length and speed of strategies over prompt files")
    e.add_argument("--prompts", action="append", required=True, help="JSONL prompt file (repeatable)")
    e.add_argument("--strategies", required=True, help="comma-separated strategies")
    e.add_argument("--drafters", default=None)
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--temperature", type=float, action="append", default=None,
                   help="repeatable; default 0")
    e.add_argument("--limit", type=int, default=None, help="prompts per file")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=int, default=1,
                   help="prompts of a set decoded concurrently (batched verification); tokens/s is then the "
                        "aggregate of the group, acceptance is unchanged (default 1: single-stream)")
    e.add_argument("--out", required=True)
    _add_tree_mode_arg(e)
    _add_model_args(e)
    e.set_defaults(func=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        # Errors a user can fix: one clear line, no traceback (use -v for the full log).
        if args.verbose:
            log.exception("failed")
        print(f"taps {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
