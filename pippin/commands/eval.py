"""`pippin eval SUITE`: run an evaluation suite on one or more systems and write JSON + Markdown + a plot.

  pippin eval ifeval --system pippin:default --system pippin:~/q35 --system pippin:~/q35:recovery --limit 50
  pippin eval summarization --system pippin:default:summarize --judge openai:http://127.0.0.1:8080/v1#judge
  pippin eval preference --system pippin:default:recovery --against pippin:default --judge openai:http://...
  pippin eval judge-agreement --judge pippin:default --limit 100
  pippin eval fidelity --system pippin:~/q35 --system pippin:~/q35:recovery      # against full precision
  pippin eval gate --system pippin:~/q35                                         # exit status 1 if it fails
  pippin eval safety --system pippin:default --judge SPEC                        # the held-out test split (--split)
  pippin eval report --results a/results.json --results b/results.json --out compare/

Replies and judgments are cached in OUT/cache.jsonl (or --cache): rerunning, or resuming after a kill, only
generates what is missing. Items that fail (bad data row, unreachable endpoint, unparseable judge) are listed as
errors in the report and never scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pippin.errors import PippinError
from pippin.eval.tasks import SUITES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "suites:\n" + "\n".join(f"  {k:<16} {v}" for k, v in SUITES.items()) + "\n  report           merge saved results.json files"
    p.add_argument("suite", choices=[*SUITES, "report"], metavar="SUITE", help="one of: " + ", ".join([*SUITES, "report"]))
    p.add_argument(
        "--system",
        action="append",
        default=[],
        metavar="SPEC",
        help="system under test (repeatable): pippin:default, pippin:PATH[:ADAPTER], openai:URL#MODEL",
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="SPEC",
        help="preference: the system to compare against; fidelity, gate: the reference (pippin:default)",
    )
    p.add_argument("--judge", default=None, metavar="SPEC", help="the judge (any system spec)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per data set")
    p.add_argument(
        "--split",
        choices=("test", "train", "all"),
        default="test",
        help="safety: which part of AdvBench and XSTest to evaluate (train feeds the harmlessness reward; default: the held-out test)",
    )
    p.add_argument("--out", default=None, help="output folder (default: eval-runs/SUITE)")
    p.add_argument("--cache", default=None, help="JSONL cache of replies and judgments (default: OUT/cache.jsonl)")
    p.add_argument("--data", default=None, help="folder with the data sets (default: $PIPPIN_EVAL_DATA or ../shared/data)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per engine batch / concurrent HTTP requests")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the suite's default reply length")
    p.add_argument("--temperature", type=float, default=None, help="override the suite's default (greedy for most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-max-new-tokens", type=int, default=512)
    p.add_argument("--judge-retries", type=int, default=2, help="re-asks for an unparseable judge answer")
    p.add_argument(
        "--judge-answers",
        choices=("forced", "free"),
        default="forced",
        help="forced: a pippin judge answers in the suite's verdict format by forced choice (always parseable); "
        "free: it writes freely and the answer is parsed. Endpoint judges always answer freely.",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for pippin models")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=3, help="HTTP retries before an endpoint counts as unreachable")
    p.add_argument("--results", action="append", default=[], help="report: a results.json to merge (repeatable)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")


def default_data_dir() -> Path:
    if env := os.environ.get("PIPPIN_EVAL_DATA"):
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _check(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise PippinError("--limit must be at least 1.")
    if args.batch_size < 1:
        raise PippinError("--batch-size must be at least 1.")
    if args.suite == "report":
        if not args.results:
            raise PippinError("pippin eval report needs --results FILE (once per results.json to merge).")
        return
    if not args.system and not (args.suite == "judge-agreement" and args.judge):
        raise PippinError(f"pippin eval {args.suite} needs --system SPEC (e.g. --system pippin:default).")
    if args.suite in ("mtbench", "preference", "writing") and not args.judge:
        raise PippinError(f"The {args.suite} suite needs --judge SPEC.")
    if args.suite == "preference" and not args.against:
        raise PippinError("The preference suite needs --against SPEC (the system to compare with).")


def _print(result, paths: dict, as_json: bool) -> None:  # noqa: ANN001 - SuiteResult
    from pippin.eval.report import table

    if as_json:
        print(
            json.dumps(
                {
                    "suite": result.suite,
                    "metrics": result.metrics,
                    "errors": result.error_counts(),
                    "files": {k: str(v) for k, v in paths.items()},
                }
            )
        )
    else:
        print(table(result))
        print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))


def run(args: argparse.Namespace) -> int:
    from pippin.engine.sampling import SamplingParams
    from pippin.eval.judges import JudgeConfig
    from pippin.eval.report import load_result, merge_results, write_report
    from pippin.eval.runner import GenerationCache
    from pippin.eval.suite import EvalContext, Split
    from pippin.eval.systems import load_system, parse_spec
    from pippin.eval.tasks import suite_module

    _check(args)
    if args.suite in ("fidelity", "gate") and not args.against:
        args.against = "pippin:default"
    out = Path(args.out or Path("eval-runs") / args.suite)
    if args.suite == "report":
        result = merge_results([load_result(p) for p in args.results])
        _print(result, write_report(result, out, plots=not args.no_plots), args.json)
        return 0
    data = Path(args.data) if args.data else default_data_dir()
    if not data.is_dir():
        raise PippinError(f"No data folder at {data}; pass --data DIR or set PIPPIN_EVAL_DATA.")
    specs = [*args.system, *([args.against] if args.against else []), *([args.judge] if args.judge else [])]
    for s in specs:  # every spec is checked before any model is loaded
        parse_spec(s)
    loaded = {}
    for s in dict.fromkeys(specs):  # one load per distinct spec: a system may also be the judge
        loaded[s] = load_system(s, batch_size=args.batch_size, threads=args.threads, timeout_s=args.timeout, retries=args.retries)
    cache = GenerationCache(args.cache or out / "cache.jsonl")
    ctx = EvalContext(
        systems=[loaded[s] for s in dict.fromkeys(args.system)],
        against=loaded[args.against] if args.against else None,
        judge=loaded[args.judge] if args.judge else None,
        data_dir=data,
        limit=args.limit,
        split=Split(args.split),
        cache=cache,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        judge_config=JudgeConfig(
            params=SamplingParams(max_new_tokens=args.judge_max_new_tokens, temperature=0.0),
            retries=args.judge_retries,
            answers=args.judge_answers,
        ),
        progress=not args.no_progress,
    )
    result = suite_module(args.suite).run(ctx)
    result.settings["cache"] = {"path": str(cache.path), "entries": len(cache), "ignored_lines": cache.n_ignored}
    _print(result, write_report(result, out, plots=not args.no_plots), args.json)
    failed = {k: v for k, v in result.settings.get("failures", {}).items() if v}
    for spec, reasons in failed.items():
        print(f"gate: {spec} fails: " + "; ".join(reasons), file=sys.stderr)
    return 1 if failed else 0
