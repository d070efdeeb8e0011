"""The fidelity suite's full measure (`pippin eval fidelity`) on llama.cpp's quantizations of the shipped model.

Each llama.cpp type is made from the shipped Q4_1 by llama.cpp's own quantizer (as benchmarks/compression.py does)
and runs as a system of `pippin.eval.tasks.fidelity`: its logits through llama-cpp-python for perplexity and KL, its
greedy replies for the chat smoke set. Prompts are pippin's tokens (the same chat template and ids), so every number
is measured exactly as pippin's compressed models are, against the same full-precision reference. The shipped Q4_1
itself is the harness's check: llama.cpp running the weights pippin calls full precision must agree with it to
rounding (KL about 0, top-1 about 100 %).

  python benchmarks/fidelity_llama.py --types Q4_1,Q4_0,Q3_K_M --out eval-runs/fidelity-llama   # needs `make bench-setup`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compression import N_PARAMS, make_llama_variants  # noqa: E402 - the sibling benchmark

from pippin.engine.sampling import SamplingParams  # noqa: E402
from pippin.errors import PippinError  # noqa: E402
from pippin.eval.report import write_report  # noqa: E402
from pippin.eval.runner import GenerationCache  # noqa: E402
from pippin.eval.suite import EvalContext  # noqa: E402
from pippin.eval.systems import load_system  # noqa: E402
from pippin.eval.tasks import fidelity  # noqa: E402
from pippin.model.checkpoint import pippin_home  # noqa: E402


class LlamaSystem:
    """A llama.cpp model with pippin's tokenizer: `logits` for the scored measures, greedy `generate` for the smoke set."""

    def __init__(self, label: str, path: Path, tokenizer, *, n_ctx: int, threads: int) -> None:  # noqa: ANN001
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads, verbose=False)
        self.tokenizer = tokenizer
        self.spec = f"llama.cpp:{label}"
        # The cache key of its replies: llama.cpp's quantizer is deterministic for one version of it.
        self.identity = f"{self.spec}@{path.stat().st_size}@llama-cpp-python-{llama_cpp.__version__}"
        self.bpw = path.stat().st_size * 8 / N_PARAMS

    def _eval(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)], dtype=np.float32)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.from_numpy(self._eval(row.tolist())) for row in ids])

    def generate(self, conversations: Sequence[Sequence[dict[str, str]]], params: SamplingParams) -> list[str]:
        if params.temperature != 0:
            raise PippinError("LlamaSystem generates greedily only; the fidelity suite's settings are greedy.")
        stop_ids = set(self.tokenizer.eos_ids)
        replies = []
        for conv in conversations:
            ids = self.tokenizer.encode_chat(list(conv))
            out: list[int] = []
            last = self._eval(ids)[-1]
            while len(out) < params.max_new_tokens:
                tok = int(last.argmax())
                if tok in stop_ids:
                    break
                out.append(tok)
                self.llm.eval([tok])
                last = np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            text = self.tokenizer.decode(out)
            cut = [text.index(s) for s in params.stop if s in text]
            replies.append(text[: min(cut)] if cut else text)
        return replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_1,Q4_0,Q3_K_M", help="llama.cpp types; Q4_1 is the shipped file itself")
    ap.add_argument("--against", default="pippin:default", help="the reference (full precision)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=None, help="cap windows per domain, transcripts and smoke items")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="report folder (results.json, report.md)")
    args = ap.parse_args()
    import llama_cpp

    from pippin.kernels import cpu_name

    reference = load_system(args.against)
    with tempfile.TemporaryDirectory() as tmp:
        wanted = [t for t in args.types.split(",") if t]
        made = make_llama_variants([t for t in wanted if t != "Q4_1"], Path(tmp))
        paths = {t: made["Q4_1 (shipped)"] if t == "Q4_1" else made[t] for t in wanted}
        systems = [LlamaSystem(t, p, reference.tokenizer, n_ctx=2048, threads=args.threads) for t, p in paths.items()]
        ctx = EvalContext(
            systems=systems,
            against=reference,
            data_dir=Path(args.data),
            cache=GenerationCache(pippin_home() / "fidelity-cache.jsonl"),
            limit=args.limit,
            progress=True,
        )
        result = fidelity.run(ctx)
    for s in systems:
        result.metrics[s.spec]["bpw"] = s.bpw
    result.settings |= {
        "cpu": cpu_name(),
        "llama_cpp_python": llama_cpp.__version__,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_report(result, args.out, plots=False)
    cols = ["bpw", "top-1 %", "KL", "KL p99", "ppl news", "ppl dialogue", "ppl technical", "worst ppl ×", "smoke %", "empty %"]
    print("| system | " + " | ".join(cols) + " |")
    for spec, m in result.metrics.items():
        print(f"| {spec} | " + " | ".join(f"{m[c]:.3f}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
