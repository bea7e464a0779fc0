"""Acceptance length of trained drafters on held-out prompts (in-process engine, `single:NAME`).

    python -m training.evaluate --drafters random math chat --domains math chat --n 5 --max-new-tokens 64

`random` is a random-init drafter (the baseline). Prompts come from the held-out dev sets
eval/prompts/{gsm_symbolic,mtbench,sharegpt_code}.jsonl for math/chat/code (or eval/prompts/<domain>.jsonl),
else from held-out slices: gsm_symbolic seed 7 and every 10th ShareGPT conversation.
Mean acceptance length = emitted tokens / verifier steps over all prompts (bonus token included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def heldout_prompts(domain: str, n: int) -> list[list[dict]]:
    root = Path(__file__).resolve().parents[1]
    files = {"math": "gsm_symbolic", "chat": "mtbench", "code": "sharegpt_code"}  # the held-out dev sets
    f = root / "eval" / "prompts" / f"{files.get(domain, domain)}.jsonl"
    if f.exists():
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()][:n]
        out = []
        for r in rows:
            if "messages" in r:
                msgs = r["messages"]
                first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
                out.append(msgs[:first])
            else:
                out.append([{"role": "user", "content": r.get("prompt") or r.get("question") or r["text"]}])
        return out
    if domain == "math":
        import reasoning_gym as rg

        return [[{"role": "user", "content": x["question"]}] for x in rg.create_dataset("gsm_symbolic", size=n, seed=7)]
    from training.distill import _sharegpt_iter
    import re

    code_re = re.compile(r"```|\bdef |\bimport |#include|\bfunction\b|\bclass \w+[:(]")
    out = []
    for i, conv in enumerate(_sharegpt_iter()):
        turns = conv.get("conversations") or []
        if i % 10 != 9 or len(turns) < 2 or turns[0].get("from") != "human":
            continue
        q = turns[0]["value"].strip()
        if not q or len(q) > 1000 or (domain == "code") != bool(code_re.search(q + turns[1]["value"])):
            continue
        out.append([{"role": "user", "content": q}])
        if len(out) >= n:
            break
    return out


def evaluate(drafters: list[str], domains: list[str], n: int = 5, max_new_tokens: int = 64,
             verifier: str | None = None, dtype: str = "float32") -> dict:
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.runtime import build_engine, load_default_verifier

    v = load_default_verifier(verifier, dtype=dtype)
    engine, info = build_engine(v, drafters, TreeConfig())
    results: dict = {"tree": vars(TreeConfig()) if hasattr(TreeConfig(), "__dict__") else {}, "drafters": info,
                     "acceptance_length": {}, "n": n, "max_new_tokens": max_new_tokens}
    for dom in domains:
        prompts = heldout_prompts(dom, n)
        for name in (d.split("=", 1)[0] for d in drafters):  # NAME or NAME=PATH
            steps = tokens = 0
            for msgs in prompts:
                res = engine.generate(v.encode_chat(msgs), parse_strategy(f"single:{name}", [name]),
                                      SamplingConfig(temperature=0.0), max_new_tokens)
                steps += res.stats.steps
                tokens += res.stats.step_tokens
            tau = tokens / steps if steps else 0.0
            results["acceptance_length"].setdefault(dom, {})[name] = round(tau, 3)
            print(f"{dom:6s} single:{name:12s} acceptance_length {tau:.3f} ({len(prompts)} prompts)", flush=True)
    return results


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="acceptance length of drafters on held-out prompts")
    ap.add_argument("--drafters", nargs="+", help="shipped names, NAME=PATH, or `random`")
    ap.add_argument("--cards", nargs="+", metavar="DIR",
                    help="instead of evaluating: write DIR/README.md (model card) for these drafter directories "
                         "from `taps eval` / eval.report result JSON (--rows)")
    ap.add_argument("--rows", nargs="*", default=[], metavar="JSON", help="with --cards: result files (rows)")
    ap.add_argument("--source", default="", help="with --cards: where the rows come from (printed on the card)")
    ap.add_argument("--domains", nargs="+", default=["math", "chat"])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--verifier", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    if args.cards:
        rows = [r for f in args.rows for r in json.loads(Path(f).read_text())["rows"]]
        for d in args.cards:
            print(write_model_card(d, eval_rows=rows, source=args.source))
        return 0
    if not args.drafters:
        ap.error("--drafters is required (or --cards)")
    import torch

    torch.set_num_threads(args.threads)
    res = evaluate(args.drafters, args.domains, args.n, args.max_new_tokens, args.verifier)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res["acceptance_length"]))
    return 0



_SETUP = ("bash scripts/train_drafters.sh {cfg}   # all of it: data, self-distillation, token map, training "
          "(one process; TRAIN_LOCAL=0 submits Ray jobs instead)")
_JOB = ("# the training step alone, as a Ray job: RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 "
        "--working-dir . -- python training/train_drafter.py --config training/configs/{last}.yaml --root $PWD")
COMMANDS = {
    **{name: [_SETUP.format(cfg=cfg), _JOB.format(last=cfg.split()[-1])] for name, cfg in (
        ("math", "math_eagle2 math_big_eagle2"), ("chat", "chat_eagle2 chat_big_eagle2"), ("mixed", "mixed_eagle2"), ("math_hass", "math_hass"),
        ("chat_hass", "chat_hass"), ("mixed_hass", "mixed_hass"), ("math_text", "math_text_eagle2"), ("code", "code_eagle2"))},
    "averaged": ["python -m training.average --inputs drafters/math drafters/chat --weights 0.5 0.5 "
                 "--out drafters/averaged --name averaged"],
    "averaged_hass": ["python -m training.average --inputs drafters/math_hass drafters/chat_hass --weights 0.5 0.5 "
                      "--out drafters/averaged_hass --name averaged_hass"],
}

NOTES = {  # how a drafter's budget was spent, for the Reproduce section of its card
    "math": "EAGLE-2 in two stages. (1) The small recipe: 2,520 s (time_budget_s) on 1,280 self-distilled math "
            "conversations, the 512 of math_distilled.jsonl (also in mixed) + 768 more (math_more_distilled.jsonl); the "
            "script first makes runs/drafters/math_420 (420 s on the first 512), where math_hass starts. (2) The big "
            "recipe (math_big_eagle2): continued from (1) for 1,500 s (bf16 compute, 5,100 steps) on the first 2,560 "
            "of 3,840 conversations self-distilled at batch 64, with the 8,192-token map of math and chat big data "
            "(docs/training.md, At scale; learning curve docs/learning_curves.png).",
    "chat": "EAGLE-2 in two stages. (1) The small recipe: a first 420 s session (runs/drafters/chat_420, where "
            "chat_hass starts), resumed to 2,520 s of training in all on 320 ShareGPT first exchanges. (2) The big "
            "recipe (chat_big_eagle2): continued from (1) for 1,500 s (bf16 compute, 5,000 steps) on 2,255 of 2,304 "
            "ShareGPT first exchanges self-distilled at batch 64 (those that fit max_len), with the shared big "
            "8,192-token map (docs/training.md, At scale).",
    "mixed": "EAGLE-2, 2,520 s of training in all (sessions of 840 s, each resuming the last) on the 512 math + "
             "320 chat conversations; wall time above is the last session's.",
    "math_hass": "Fine-tunes the drafter of math's first 420 s session (runs/drafters/math_420, made by "
                 "the math_eagle2 run of the script) for 420 s with the HASS objective.",
    "chat_hass": "Fine-tunes the drafter of chat's first 420 s session (runs/drafters/chat_420) for 420 s "
                 "with the HASS objective.",
    "mixed_hass": "Fine-tunes runs/drafters/mixed_420 (420 s of the mixed EAGLE-2 recipe) for 420 s with "
                  "the HASS objective.",
    "code": "EAGLE-2, a 2,520 s budget (it stops early at 30 epochs) on 320 self-distilled ShareGPT first turns "
            "that contain code, 128 (code_distilled.jsonl) + 192 more (code_more_distilled.jsonl) (training/data "
            "split: sha256 of the conversation id, so no eval/prompts/sharegpt_code.jsonl prompt is trained on); "
            "its own 8,192-token map.",
    "math_text": "The same 512 math prompts as math_420 / mixed, but the datasets' written answers instead of the "
                 "verifier's (the paper's setting); 840 s of EAGLE-2 (two 420 s sessions)."}

def _data_kind(data: dict) -> str:
    """Self-distilled or dataset text, from the conversations (or, for features-only configs such as
    mixed, from the features' manifests, which name the conversations they were extracted from)."""
    sources = list(data.get("conversations") or [])
    for f in data.get("features") or []:
        m = Path(f) / "manifest.json"
        if m.exists():
            sources += json.loads(m.read_text()).get("source", {}).get("conversations", [])
    if not sources:
        return "precomputed features"
    if all("distilled" in str(x) for x in sources):
        return "self-distilled: assistant turns regenerated by the verifier, greedy"
    return "dataset text: the answers as the datasets wrote them"


def write_model_card(directory: str | Path, results: dict | None = None, eval_rows: list[dict] | None = None,
                     source: str = "") -> Path:
    """drafters/<name>/README.md from drafter.json (+ measured acceptance lengths).

    `results`: this module's evaluate() output; `eval_rows`: `taps eval` result rows (e.g. the report's
    docs/results/*.json), of which the `single:<name>` rows are tabulated; `source` names their file."""
    directory = Path(directory)
    cfg = json.loads((directory / "drafter.json").read_text())
    tr = cfg.get("training", {})
    name = cfg["name"]
    lines = [f"# Drafter `{name}`", "",
             f"- verifier: {cfg['verifier']['name']} (hidden {cfg['verifier']['hidden_size']}, "
             f"vocab {cfg['verifier']['vocab_size']})",
             f"- objective: {cfg['objective']}; domain: {cfg['domain']}; draft vocabulary: "
             f"{cfg['draft_vocab_size'] or 'full (verifier lm_head)'}; decoder layers: {cfg.get('num_layers', 1)}"]
    if "averaged_from" in tr:
        lines.append("- averaged from: " + ", ".join(f"{x['name']} (w={x['weight']})" for x in tr["averaged_from"]))
    else:
        lines += [f"- data: {', '.join(tr.get('data', {}).get('conversations') or tr.get('data', {}).get('features') or [])}"
                  f" ({tr.get('sequences')} sequences, {tr.get('tokens')} tokens, {tr.get('assistant_tokens')} "
                  f"assistant tokens; " + _data_kind(tr.get("data", {})) + ")",
                  f"- steps: {tr.get('steps')} ({tr.get('epochs')} epochs), {tr.get('workers')} worker(s) x micro batch "
                  f"{tr.get('micro_batch')}, max_len {tr.get('max_len')}; wall time {tr.get('wall_time_s')} s (CPU)"
                  + (f", {tr['train_time_s']} s of training in all sessions" if tr.get("train_time_s") else ""),
                  f"- final loss {tr.get('final_loss')}, top-1 agreement with the verifier on training positions "
                  f"{tr.get('final_acc')}"]
    results_dir = Path(__file__).resolve().parents[1] / "docs" / "results"
    held = []  # training.curve --agreement over every shipped drafter, per dev domain
    for f in sorted(results_dir.glob("agreement_all_*.json")):
        a = json.loads(f.read_text())
        if name in a.get("top1_agreement", {}):
            held.append(f"{a['domain']} {a['top1_agreement'][name]:.3f} ({a['positions']} positions)")
    if held:
        lines.append("- top-1 agreement with the verifier on held-out self-distilled text (its greedy answers to "
                     "the dev-slice prompts of each domain, docs/results/agreement_all_*.json): " + ", ".join(held))
    agree = results_dir / f"agreement_{name}.json"
    if agree.exists():  # training.curve --agreement, written when the drafter shipped
        a = json.loads(agree.read_text())
        lines.append(f"- top-1 agreement with the verifier on held-out self-distilled text (its greedy answers to "
                     f"the {a['prompts']} {a['domain']} dev-slice prompts, {a['positions']} positions; "
                     f"docs/results/{agree.name}): {a['top1_agreement']['new']:.3f} (the drafter it replaced: "
                     f"{a['top1_agreement']['shipped']:.3f})")
    if results:
        lines += ["", f"Acceptance length (`python -m training.evaluate`, single:NAME, temperature 0, "
                  f"{results.get('max_new_tokens', 64)} new tokens, default tree depth 5 / top-k 4 / 16 nodes, "
                  f"{results.get('n', '?')} held-out prompts per domain: math = gsm_symbolic, chat = MT-Bench first "
                  "turn, code = sharegpt_code):", "",
                  "| prompts | " + name + " | random-init |", "| --- | --- | --- |"]
        for dom, row in results["acceptance_length"].items():
            if name in row:
                lines.append(f"| {dom} | {row[name]} | {row.get('random', '-')} |")
    mine = [r for r in eval_rows or [] if r.get("strategy") == f"single:{name}"]
    if mine:
        none = {(r["dataset"], r["temperature"]): r for r in eval_rows if r.get("strategy") == "none"}
        lines += ["", f"Measured with `taps eval` (held-out dev prompts, {source or 'report run'}; default tree "
                  "depth 5 / top-k 4 / 16 nodes):", "",
                  "| dataset | temperature | prompts | acceptance length [95% CI] | tokens/s vs none |",
                  "| --- | --- | --- | --- | --- |"]
        for r in mine:
            sp, ci = r.get("speedup_vs_none"), r.get("acceptance_ci")
            ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            lines.append(f"| {r['dataset']} | {r['temperature']} | {r['n_prompts']} | {r['acceptance_length']:.2f}{ci} | "
                         f"{'-' if sp is None else f'{sp:.2f}x'} |")
    lines += ["", "Reproduce:" + (f" {NOTES[name]}" if name in NOTES else ""), "", "```"] + COMMANDS.get(name, []) + \
        ["```", ""]
    root = str(Path(__file__).resolve().parents[1]) + "/"
    out = directory / "README.md"
    out.write_text("\n".join(lines).replace(root, ""))
    return out


if __name__ == "__main__":
    sys.exit(cli())
