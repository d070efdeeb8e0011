"""Talaria's web view: the per-op table, a graph of the model's blocks and a Pareto plot of the plans tried, over a JSON API.

`TalariaView` holds one model (its config, the plan it is stored as, the quality predictor) and prices edits of that
plan through pippin.talaria.whatif (explicit widths per op, rules, auto for a target); every plan it prices is kept for
the Pareto plot, next to reference plans (uniform widths, the allocator's plans for a few size budgets). `create_app`
wraps it in a FastAPI app: the page (static/, vanilla JS and SVG, no CDN) at /, the API under /api. `pippin talaria
--serve` serves it alone; `pippin serve` mounts it at /talaria. Plans are written only into the view's plans folder.
Bad input (an unknown op, a width an op cannot take, malformed JSON) is a 400 that says what to fix, never a 500.
Follows Talaria's linked table, graph and simulate views (Hohman et al., CHI 2024; shared/reference/afm.md §8).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from pippin.errors import PippinError
from pippin.io import write_json_atomic
from pippin.quant.pack import SUPPORTED_BITS
from pippin.talaria.devices import THIS_MACHINE, DeviceProfile, list_profiles, load_profile
from pippin.talaria.ops import OpRow
from pippin.talaria.plan import Plan, allowed_bits, is_linear
from pippin.talaria.quality import Sensitivity, sensitivity_for
from pippin.talaria.source import ModelSource, open_model
from pippin.talaria.whatif import UNITS, Rule, Target, TargetKind, WhatIf, apply_rules, auto, plan_record, simulate

STATIC = Path(__file__).parent / "static"
PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A plan file's name: letters, digits, '.', '_', '-' (no folders), at most 64 characters."""
MAX_HISTORY = 500
"""Plans kept for the Pareto plot (the oldest tried ones go first)."""
REFERENCE_BITS = (2, 3, 4)
"""Uniform widths of the reference plans, and the widths auto chooses among for them."""


class TalariaView:
    """One model's what-if session: prices plans (the stored plan with edits) and remembers every plan it priced."""

    def __init__(
        self,
        source: ModelSource,
        *,
        plan: Plan | None = None,
        sensitivity: Sensitivity | None = None,
        device: str,
        context: int = 512,
        prefill: int = 512,
        plans_dir: str | Path | None = None,
        measured: list[OpRow] | None = None,
    ) -> None:
        self.source, self.cfg = source, source.config
        self.base = plan or source.plan
        self.sensitivity = sensitivity or sensitivity_for(source.config, self.base, folder=source.folder)
        self.context, self.prefill = context, prefill
        self.plans_dir = None if plans_dir is None else Path(plans_dir).expanduser()
        self._profiles: dict[str, DeviceProfile] = {device: load_profile(device)}
        self.device = device
        self._history: list[dict[str, Any]] = []
        self._references: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.measured = {r.name: {k: v for k, v in r.to_dict().items() if k.startswith("measured_")} for r in measured or []}
        """Measured columns of the stored plan's ops (`pippin talaria --profile`): shown on an op while it is stored as
        profiled (an op whose width is edited has no measurement)."""

    @classmethod
    def open(cls, model: str | None, *, plan_file: str | None = None, **kw: Any) -> TalariaView:
        """A view of a preset or model folder (None: the default model), optionally with a compress plan applied."""
        from pippin.quant.compress import load_plan

        source = open_model(model)
        plan = source.plan.with_bits(load_plan(plan_file), tied=source.config.tie_embeddings) if plan_file else source.plan
        return cls(source, plan=plan, **kw)

    def devices(self) -> list[str]:
        """Profiles a request may name: the shipped ones, this machine where it is measured, and the view's own."""
        names = [n for n in list_profiles() if n != THIS_MACHINE]
        try:
            load_profile(THIS_MACHINE, measure=False)
            names.append(THIS_MACHINE)
        except PippinError:
            pass
        return sorted(set(names) | {self.device})

    def profile(self, name: str | None) -> DeviceProfile:
        name = name or self.device
        if name not in self._profiles:
            if name not in self.devices():  # never a path: a request does not get to read files
                raise PippinError(f"Unknown device {name!r}; choose one of {', '.join(self.devices())}.")
            self._profiles[name] = load_profile(name, measure=False)
        return self._profiles[name]

    def info(self) -> dict[str, Any]:
        tied = self.cfg.tie_embeddings
        c = self.cfg
        return {
            "model": self.source.name,
            "config": {"n_layers": c.n_layers, "dim": c.dim, "ffn_dim": c.ffn_dim, "vocab_size": c.vocab_size, "tied": tied},
            "device": self.device,
            "devices": self.devices(),
            "context": self.context,
            "prefill": self.prefill,
            "base": {"bits": self.base.bits, "describe": self.base.describe()},
            "allowed": {n: list(allowed_bits(n, tied=tied)) for n in self.base.bits},
            "quality_source": self.sensitivity.source,
            "plans_dir": None if self.plans_dir is None else str(self.plans_dir),
            "targets": [{"kind": k.value, "unit": UNITS[k][2]} for k in TargetKind],
        }

    def plan(self, edits: dict[str, int], rules: list[str]) -> Plan:
        """The stored plan with explicit widths, then rules, applied."""
        tied = self.cfg.tie_embeddings
        return apply_rules(self.base.with_bits(edits, tied=tied), [Rule.parse(r) for r in rules], tied=tied)

    def _simulate(self, plan: Plan, profile: DeviceProfile) -> WhatIf:
        kw = {"sensitivity": self.sensitivity, "context": self.context, "prefill": self.prefill}
        return simulate(self.cfg, plan, profile, **kw)

    def price(self, edits: dict[str, int], rules: list[str], *, device: str | None = None, label: str = "") -> dict[str, Any]:
        profile = self.profile(device)
        return self._answer(self._simulate(self.plan(edits, rules), profile), profile, label=label or "edit")

    def auto(self, edits: dict[str, int], rules: list[str], target: Target, bits: tuple[int, ...], *, device: str | None = None):
        profile = self.profile(device)
        kw = {"sensitivity": self.sensitivity, "context": self.context, "prefill": self.prefill}
        result = auto(self.cfg, self.plan(edits, rules), profile, target, bits=bits, **kw)
        return self._answer(result, profile, label=f"auto: {target.describe()}")

    def write(self, edits: dict[str, int], rules: list[str], name: str, *, target: Target | None, device: str | None = None):
        """The plan record (also written to plans_dir/NAME.json when the view has a plans folder)."""
        if not PLAN_NAME.fullmatch(name):
            raise PippinError(f"A plan's name is letters, digits, '.', '_' or '-' (at most 64, no folders), not {name!r}.")
        profile = self.profile(device)
        result = self._simulate(self.plan(edits, rules), profile)
        record = plan_record(result, profile=profile, model=self.source.name, target=target)
        path = None
        if self.plans_dir is not None:
            path = self.plans_dir / (name if name.endswith(".json") else f"{name}.json")
            write_json_atomic(path, record)
        return {"path": None if path is None else str(path), "record": record}

    def history(self, device: str | None = None) -> dict[str, Any]:
        profile = self.profile(device)
        if profile.name not in self._references:
            self._references[profile.name] = self._reference_points(profile)
        with self._lock:
            tried = [p for p in self._history if p["device"] == profile.name]
        return {"device": profile.name, "tried": tried, "references": self._references[profile.name]}

    def _reference_points(self, profile: DeviceProfile) -> list[dict[str, Any]]:
        """The stored plan, every linear at one width, and auto's plans for sizes between uniform 2 and 4 bits."""
        linears = [n for n in self.base.bits if is_linear(n)]
        tied = self.cfg.tie_embeddings
        points = [self._point(self._simulate(self.base, profile), profile, label="as stored", kind="reference")]
        uniform = {}
        for b in REFERENCE_BITS:
            uniform[b] = self._simulate(self.base.with_bits(dict.fromkeys(linears, b), tied=tied), profile)
            points.append(self._point(uniform[b], profile, label=f"linears at {b} bits", kind="reference"))
        lo, hi = uniform[min(REFERENCE_BITS)].estimate.size_bytes, uniform[max(REFERENCE_BITS)].estimate.size_bytes
        kw = {"sensitivity": self.sensitivity, "context": self.context, "prefill": self.prefill}
        for frac in (0.25, 0.5, 0.75):
            target = Target(kind=TargetKind.SIZE_MB, value=float(f"{(lo + frac * (hi - lo)) / 1e6:.4g}"))
            try:
                result = auto(self.cfg, self.base, profile, target, bits=REFERENCE_BITS, **kw)
            except PippinError:  # rounding put the budget under the floor: one reference fewer
                continue
            points.append(self._point(result, profile, label=f"allocator: {target.describe()}", kind="reference"))
        return points

    def _edits(self, plan: Plan) -> dict[str, int]:
        """Where a plan differs from the stored one."""
        return {n: b for n, b in plan.bits.items() if self.base.bits[n] != b}

    def _point(self, result: WhatIf, profile: DeviceProfile, *, label: str, kind: str) -> dict[str, Any]:
        e = result.estimate
        return {
            "label": label,
            "kind": kind,
            "device": profile.name,
            "edits": self._edits(result.plan),
            "size_bytes": e.size_bytes,
            "bpw": e.bpw,
            "decode_s": e.decode_s,
            "prefill_s": e.prefill_s,
            "decode_j": e.decode_j,
            "predicted_kl": result.predicted_kl,
        }

    def _answer(self, result: WhatIf, profile: DeviceProfile, *, label: str) -> dict[str, Any]:
        """What the page draws from: the plan, the totals, one row per op (with its ΔKL at each width), and the point."""
        point = self._point(result, profile, label=label, kind="tried")
        with self._lock:  # one point per distinct plan and device, the newest last
            self._history = [p for p in self._history if (p["device"], p["edits"]) != (point["device"], point["edits"])]
            self._history = (self._history + [point])[-MAX_HISTORY:]
        rows = result.table()
        scale = self.sensitivity.scale
        for row in rows:
            if row["name"] in self.base.bits:
                ok = allowed_bits(row["name"], tied=self.cfg.tie_embeddings)
                row |= {f"kl_{b}bit": scale * self.sensitivity.cost(row["name"], b) if b in ok else None for b in SUPPORTED_BITS}
        for row in rows:
            name = row["name"]
            if name in self.measured and result.plan.bits.get(name) == self.base.bits.get(name):
                row |= self.measured[name]
        plan = {"bits": result.plan.bits, "edits": point["edits"], "describe": result.plan.describe()}
        return {"device": profile.name, "plan": plan, "totals": result.summary(), "rows": rows, "point": point}


class PlanEdits(BaseModel):
    """A plan as the page sends it: widths per op on top of the stored plan, then rules, priced on a device."""

    model_config = ConfigDict(extra="forbid")
    edits: dict[str, int] = Field(default_factory=dict, description="op name -> bits, on top of the stored plan")
    rules: list[str] = Field(default_factory=list, description="'PATTERN=BITS' rules applied after the edits")
    device: str | None = Field(default=None, description="device profile (default: the view's)")
    label: str = Field(default="", max_length=200, description="what the page calls this plan in the Pareto plot")


class TargetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: TargetKind
    value: float = Field(gt=0)

    def target(self) -> Target:
        return Target(kind=self.kind, value=self.value)


class AutoRequest(PlanEdits):
    target: TargetBody
    bits: list[int] = Field(default=list(REFERENCE_BITS), min_length=1, description="widths a linear may take")


class WriteRequest(PlanEdits):
    name: str
    target: TargetBody | None = None


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def create_app(view: TalariaView) -> FastAPI:
    """The view's page and API; mount it anywhere (the page uses relative URLs)."""
    # No /docs: FastAPI's Swagger page loads its scripts from a CDN; openapi.json describes the API.
    app = FastAPI(
        title="pippin talaria", summary="Per-op cost table, block graph and what-if plans.", version="0.1.0", docs_url=None, redoc_url=None
    )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error(400, "The request body is not valid JSON.")
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if not where:
            return error(400, f"The request body must be a JSON object sent as application/json ({first.get('msg', 'invalid')}).")
        return error(400, f"Invalid request: {where}: {first.get('msg', 'invalid value')}.")

    @app.exception_handler(PippinError)
    async def on_refused(request: Request, exc: PippinError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            detail = f"No route {request.method} {request.url.path}; the API is api/model, simulate, auto, plan, history (openapi.json)."
        return error(exc.status_code, detail)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/model")
    def model() -> dict:
        return view.info()

    @app.post("/api/simulate")
    def simulate_plan(req: PlanEdits) -> dict:
        return view.price(req.edits, req.rules, device=req.device, label=req.label)

    @app.post("/api/auto")
    def auto_plan(req: AutoRequest) -> dict:
        return view.auto(req.edits, req.rules, req.target.target(), tuple(req.bits), device=req.device)

    @app.post("/api/plan")
    def write_plan(req: WriteRequest) -> dict:
        target = None if req.target is None else req.target.target()
        return view.write(req.edits, req.rules, req.name, target=target, device=req.device)

    @app.get("/api/history")
    def history(device: str | None = None) -> dict:
        return view.history(device)

    return app
