"""Fidelity suite: each system against a reference (`--against`, default the full-precision default model).

Perplexity on news, dialogue and technical prose, KL and top-1 agreement on chat transcripts, and the chat smoke
set (pippin.eval.fidelity). The reference's own row carries its perplexities and smoke results, so one table shows
what each system lost. Needs pippin systems (their logits); the reference's transcripts and every smoke reply are
cached like any generation, so a rerun only recomputes logits. `--limit N` caps windows per domain, transcripts
and smoke items.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pippin.errors import PippinError
from pippin.eval.fidelity import DOMAINS, FidelityConfig, agreement, domain_text, load_smoke, perplexity, token_windows, transcript
from pippin.eval.runner import Request
from pippin.eval.suite import EvalContext, SuiteResult, generation_errors, percent, read_records
from pippin.eval.systems import sampling_dict

HEADLINE = ["top-1 %", "KL", "worst ppl ×", "smoke %", "empty %"]


def _needs_logits(systems) -> None:  # noqa: ANN001
    for s in systems:
        if not hasattr(s, "logits"):
            raise PippinError(f"The fidelity suite compares logits, so {s.spec} must be a pippin model (pippin:PATH[:ADAPTER]).")


def run(ctx: EvalContext, config: FidelityConfig | None = None) -> SuiteResult:
    cfg = config or FidelityConfig()
    ref = ctx.against
    if ref is None:
        raise PippinError("The fidelity suite needs a reference: --against pippin:default (full precision).")
    _needs_logits([ref, *ctx.systems])
    rows = [ref, *[s for s in ctx.systems if s is not ref]]
    tok = ref.tokenizer
    for s in rows:
        if s.tokenizer.vocab_size != tok.vocab_size:
            raise PippinError(f"{s.spec} has another vocabulary than the reference {ref.spec}; fidelity needs the same tokenizer.")
    metrics: dict[str, dict] = {s.spec: {} for s in rows}
    errors, records = [], []

    windows = {d: token_windows(tok.encode(domain_text(d, ctx.data_dir)), window=cfg.window, n_tokens=cfg.n_tokens) for d in DOMAINS}
    windows = {d: w[: ctx.limit] if ctx.limit else w for d, w in windows.items()}
    for s in tqdm(rows, desc="perplexity", disable=not ctx.progress):
        for d, w in windows.items():
            metrics[s.spec][f"ppl {d}"] = perplexity(s.logits, w)
    for s in rows:
        metrics[s.spec]["worst ppl ×"] = max(metrics[s.spec][f"ppl {d}"] / metrics[ref.spec][f"ppl {d}"] for d in DOMAINS)

    # Transcripts: the reference's greedy replies to MT-Bench first turns.
    qpath = ctx.path("mt_bench", "question.jsonl")
    questions = [(w, r) for w, r in read_records(qpath) if isinstance(r, dict) and r.get("turns")][: ctx.limit or cfg.n_chat]
    chat = []
    for w, r in questions:
        chat.append(Request(id=f"mt-bench {r.get('question_id', w)}", messages=[{"role": "user", "content": str(r["turns"][0])}]))
    chat_params = ctx.sampling(max_new_tokens=cfg.chat_tokens)
    outs = ctx.generate(ref, chat, chat_params, desc="reference transcripts")
    errors += generation_errors(ref, outs)
    transcripts = [t for r, o in zip(chat, outs) if o.ok and (t := transcript(tok, r.messages, o.text)) is not None]
    if not transcripts:
        raise PippinError(f"The reference {ref.spec} wrote no non-empty reply to score against; is it a working chat model?")
    others = rows[1:]
    for s, a in zip(others, agreement(ref.logits, [s.logits for s in others], tqdm(transcripts, desc="KL", disable=not ctx.progress))):
        metrics[s.spec].update({"KL": a.kl, "KL p99": a.kl_p99, "top-1 %": a.top1})
    metrics[ref.spec].update({"KL": 0.0, "KL p99": 0.0, "top-1 %": 100.0})

    items = load_smoke()[: ctx.limit] if ctx.limit else load_smoke()
    smoke = [Request(id=f"smoke {it.id}", messages=[{"role": "user", "content": it.prompt}]) for it in items]
    smoke_params = ctx.sampling(max_new_tokens=cfg.smoke_tokens)
    for s in rows:
        outs = ctx.generate(s, smoke, smoke_params, desc="smoke")
        errors += generation_errors(s, outs)
        done = [(it, o.text) for it, o in zip(items, outs) if o.ok]
        passed = [it.check(text) for it, text in done]
        metrics[s.spec]["smoke %"] = percent(sum(passed), len(done))
        metrics[s.spec]["empty %"] = percent(sum(not text.strip() for _, text in done), len(done))
        records += [{"system": s.spec, "id": it.id, "reply": text, "pass": ok} for (it, text), ok in zip(done, passed)]
    for s in rows:
        metrics[s.spec]["tokens scored"] = sum(len(w) - 1 for ws in windows.values() for w in ws)
        metrics[s.spec]["transcript tokens"] = sum(len(t.ids) - t.start for t in transcripts)
    return SuiteResult(
        suite="fidelity",
        metrics=metrics,
        headline=HEADLINE,
        settings={
            **ctx.describe(),
            "reference": ref.spec,
            "config": cfg.__dict__,
            "data": [str(qpath), "xsum/test.jsonl", "dialogsum/dialogsum.test.jsonl", "pydoc_data.topics"],
            "sampling": sampling_dict(chat_params),
        },
        items=records,
        errors=errors,
    )


def measure(model: str, *, reference: str = "pippin:default", data_dir: Path, out_dir: Path, progress: bool = True) -> SuiteResult:
    """Run the suite on one model folder against `reference` and write its report to `out_dir` (what `pippin compress`
    does when it finishes). Generations are cached under $PIPPIN_HOME, so the reference's replies are made once."""
    from pippin.eval.report import write_report
    from pippin.eval.runner import GenerationCache
    from pippin.eval.systems import load_system
    from pippin.model.checkpoint import pippin_home

    ctx = EvalContext(
        systems=[load_system(f"pippin:{model}")],
        against=load_system(reference),
        data_dir=data_dir,
        cache=GenerationCache(pippin_home() / "fidelity-cache.jsonl"),
        progress=progress,
    )
    result = run(ctx)
    write_report(result, out_dir, plots=False)
    return result
