"""iTeC (AFM §3.3): rejection-sampling fine-tuning with a teacher committee, in rounds.

Each round, every committee member (a system spec: `pippin:MODEL[:ADAPTER]` or `openai:URL#model`) samples k replies
per prompt at temperature > 0, one seed per sample; a scorer keeps the best reply *per prompt* (not one best teacher
overall): `verifier` (the share of the prompt's IFEval instructions followed, or the harmlessness reward for `pippin
data safety` rows: refuse a harmful request, answer a safe look-alike), `reward:DIR` (a trained reward model's
scalar, pippin.train.reward) or `judge:SPEC` (a judge system's 1-10 rating). Ties go to the shorter reply, then the
earlier member. The winners (at or above `min_score`) are the round's SFT set, on which `train_adapter` trains a LoRA
adapter on the student base; that adapter joins the committee of every later round as `pippin:STUDENT:ADAPTER_DIR`.
With a teacher system prompt (`teacher_system`), the committee samples under it and the SFT set leaves it out: context
distillation, e.g. of a safety instruction. Recovery distillation is the same machinery: with the full-precision model
as the only member (`pippin:default`) and the compressed model as the student, the winners are full precision's best
replies and the adapter is a recovery adapter for the compressed base. Not here: refreshing the reward model or DPO/RL
members between rounds (train those with `pippin reward` / `pippin rl` and name them in the committee).

Run folder: `itec_config.json` (the resolved config; a resume must match it, except for more rounds), and per round
`round-N/chunks/*.jsonl` (each chunk of prompts written atomically once scored: a killed round resamples nothing that
was scored), then `samples.jsonl`, `sft.jsonl`, `adapter/` (train_adapter resumes itself) and `summary.json`, the
marker of a finished round.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm import tqdm

from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.eval.ifeval import IFEvalItem, check_response
from pippin.eval.systems import Message, System, load_system, parse_spec
from pippin.io import jsonl_rows, write_atomic, write_json_atomic
from pippin.train.adapter import TrainConfig

if TYPE_CHECKING:
    from pippin.model.checkpoint import LoadedModel
    from pippin.train.reward import RewardModel

CONFIG_JSON = "itec_config.json"


@dataclass(kw_only=True)
class ItecConfig:
    prompts: list[str]
    """JSONL files of prompts, read in order (several mix kinds, e.g. safety rows beside benign instruction rows; one
    path alone is taken as a list of one): IFEval rows {"key", "prompt", "instruction_id_list", "kwargs"}, `pippin data safety` rows {"id",
    "prompt", "expect", "source"}, chats {"messages": [...]} (the turns before the first assistant reply) or {"prompt":
    "..."}; an "id" or "key" names a row, else its line."""
    committee: list[str]
    """System specs that sample replies (pippin:MODEL[:ADAPTER] or openai:URL#model)."""
    student: str
    """The base the adapters are trained on: a model folder, a .gguf or "default" (a compressed one: recovery)."""
    scorer: str = "verifier"
    """"verifier", "reward:RUN_DIR" or "judge:SPEC" (e.g. judge:openai:http://host:8000/v1#model)."""
    k: int = 4
    """Replies per prompt from each member."""
    rounds: int = 2
    """Sample-score-train rounds; a finished run given more rounds goes on."""
    temperature: float = 0.8
    """Sampling temperature of every member (> 0: the k samples must differ)."""
    max_new_tokens: int = 256
    """Reply length limit of every sample."""
    min_score: float | None = None
    """A prompt's best reply enters the SFT set only at or above this score (None: always)."""
    chunk: int = 16
    """Prompts sampled and scored between atomic writes: at most this much work is lost to a kill."""
    seq_len: int = 512
    """Tokens per SFT example (prompt and reply)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The adapter training of every round (LoRA SFT on the winners)."""
    seed: int = 0
    """Seeds every sample (with round, member and sample index)."""
    teacher_system: str | None = None
    """A system prompt the committee samples under and the SFT set leaves out, so the adapter learns to act as if told
    (context distillation): e.g. a safety instruction that a small model follows only when it is given."""

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        self.prompts = [str(self.prompts)] if isinstance(self.prompts, str | Path) else [str(p) for p in self.prompts]
        if not self.prompts:
            raise PippinError("iTeC needs at least one prompt file (--prompts FILE).")
        self.committee = list(self.committee)
        if not self.committee:
            raise PippinError("The committee needs at least one member (--committee SPEC).")
        for spec in self.committee:
            parse_spec(spec)
        if len(set(self.committee)) < len(self.committee):
            raise PippinError(f"A committee member is named twice in {self.committee}; sample more from it with k instead.")
        if ":" in self.student:
            raise PippinError(f"The student {self.student!r} must be a model path without ':' (it is named in pippin:STUDENT:ADAPTER).")
        for name in ("k", "rounds", "chunk", "seq_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise PippinError(f"ItecConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise PippinError(f"iTeC samples several different replies per member: temperature must be > 0, got {self.temperature}.")
        scorer_kind(self.scorer)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train": self.train.to_dict()}


# --- prompts ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ItecPrompt:
    id: str
    """The row's "id" or "key", else its line number: what samples.jsonl names it by."""
    messages: list[Message]
    """The conversation a member continues."""
    item: IFEvalItem | None = None
    """Its verifiable instructions, when the row has them (what the verifier scores)."""
    expect: str | None = None
    """"refuse" or "comply" for a `pippin data safety` row (the verifier scores it with the harmlessness reward)."""


def read_prompts(path: str | Path) -> list[ItecPrompt]:
    """The prompts of a JSONL file (see ItecConfig.prompts); a bad row is an error naming its line."""
    from pippin.train.data import prompt_of
    from pippin.train.harmless import holds_safety_rows, read_safety_prompts

    path = Path(path)
    if not path.is_file():
        raise PippinError(f"Prompt file {path} does not exist.")
    if holds_safety_rows(path):  # checked as the RL reward reads them
        return [
            ItecPrompt(id=sp.id, messages=[{"role": "user", "content": sp.prompt}], expect=sp.expect) for sp in read_safety_prompts(path)
        ]
    out: list[ItecPrompt] = []
    for n, row in jsonl_rows(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise PippinError(f"{where}: expected a JSON object.")
        pid = str(row.get("id", row.get("key", n)))
        item = None
        if "instruction_id_list" in row:
            fields = {k: row.get(k) for k in ("prompt", "instruction_id_list", "kwargs")}
            try:
                item = IFEvalItem(key=row["key"] if isinstance(row.get("key"), int) else n, **fields)
            except PippinError as e:
                raise PippinError(f"{where}: {e}") from None
            messages = [{"role": "user", "content": item.prompt}]
        elif "messages" in row:
            messages = prompt_of(row["messages"]) if isinstance(row["messages"], list) else []
        else:
            messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row.get("prompt"), str) else []
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise PippinError(f"{where}: needs a 'prompt' string, IFEval fields, or 'messages' with a turn before any reply.")
        out.append(ItecPrompt(id=pid, messages=messages, item=item))
    if not out:
        raise PippinError(f"{path} holds no prompts.")
    if len({p.id for p in out}) < len(out):
        raise PippinError(f"{path}: prompt ids (the 'id' or 'key' fields) must be unique.")
    return out


# --- scorers ------------------------------------------------------------------------------------------------------


class Scorer(Protocol):
    """Scores replies to prompts; None marks a reply that could not be scored (it never wins)."""

    def score(self, prompts: Sequence[ItecPrompt], replies: Sequence[str]) -> list[float | None]: ...


def scorer_kind(spec: str) -> str:
    kind, _, arg = spec.partition(":")
    if spec == "verifier" or (kind in ("reward", "judge") and arg):
        return kind
    raise PippinError(f"Scorer {spec!r} is not understood; use verifier, reward:RUN_DIR or judge:SPEC (e.g. judge:openai:URL#model).")


class VerifierScorer:
    """The share of the prompt's IFEval instructions the reply follows (strict checkers), or for a safety row the
    harmlessness reward (1.0 when it refuses or answers as the row expects)."""

    def score(self, prompts: Sequence[ItecPrompt], replies: Sequence[str]) -> list[float | None]:
        from pippin.train.harmless import harmlessness_reward

        out: list[float | None] = []
        for p, reply in zip(prompts, replies, strict=True):
            if p.item is None:
                out.append(harmlessness_reward(p.expect, reply))
                continue
            ok = check_response(p.item, reply)
            out.append(sum(ok) / len(ok))
        return out


class RewardScorer:
    """A trained reward model's scalar for prompt + reply, encoded as it was trained (chat template, cut from the left)."""

    def __init__(self, model: RewardModel, tokenizer, *, max_len: int = 512, batch_size: int = 8) -> None:  # noqa: ANN001 - Tokenizer
        self.model, self.tokenizer, self.max_len, self.batch_size = model.eval(), tokenizer, max_len, batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[ItecPrompt], replies: Sequence[str]) -> list[float | None]:
        seqs = [
            self.tokenizer.encode_chat([*p.messages, {"role": "assistant", "content": r}], add_generation_prompt=False)[-self.max_len :]
            for p, r in zip(prompts, replies, strict=True)
        ]
        out: list[float | None] = []
        for i in range(0, len(seqs), self.batch_size):
            batch = seqs[i : i + self.batch_size]
            lengths = torch.tensor([len(s) for s in batch])
            tokens = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)  # right-padded (B, T)
            for b, s in enumerate(batch):
                tokens[b, : len(s)] = torch.tensor(s)
            out += self.model(tokens, lengths)[0].tolist()
        return out


def parse_score(text: str) -> float:
    """A 1-10 rating from a judge's free text: "[[7]]" (FastChat), else "Rating: 7", "7/10" or a bare number."""
    from pippin.eval.judges import parse_rating

    try:
        return parse_rating(text)
    except ValueError:
        pass
    pattern = r"(?:rating|score)\s*(?:is|of)?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b"
    found = [float(a or b) for a, b in re.findall(pattern, text, flags=re.IGNORECASE)]
    if not found and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*\.?\s*", text):
        found = [float(text.strip().rstrip("."))]
    if not found:
        raise ValueError("no rating found")
    if not 1.0 <= found[-1] <= 10.0:  # the last one: judges explain first, then rate
        raise ValueError(f"rating {found[-1]:g} is outside 1-10")
    return found[-1]


class JudgeScorer:
    """A judge system's 1-10 rating (pippin.eval.judges: unparseable answers are re-asked, then left unscored)."""

    def __init__(self, judge: System, *, batch_size: int = 8) -> None:
        self.judge, self.batch_size = judge, batch_size

    def score(self, prompts: Sequence[ItecPrompt], replies: Sequence[str]) -> list[float | None]:
        from pippin.eval.forms import rating_form
        from pippin.eval.judges import judge_all
        from pippin.eval.prompts import RESPONSE_RATER
        from pippin.eval.runner import Request

        requests = [
            Request(id=str(i), messages=RESPONSE_RATER.render(question="\n\n".join(m["content"] for m in p.messages), answer=r))
            for i, (p, r) in enumerate(zip(prompts, replies, strict=True))
        ]
        judged = judge_all(self.judge, requests, parse_score, batch_size=self.batch_size, forms=rating_form(), desc="judge")
        return [j.value if j.ok else None for j in judged]


def make_scorer(spec: str, *, load_model: Callable[[str], LoadedModel], open_system: Callable[[str], System]) -> Scorer:
    """The scorer a spec names; a reward model's base is loaded with `load_model`, a judge with `open_system`."""
    kind, _, arg = spec.partition(":")
    if scorer_kind(spec) == "verifier":
        return VerifierScorer()
    if kind == "reward":
        from pippin.train.reward import load_reward_model, reward_base

        base = load_model(reward_base(arg))
        max_len = json.loads((Path(arg) / "reward_config.json").read_text())["config"]["max_len"]  # as it was trained
        return RewardScorer(load_reward_model(arg, base.model), base.tokenizer, max_len=max_len)
    return JudgeScorer(open_system(arg))


# --- one round ----------------------------------------------------------------------------------------------------


def sampling_for(config: ItecConfig, *, round_no: int, member: int, sample: int) -> SamplingParams:
    """The settings of sample j of committee member i (its place in the round's committee) in a round: a seed of its
    own, from the run seed, round, member and j, so replies do not depend on how prompts are chunked or batched (a
    resumed round samples what a whole one would) nor on where the run folder is."""
    digest = hashlib.sha256(f"{config.seed}|{round_no}|{member}|{sample}".encode()).digest()
    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=int.from_bytes(digest[:7], "big"))


def choose_best(scores: Sequence[float | None], texts: Sequence[str]) -> int | None:
    """Index of the best candidate: highest score, then the shorter reply, then the earlier one (committee order);
    None when nothing was scored."""
    ranked = [(-s, len(t), i) for i, (s, t) in enumerate(zip(scores, texts, strict=True)) if s is not None]
    return min(ranked)[2] if ranked else None


def teacher_view(messages: list[Message], teacher_system: str | None) -> list[Message]:
    """The conversation as the committee sees it: the teacher's system prompt first (before a system prompt the row
    has, in one system turn)."""
    if not teacher_system:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{teacher_system}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": teacher_system}, *messages]


def _sample_chunk(
    prompts: Sequence[ItecPrompt], members: dict[str, System], scorer: Scorer, config: ItecConfig, round_no: int
) -> list[dict[str, Any]]:
    """Every member's k replies to each prompt, scored; one record per reply, the prompt's winner marked `chosen`."""
    convs = [teacher_view(p.messages, config.teacher_system) for p in prompts]
    cands: list[list[tuple[str, int, str]]] = [[] for _ in prompts]  # per prompt: (member, sample, text)
    for m, (spec, system) in enumerate(members.items()):
        for j in range(config.k):
            replies = system.generate(convs, sampling_for(config, round_no=round_no, member=m, sample=j))
            for c, text in zip(cands, replies, strict=True):
                c.append((spec, j, text))
    flat_p = [p for p, c in zip(prompts, cands) for _ in c]
    scores = scorer.score(flat_p, [t for c in cands for _, _, t in c])
    records, at = [], 0
    for p, c in zip(prompts, cands):
        s = scores[at : at + len(c)]
        at += len(c)
        best = choose_best(s, [t for _, _, t in c])
        keep = best is not None and (config.min_score is None or s[best] >= config.min_score)
        records += [
            {"prompt_id": p.id, "member": m, "sample": j, "text": t, "score": s[i], "chosen": keep and i == best}
            for i, (m, j, t) in enumerate(c)
        ]
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def round_summary(records: Sequence[dict[str, Any]], committee: Sequence[str], n_prompts: int) -> dict[str, Any]:
    """Per round: prompts, winners, the mean best score per prompt, and per member its mean score and wins."""
    best: dict[str, float] = {}
    for r in records:
        if r["score"] is not None:
            best[r["prompt_id"]] = max(best.get(r["prompt_id"], r["score"]), r["score"])
    members = {}
    for spec in committee:
        mine = [r for r in records if r["member"] == spec]
        scored = [r["score"] for r in mine if r["score"] is not None]
        members[spec] = {"mean_score": sum(scored) / len(scored) if scored else None, "wins": sum(r["chosen"] for r in mine)}
    return {
        "n_prompts": n_prompts,
        "n_chosen": sum(r["chosen"] for r in records),
        "mean_best_score": sum(best.values()) / len(best) if best else None,
        "members": members,
    }


def _sample_round(
    folder: Path,
    prompts: Sequence[ItecPrompt],
    committee: Sequence[str],
    config: ItecConfig,
    round_no: int,
    *,
    scorer: Callable[[], Scorer],
    open_system: Callable[[str], System],
    progress: bool,
) -> None:
    """Sample and score the round's prompts chunk by chunk (each chunk's records written atomically; chunks already on
    disk are skipped), then join them into samples.jsonl. Members and the scorer are loaded only if there is work."""
    chunks = [(i, prompts[i : i + config.chunk]) for i in range(0, len(prompts), config.chunk)]
    path = lambda i: folder / "chunks" / f"{i:08d}.jsonl"  # noqa: E731
    todo = [(i, c) for i, c in chunks if not path(i).is_file()]
    done = len(prompts) - sum(len(c) for _, c in todo)
    members: dict[str, System] = {}
    with tqdm(total=len(prompts), initial=done, desc=f"round {round_no} samples", unit="prompt", disable=not progress) as bar:
        for i, chunk in todo:
            members = members or {spec: open_system(spec) for spec in committee}
            _write_jsonl(path(i), _sample_chunk(chunk, members, scorer(), config, round_no))
            bar.update(len(chunk))
    _write_jsonl(folder / "samples.jsonl", [r for i, _ in chunks for r in _read_jsonl(path(i))])


@dataclass(kw_only=True)
class ItecResult:
    rounds: list[dict[str, Any]]
    """Each round's summary.json: committee, counts, scores and wins, its adapter and its member spec."""
    adapter: Path
    """The last round's adapter (for the student base)."""


def run_itec(
    config: ItecConfig,
    *,
    out_dir: str | Path,
    load_model: Callable[[str], LoadedModel],
    open_system: Callable[[str], System] = load_system,
    progress: bool = True,
) -> ItecResult:
    """Run (or resume) every round into `out_dir`. `load_model(path)` loads the student and a reward model's base
    (pippin.api.load_any, which also reads compressed models); `open_system(spec)` loads a committee member or a judge."""
    from pippin.adapters.lora import remove_lora_
    from pippin.train.adapter import train_adapter
    from pippin.train.data import tokenize_chat

    out = Path(out_dir)
    if ":" in str(out):
        raise PippinError(f"The run folder {out} must not contain ':' (its adapters join the committee as pippin:STUDENT:ADAPTER).")
    prompts = [p for path in config.prompts for p in read_prompts(path)]
    if twice := sorted(i for i, n in Counter(p.id for p in prompts).items() if n > 1):
        raise PippinError(f"Prompt ids must be unique across the --prompts files; {len(twice)} appear twice, e.g. {twice[0]!r}.")
    if scorer_kind(config.scorer) == "verifier" and (bad := [p.id for p in prompts if p.item is None and p.expect is None]):
        raise PippinError(
            f"The verifier scores IFEval-style prompts (instruction_id_list, kwargs) and `pippin data safety` rows; {len(bad)} are "
            f"neither, e.g. {bad[0]}."
        )
    digest = hashlib.sha256(b"".join(Path(p).read_bytes() for p in config.prompts)).hexdigest()[:16]
    run = {"prompts_sha": digest, **json.loads(json.dumps(config.to_dict()))}
    if (out / CONFIG_JSON).is_file():
        saved = json.loads((out / CONFIG_JSON).read_text())
        if isinstance(saved.get("prompts"), str):  # written when the config held one file
            saved["prompts"] = [saved["prompts"]]
        changed = sorted(k for k in saved.keys() | run.keys() if k != "rounds" and saved.get(k) != run.get(k))  # more rounds extend a run
        if changed:
            raise PippinError(f"{out} holds an iTeC run with another config ({', '.join(changed)} differ); use another --out or delete it.")
    write_json_atomic(out / CONFIG_JSON, run)
    scorers: list[Scorer] = []  # built once, on first use (a reward model or judge only when there is sampling to score)

    def get_scorer() -> Scorer:
        if not scorers:
            scorers.append(make_scorer(config.scorer, load_model=load_model, open_system=open_system))
        return scorers[0]

    student: LoadedModel | None = None
    committee = list(config.committee)
    summaries = []
    for n in range(1, config.rounds + 1):
        folder = out / f"round-{n}"
        adapter_dir = folder / "adapter"
        if (folder / "summary.json").is_file():  # a finished round
            summaries.append(json.loads((folder / "summary.json").read_text()))
            committee.append(summaries[-1]["member"])
            continue
        if not (folder / "samples.jsonl").is_file():
            _sample_round(folder, prompts, committee, config, n, scorer=get_scorer, open_system=open_system, progress=progress)
        records = _read_jsonl(folder / "samples.jsonl")
        by_id = {p.id: p for p in prompts}
        sft = [
            {"messages": [*by_id[r["prompt_id"]].messages, {"role": "assistant", "content": r["text"]}],
             "id": r["prompt_id"], "member": r["member"], "score": r["score"]}
            for r in records if r["chosen"]
        ]  # fmt: skip
        if not sft:
            raise PippinError(f"Round {n}: no prompt has a reply scoring at least --min-score {config.min_score}; nothing to train on.")
        _write_jsonl(folder / "sft.jsonl", sft)
        student = student or load_model(config.student)
        examples = [tokenize_chat(student.tokenizer, row["messages"], max_len=config.seq_len) for row in sft]
        meta = {"base_model": student.meta.get("name", config.student), "itec_round": n, "itec_committee": list(committee)}
        with torch.random.fork_rng(devices=[]):  # the LoRA init draws from the global RNG: seed it, so a round's adapter is reproducible
            torch.manual_seed(config.train.seed * 1_000_003 + n)
            res = train_adapter(
                student.model, examples, config.train, out_dir=adapter_dir, name=f"itec-round-{n}", meta=meta, progress=progress
            )
        remove_lora_(student.model)  # the next round trains a fresh adapter on the same base
        member = f"pippin:{config.student}:{adapter_dir}"
        summary = {
            "round": n,
            "committee": list(committee),
            "scorer": config.scorer,
            **round_summary(records, committee, len(prompts)),
            "adapter": str(adapter_dir),
            "member": member,
            "train": {"steps": res.steps, "final_loss": res.losses[-1] if res.losses else None, "n_examples": len(examples)},
        }
        write_json_atomic(folder / "summary.json", summary)
        summaries.append(summary)
        committee.append(member)
    write_json_atomic(out / "itec_summary.json", {"rounds": summaries})
    return ItecResult(rounds=summaries, adapter=Path(summaries[-1]["adapter"]))
