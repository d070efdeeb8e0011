"""The benchmark suites, one module each, every one with `run(ctx: EvalContext) -> SuiteResult`.

Modules are imported only when their suite runs, so listing the suites (the CLI's help) costs nothing.
"""

from __future__ import annotations

import importlib

from pippin.errors import PippinError

SUITES = {
    "ifeval": "IFEval: 541 verifiable-instruction prompts, strict/loose, prompt/instruction level (no judge)",
    "summarization": "DialogSum + XSum summaries: AFM good/neutral/poor grading by a judge, and ROUGE",
    "safety": "AdvBench violation rate and XSTest over-refusal on their held-out test split, by a judge and by keyword",
    "preference": "side-by-side win/tie/loss against --against on MT-Bench and AlpacaEval, judged in both orders",
    "mtbench": "MT-Bench single-answer grading (1-10) with FastChat's judge prompts, both turns",
    "writing": "EQ-Bench creative-writing prompts scored 0-10 against their criteria by a judge",
    "judge-agreement": "the summary judge against DialSummEval human ratings (Spearman per dimension)",
    "fidelity": "against --against (default full precision): perplexity on 3 domains, KL and top-1 on chat, a chat smoke set",
    "gate": "fidelity + IFEval, pass/fail against the reference (what `make run` may serve); exit status 1 on a fail",
}


def suite_module(name: str):  # noqa: ANN201 - a module with run(ctx)
    if name not in SUITES:
        raise PippinError(f"Unknown suite {name!r}; choose one of {', '.join(SUITES)}.")
    return importlib.import_module(f"pippin.eval.tasks.{name.replace('-', '_')}")
