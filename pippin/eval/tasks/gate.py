"""The quality gate: the fidelity suite plus IFEval, then pass or fail each system against the reference.

A system passes when its top-1 agreement, perplexity on every domain, empty-reply rate and IFEval prompt-level
strict accuracy are all within `GateConfig`'s bounds of the reference's (`--against`, default full precision).
IFEval runs all 541 prompts at 256 new tokens unless `--limit` / `--max-new-tokens` say otherwise; its replies
are cached, so the reference is generated once. `pippin eval gate` exits with status 1 when a system fails.
"""

from __future__ import annotations

from dataclasses import replace

from pippin.eval.fidelity import FidelityConfig, GateConfig
from pippin.eval.suite import EvalContext, SuiteResult
from pippin.eval.tasks import fidelity, ifeval

IFEVAL_TOKENS = 256


def run(ctx: EvalContext, config: GateConfig | None = None, fidelity_config: FidelityConfig | None = None) -> SuiteResult:
    cfg = config or GateConfig()
    result = fidelity.run(ctx, fidelity_config)
    ref = ctx.against
    systems = [ref, *[s for s in ctx.systems if s is not ref]]
    ife = ifeval.run(replace(ctx, systems=systems, max_new_tokens=ctx.max_new_tokens or IFEVAL_TOKENS))
    for spec, m in ife.metrics.items():
        result.metrics[spec]["ifeval prompt strict %"] = m["prompt strict %"]
        result.metrics[spec]["ifeval instruction strict %"] = m["instruction strict %"]
    failures = {}
    for s in systems[1:]:
        failures[s.spec] = cfg.failures(result.metrics[s.spec], result.metrics[ref.spec])
        result.metrics[s.spec]["gate"] = "fail" if failures[s.spec] else "pass"
    result.metrics[ref.spec]["gate"] = "reference"
    return SuiteResult(
        suite="gate",
        metrics=result.metrics,
        headline=["gate", *fidelity.HEADLINE, "ifeval prompt strict %"],
        settings={**result.settings, "gate": cfg.__dict__, "failures": failures, "ifeval_sampling": ife.settings["sampling"]},
        items=result.items + ife.items,
        errors=result.errors + ife.errors,
    )
