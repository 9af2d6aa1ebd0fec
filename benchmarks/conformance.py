"""Conformance of real architectures: does rwdeploy compile published networks exactly?

For every timm architecture of the suite (`tests/conformance/conformance_models.py`), at the
smallest input side it accepts (and, with --default-size, at its default side), in both forms
a user hands over (`.pt2` program, pickled module): make trained-looking weights, zero 30-50%
of the filters of every conv and hidden Linear, compile the file with rwdeploy, and record
(`tests/conformance/conformance_check.py`): traced (fx / export), compiled (or the failing
stage and error), exact in ONNX Runtime against the zeroed torch model, params and MACs
before/after, zeroed filters removed vs kept with the reasons by category, slim vs original
ONNX initializer bytes, and (with --tvm) TVM cpu/arm builds of the slim model.

Each case (model, size, form) runs in its own process with a timeout, so a crash or hang costs
that case only. By default a pre-imported parent forks one child per case (no re-import of
torch/timm/rwdeploy per case); `--isolation spawn` starts a fresh interpreter instead. Each
finished case is cached as JSON (`benchmarks/results/conformance-cache/`, not committed): a run
resumes where it stopped, and `--models`/`--families` re-run a subset quickly (`--rerun`
discards the cached records of the selected cases). The table is rebuilt from every record
known (cache, else the committed conformance.json) and written to
benchmarks/results/conformance.{json,md}.

    python benchmarks/conformance.py                          # exactness, small side, both forms
    python benchmarks/conformance.py --models resnet18,levit_128s --rerun
    python benchmarks/conformance.py --families swin,convnextv2
    python benchmarks/conformance.py --default-size           # also the default side (slow)
    python benchmarks/conformance.py --tvm cpu,arm --tvm-sample 40   # TVM builds, stratified sample
    python benchmarks/conformance.py --tvm cpu,arm --no-exact # TVM builds of every model
    python benchmarks/conformance.py --report-only            # rebuild the table from the records
    python benchmarks/conformance.py --probe-sizes            # re-find each model's smallest side

Run it niced on a shared machine (`nice -n 10 ...`): it is CPU-bound, one case at a time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "conformance"))

import conformance_models  # noqa: E402
from conformance_models import SUITE, ModelSpec  # noqa: E402

from rwdeploy.runtime.environment import code_version  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "conformance-cache"
FORMS = ("pt2", "pickle")
TVM_TARGETS = ("cpu", "arm")
TVM_FORM = "pt2"  # the TVM builds take the slim program compiled from the .pt2 form
# The acceptance targets.
EXACT_TARGET = 0.98
TVM_TARGET = 0.95
TIMEOUT_S = {"small": 900, "default": 1800}
SCHEMA = "rwdeploy.conformance/1"


@dataclass(frozen=True)
class Case:
    model: str
    size: str  # "small" | "default"
    kind: str  # a form ("pt2" | "pickle"), or "tvm" (pt2 form + TVM builds)

    @property
    def key(self) -> str:
        return f"{self.model}__{self.size}__{self.kind}"

    def command(self) -> str:
        flags = " --tvm cpu,arm --no-exact" if self.kind == "tvm" else f" --forms {self.kind}"
        size = " --default-size --no-small" if self.size == "default" else ""
        return f"python benchmarks/conformance.py --models {self.model}{flags}{size} --rerun"


# ---------------------------------------------------------------------------------------------
# selection


def select_specs(models: str | None, families: str | None) -> list[ModelSpec]:
    specs = list(SUITE)
    if models:
        wanted = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in conformance_models.BY_NAME]
        if unknown:
            raise SystemExit(f"conformance: not in the suite: {', '.join(unknown)} "
                             f"(see tests/conformance/conformance_models.py)")
        specs = [s for s in specs if s.name in wanted]
    if families:
        fams = {f.strip() for f in families.split(",") if f.strip()}
        unknown = fams - {s.family for s in SUITE}
        if unknown:
            raise SystemExit(f"conformance: unknown families: {', '.join(sorted(unknown))}")
        specs = [s for s in specs if s.family in fams]
    return specs


def stratified(specs: list[ModelSpec], n: int) -> list[ModelSpec]:
    """n models spread over the families: each family's first entry, then each one's second, ..."""
    by_family: dict[str, list[ModelSpec]] = defaultdict(list)
    for s in specs:
        by_family[s.family].append(s)
    picked: list[ModelSpec] = []
    depth = 0
    while len(picked) < n and any(len(v) > depth for v in by_family.values()):
        for fam in by_family:
            if len(by_family[fam]) > depth and len(picked) < n:
                picked.append(by_family[fam][depth])
        depth += 1
    return picked


# ---------------------------------------------------------------------------------------------
# running one case in its own process


def _warm_up() -> None:
    """Import (and exercise once) what every case needs, before forking: the children then
    start without re-importing torch, timm and rwdeploy. One torch thread, so no OpenMP pool
    exists at fork time."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    import conformance_check  # noqa: F401
    from torchvision_shim import import_timm

    import_timm()
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    import rwdeploy.compile  # noqa: F401
    from rwdeploy.passes.channel_groups import analyze_channel_groups
    from rwdeploy.passes.trace import trace_model
    from rwdeploy.runtime.onnx_export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        torch.export.export(net, (x,))
        traced = trace_model(net, x)
        analyze_channel_groups(traced.gm, x)
        export_onnx(net, x, Path(tmp) / "w.onnx")


CODE_VERSION = code_version(REPO)


def _child(case: Case, out: Path, log: Path, tvm: tuple[str, ...]) -> None:
    """Runs in the forked/spawned process: one case, its record written as JSON."""
    os.setpgrp()  # the parent kills the whole group (compilers TVM started) on timeout
    fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    import conformance_check

    spec = conformance_models.get(case.model)
    form = TVM_FORM if case.kind == "tvm" else case.kind
    try:
        record = conformance_check.run_case(spec, case.size, form, tvm=tvm if case.kind == "tvm" else ())
    except Exception as err:  # noqa: BLE001 - a bug in the harness or the model: recorded
        import traceback

        traceback.print_exc()
        record = {"model": spec.name, "arch": spec.arch, "family": spec.family, "form": form,
                  "size": case.size, "status": "error", "compiled": False, "exact": False,
                  "failed_stage": "harness", "error": conformance_check.one_line(err)}
    record["kind"] = case.kind
    record["code"] = CODE_VERSION  # the records of a table may come from several runs
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, out)


def _log_tail(log: Path, n: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_isolated(case: Case, cache: Path, *, isolation: str, tvm: tuple[str, ...], timeout: float) -> dict[str, Any]:
    out, log = cache / f"{case.key}.json", cache / f"{case.key}.log"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    if isolation == "fork":
        proc = multiprocessing.get_context("fork").Process(target=_child, args=(case, out, log, tvm))
        proc.start()
        proc.join(timeout)
        timed_out = proc.is_alive()
        if timed_out:
            _kill_group(proc.pid)
            proc.join()
        code = proc.exitcode
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case.key,
               "--worker-out", str(out), "--tvm", ",".join(tvm) or "none"]
        child = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            code = child.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(child.pid)
            code = child.wait()
            timed_out = True
    wall = round(time.perf_counter() - t0, 1)
    if out.exists() and not timed_out:
        record = json.loads(out.read_text())
    else:
        spec = conformance_models.get(case.model)
        status = "timeout" if timed_out else "crashed"
        why = f"no result within {timeout:.0f} s" if timed_out else f"process died (exit code {code})"
        record = {"model": spec.name, "arch": spec.arch, "family": spec.family,
                  "form": TVM_FORM if case.kind == "tvm" else case.kind, "size": case.size, "kind": case.kind,
                  "status": status, "compiled": False, "exact": False, "failed_stage": status,
                  "error": why, "log_tail": _log_tail(log)}
    record["wall_s"] = wall
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


# ---------------------------------------------------------------------------------------------
# records -> summary


def load_records(cache: Path) -> dict[str, dict[str, Any]]:
    """Every known case record: the committed table's, overridden by the cache's."""
    records: dict[str, dict[str, Any]] = {}
    committed = RESULTS / "conformance.json"
    if committed.exists():
        for r in json.loads(committed.read_text()).get("records", []):
            records[Case(r["model"], r["size"], r["kind"]).key] = r
    for path in sorted(cache.glob("*.json")):
        try:
            r = json.loads(path.read_text())
            records[Case(r["model"], r["size"], r["kind"]).key] = r
        except (json.JSONDecodeError, KeyError):
            continue
    return records


_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(\.\d+)?(e[-+]?\d+)?")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def cause_of(r: dict[str, Any]) -> str | None:
    """A record's failure, normalised so that one cause groups many models (None = fine)."""
    if r.get("kind") == "tvm":
        return None
    if r.get("status") in ("timeout", "crashed"):
        return f"{r['status']}: {r.get('error')}"
    if not r.get("compiled"):
        text = _NUMBER.sub("N", _QUOTED.sub("'…'", r.get("error") or ""))
        return f"{r.get('failed_stage')}: {text}"
    if not r.get("exact"):
        ort = r.get("ort", {})
        orig_bad = ort.get("original", {}).get("max_rel", 0) > ort.get("tolerance_rel", 1e-4)
        return ("exactness: slim and original ONNX both differ from torch in ORT" if orig_bad
                else "exactness: slim ONNX differs from the zeroed torch model in ORT")
    return None


def _normalise(category: str) -> str:
    """'unknown op: addcmul.default' -> 'unknown op: addcmul' (ATen overloads and functional
    forms of one op count as one), also inside 'pinned: ...' keys."""
    head, sep, op = category.rpartition("unknown op: ")
    return f"{head}{sep}{op.split('.')[0]}" if sep else category


def pin_categories(r: dict[str, Any]) -> dict[str, int]:
    """Pinned groups of a record by category, redrawn from the raw reasons when recorded."""
    from conformance_check import pin_category

    pins = r.get("pins") or {}
    raw = pins.get("pinned_groups_by_reason")
    if raw is None:
        out: Counter[str] = Counter()
        for cat, n in (pins.get("pinned_groups_by_category") or {}).items():
            out[_normalise(cat)] += n
        return dict(out)
    # groups per category cannot be recounted from reason counts (a group has several reasons):
    # the recorded counts are used, the raw reasons only add categories the record lacks
    out = Counter({_normalise(c): n for c, n in (pins.get("pinned_groups_by_category") or {}).items()})
    for reason, n in raw.items():
        if reason.endswith("more distinct reasons)"):  # the tail `top_reasons` summed up: no category
            continue
        cat = _normalise(pin_category(reason))
        if cat not in out:
            out[cat] = n
    return dict(out)


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100.0 * n / d:.1f}%)" if d else "0/0"


def summarize(records: dict[str, dict[str, Any]], specs: list[ModelSpec], size: str) -> dict[str, Any]:
    names = [s.name for s in specs]
    by_form = {f: {n: records.get(Case(n, size, f).key) for n in names} for f in FORMS}
    tvm = {n: records.get(Case(n, size, "tvm").key) for n in names}
    done = [n for n in names if all(by_form[f][n] is not None for f in FORMS)]
    s: dict[str, Any] = {"size": size, "models": len(done), "families": len({conformance_models.get(n).family for n in done})}
    for f in FORMS:
        rs = [by_form[f][n] for n in done]
        traced = Counter((r.get("traced") or {}).get("method", "not traced") for r in rs)
        kept: Counter[str] = Counter()
        # category -> models with it, pinned groups, zeroed filters it kept, example models
        pins: dict[str, dict[str, Any]] = defaultdict(lambda: {"models": 0, "groups": 0, "kept_filters": 0,
                                                               "examples": []})
        for r in rs:
            for why, count in ((r.get("filters") or {}).get("kept_why") or {}).items():
                why = _normalise(why)
                kept[why] += count
                if why.startswith("pinned: "):
                    pins[why[len("pinned: "):]]["kept_filters"] += count
            for cat, groups in pin_categories(r).items():
                pins[cat]["models"] += 1
                pins[cat]["groups"] += groups
                pins[cat]["examples"].append(r["model"])
        s[f] = {
            "traced": dict(traced),
            "compiled": sum(bool(r.get("compiled")) for r in rs),
            "exact": sum(bool(r.get("exact")) for r in rs),
            "zeroed_filters": sum((r.get("filters") or {}).get("zeroed", 0) for r in rs),
            "removed_filters": sum((r.get("filters") or {}).get("removed") or 0 for r in rs),
            "kept_why": dict(kept.most_common()),
            "pin_categories": {c: v for c, v in sorted(pins.items(), key=lambda kv: -kv[1]["models"])},
            "slim_onnx_larger": sorted(r["model"] for r in rs if (r.get("onnx_weights") or {}).get("slim_larger")),
            # the count of weight tensors may grow where it buys bytes: folded constants of removed
            # channels are small border kernels and bias vectors beside the slimmer weights
            "slim_onnx_more_tensors": sorted(
                r["model"] for r in rs if (w := r.get("onnx_weights") or {}).get("slim")
                and w["slim"]["tensors"] > w["original"]["tensors"]),
        }
    s["exact_both"] = sum(all(by_form[f][n].get("exact") for f in FORMS) for n in done)
    unknown: dict[str, list[str]] = defaultdict(list)
    for n in done:
        for f in FORMS:
            for cat in pin_categories(by_form[f][n]):
                if cat.startswith("unknown op") and n not in unknown[cat]:
                    unknown[cat].append(n)
    s["unknown_op_models"] = sorted({m for v in unknown.values() for m in v})
    s["unknown_ops"] = {k: sorted(v) for k, v in sorted(unknown.items())}
    tried = [r for r in tvm.values() if r is not None and r.get("compiled")]
    s["tvm"] = {"attempted": len(tried), "not_compiled": sum(1 for r in tvm.values() if r is not None and not r.get("compiled"))}
    for target in TVM_TARGETS:
        builds = [(r["model"], (r.get("tvm") or {}).get(target)) for r in tried]
        s["tvm"][target] = {
            "built": sum(bool(b and b.get("built")) for _, b in builds),
            "failed": {m: {"op": b.get("op"), "error": b.get("error")} for m, b in builds if b and not b.get("built")},
            "seconds_median": _median([b["seconds"] for _, b in builds if b and b.get("built")]),
        }
    causes: dict[str, list[str]] = defaultdict(list)
    for n in names:
        for f in FORMS:
            r = by_form[f][n]
            c = cause_of(r) if r else None
            if c:
                causes[c].append(f"{n} ({f})")
    s["causes"] = dict(sorted(causes.items(), key=lambda kv: -len(kv[1])))
    return s


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


# ---------------------------------------------------------------------------------------------
# markdown


def _fmt_m(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _short_trace(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    m = (r.get("traced") or {}).get("method")
    return {"symbolic_trace": "fx", "torch.export": "export"}.get(m, "-")


def _exact_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r.get("exact"):
        return f"yes ({r['ort']['slim']['max_rel']:.0e})"
    if r.get("compiled"):
        return f"**no** ({r.get('ort', {}).get('slim', {}).get('max_rel', float('nan')):.1e})"
    return f"**{r.get('failed_stage', r.get('status'))}**"


def _top_kept(r: dict[str, Any] | None, n: int = 2) -> str:
    kept = ((r or {}).get("filters") or {}).get("kept_why") or {}
    top = sorted(kept.items(), key=lambda kv: -kv[1])[:n]
    return "; ".join(f"{k} {v}" for k, v in top)


def _tvm_cell(r: dict[str, Any] | None, target: str) -> str:
    if r is None:
        return ""
    if not r.get("compiled"):
        return "(no slim)"
    b = (r.get("tvm") or {}).get(target)
    if not b:
        return ""
    return "yes" if b.get("built") else f"**no** ({b.get('op') or 'see json'})"


def render(summaries: list[dict[str, Any]], records: dict[str, dict[str, Any]], specs: list[ModelSpec],
           meta: dict[str, Any]) -> str:
    lines = ["# Conformance: timm architectures through rwdeploy compile", "",
             f"Generated by `python {meta['command']}` on {meta['date']} (load average "
             f"{', '.join(f'{x:.2f}' for x in meta['loadavg'])} at the end; not a timing benchmark). "
             f"timm {meta['versions'].get('timm')}, torch {meta['versions'].get('torch')}, "
             f"onnxruntime {meta['versions'].get('onnxruntime')}, TVM {meta['versions'].get('tvm')}.",
             "",
             "Records by the rwdeploy commit that made them (records older than this field: "
             "\"unrecorded\"): " + ", ".join(f"{code} {n}" for code, n in sorted(
                 Counter(r.get("code", "unrecorded") for r in records.values()).items(), key=lambda kv: -kv[1])) + ".",
             "",
             "Each model: random init, trained-looking weights (non-trivial norm affines and biases, "
             "BatchNorm statistics calibrated on random batches), 30-50% of the filters of every conv "
             "and hidden Linear zeroed at random (without knowing rwdeploy's channel groups), saved as "
             "`.pt2` and as a pickled module, compiled by `rwdeploy.compile.compile_model` (no TVM, "
             "`--sparse off`). *Exact*: ONNX Runtime on the shipped `slim.onnx` vs the zeroed torch "
             "model, max|diff| <= 1e-4 * max|y| on two fresh inputs.", ""]
    for s in summaries:
        lines += _summary_lines(s)
    lines += ["## Per model (small side)", "",
              "| model | family | side | trace pt2/pickle | exact pt2 | exact pickle | params | MACs | "
              "zeroed filters removed (pt2) | kept: top reasons (pt2) | slim/orig ONNX bytes | TVM cpu | TVM arm |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        rp = records.get(Case(spec.name, "small", "pt2").key)
        rk = records.get(Case(spec.name, "small", "pickle").key)
        rt = records.get(Case(spec.name, "small", "tvm").key)
        base = rp if rp and rp.get("compiled") else rk
        params = (base or {}).get("params") or {}
        macs = (base or {}).get("macs") or {}
        filt = (rp or {}).get("filters") or {}
        ow = (base or {}).get("onnx_weights") or {}
        ratio = (f"{ow['slim']['bytes'] / ow['original']['bytes']:.2f}" + (" **larger**" if ow.get("slim_larger") else "")
                 if ow.get("original", {}).get("bytes") else "-")
        removed = f"{filt.get('removed')}/{filt.get('zeroed')}" if filt.get("removed") is not None else f"-/{filt.get('zeroed', '-')}"
        lines.append(
            f"| {spec.name} | {spec.family} | {spec.small} | {_short_trace(rp)}/{_short_trace(rk)} | {_exact_cell(rp)} | "
            f"{_exact_cell(rk)} | {_fmt_m(params.get('original'))}→{_fmt_m(params.get('slim'))} | "
            f"{_fmt_m(macs.get('original'))}→{_fmt_m(macs.get('slim'))} | {removed} | {_top_kept(rp)} | {ratio} | "
            f"{_tvm_cell(rt, 'cpu')} | {_tvm_cell(rt, 'arm')} |")
    return "\n".join(lines) + "\n"


def _summary_lines(s: dict[str, Any]) -> list[str]:
    n = s["models"]
    out = [f"## Summary: {s['size']} input side ({n} models, {s['families']} families)", "",
           "| | pt2 | pickle | target |", "|---|---|---|---|"]
    for label, key in (("compiled", "compiled"), ("exact in ONNX Runtime", "exact")):
        out.append(f"| {label} | {_pct(s['pt2'][key], n)} | {_pct(s['pickle'][key], n)} | |")
    out.append(f"| exact in both forms | {_pct(s['exact_both'], n)} | | >= {EXACT_TARGET:.0%} |")
    trace = lambda f: ", ".join(f"{k} {v}" for k, v in sorted(s[f]["traced"].items()))  # noqa: E731
    out.append(f"| traced by | {trace('pt2')} | {trace('pickle')} | |")
    z = {f: s[f]["zeroed_filters"] for f in FORMS}
    out.append(f"| zeroed filters removed | {_pct(s['pt2']['removed_filters'], z['pt2'])} | "
               f"{_pct(s['pickle']['removed_filters'], z['pickle'])} | |")
    out.append(f"| slim ONNX holds more weight bytes than the original | {len(s['pt2']['slim_onnx_larger'])} | "
               f"{len(s['pickle']['slim_onnx_larger'])} | 0 |")
    out.append(f"| slim ONNX holds more weight tensors than the original (fewer bytes) | "
               f"{len(s['pt2']['slim_onnx_more_tensors'])} | {len(s['pickle']['slim_onnx_more_tensors'])} | |")
    out.append(f"| models with an \"unknown op\" pin | {len(s['unknown_op_models'])} | | 0 |")
    t = s["tvm"]
    for target in TVM_TARGETS:
        out.append(f"| TVM {target} builds (slim, pt2 form) | {_pct(t[target]['built'], t['attempted'])} | | "
                   f">= {TVM_TARGET:.0%} |")
    out.append("")
    if s["pt2"]["slim_onnx_larger"] or s["pickle"]["slim_onnx_larger"]:
        out += ["Slim ONNX larger than the original: " + ", ".join(sorted(set(s["pt2"]["slim_onnx_larger"])
                                                                        | set(s["pickle"]["slim_onnx_larger"]))), ""]
    if s["unknown_ops"]:
        out += ["\"unknown op\" pins (op: models): " + "; ".join(f"`{k[len('unknown op: '):]}`: {', '.join(v)}"
                                                               for k, v in s["unknown_ops"].items()), ""]
    out += [f"### Why zeroed filters were kept ({s['size']} side; counts of filters)", "",
            "| reason | pt2 | pickle |", "|---|---|---|"]
    reasons = list(dict.fromkeys([*s["pt2"]["kept_why"], *s["pickle"]["kept_why"]]))
    for reason in reasons:
        out.append(f"| {reason} | {s['pt2']['kept_why'].get(reason, 0)} | {s['pickle']['kept_why'].get(reason, 0)} |")
    out.append("")
    out += [f"### Pin reasons by category ({s['size']} side)", "",
            "Groups the channel analysis keeps whole, by the category of their reason (`model input`/`model "
            "output` pins are by design); models = models with at least one such group.", "",
            "| category | models (pt2 / pickle) | pinned groups (pt2 / pickle) | zeroed filters kept (pt2 / pickle) | e.g. |",
            "|---|---|---|---|---|"]
    cats = list(dict.fromkeys([*s["pt2"]["pin_categories"], *s["pickle"]["pin_categories"]]))
    for cat in cats:
        a = s["pt2"]["pin_categories"].get(cat, {})
        b = s["pickle"]["pin_categories"].get(cat, {})
        examples = list(dict.fromkeys([*a.get("examples", []), *b.get("examples", [])]))
        more = f" (+{len(examples) - 4})" if len(examples) > 4 else ""
        out.append(f"| {cat} | {a.get('models', 0)} / {b.get('models', 0)} | {a.get('groups', 0)} / {b.get('groups', 0)} | "
                   f"{a.get('kept_filters', 0)} / {b.get('kept_filters', 0)} | {', '.join(examples[:4])}{more} |")
    out.append("")
    if s["causes"]:
        out += [f"### Failures by cause ({s['size']} side)", "", "| cause | cases | models |", "|---|---|---|"]
        for cause, cases in s["causes"].items():
            out.append(f"| {cause.replace('|', '/')} | {len(cases)} | {', '.join(cases)} |")
        out.append("")
    for target in TVM_TARGETS:
        failed = t[target]["failed"]
        if failed:
            ops = Counter(v["op"] or "(no op named)" for v in failed.values())
            out += [f"TVM {target} failures by op: " + "; ".join(f"`{op}` {k}" for op, k in ops.most_common()) + "", ""]
    return out


# ---------------------------------------------------------------------------------------------
# smallest input side


PROBE_SIDES = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320)


def probe_smallest(spec: ModelSpec) -> tuple[int | None, bool]:
    """The smallest side in PROBE_SIDES (or the default) the model runs at; whether it needs
    img_size= at construction."""
    import torch

    from torchvision_shim import import_timm

    timm = import_timm()
    base = timm.create_model(spec.arch, pretrained=False, **spec.kwargs).eval()
    sides = [s for s in PROBE_SIDES if s < spec.default] + [spec.default]
    for side in sides:
        model, with_kwarg = base, False
        if side != spec.default:
            try:
                model = timm.create_model(spec.arch, pretrained=False, img_size=side, **spec.kwargs).eval()
                with_kwarg = True
            except TypeError:
                pass
        try:
            with torch.no_grad():
                model(torch.randn(1, spec.channels, side, side))
            return side, with_kwarg
        except Exception:  # noqa: BLE001 - too small for this architecture
            continue
    return None, False


# ---------------------------------------------------------------------------------------------
# main


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg, dist in (("torch", "torch"), ("timm", "timm"), ("onnxruntime", "onnxruntime"), ("tvm", "apache-tvm"),
                      ("onnx", "onnx")):
        try:
            out[pkg] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def write_results(records: dict[str, dict[str, Any]], specs: list[ModelSpec], argv: list[str], out: Path) -> list[dict[str, Any]]:
    from rwdeploy.io import atomic_file

    sizes = ["small"] + (["default"] if any(k.endswith(("__default__pt2", "__default__pickle")) for k in records) else [])
    summaries = [summarize(records, specs, size) for size in sizes]
    meta = {"schema": SCHEMA, "command": " ".join(["benchmarks/conformance.py", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": list(os.getloadavg()), "versions": _versions(),
            "suite": {"models": len(SUITE), "families": len({s.family for s in SUITE})}}
    known = {s.name for s in SUITE}
    doc = {**meta, "summaries": summaries,
           "records": [_compact(records[k]) for k in sorted(records) if records[k].get("model") in known]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "conformance.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    with atomic_file(out / "conformance.md") as tmp:
        tmp.write_text(render(summaries, records, list(SUITE), meta))
    return summaries


def _compact(record: dict[str, Any]) -> dict[str, Any]:
    """The record as committed: raw reason lists cut to the most frequent (see top_reasons)."""
    from conformance_check import RAW_REASONS_KEPT, top_reasons

    out = dict(record)
    for section, key in (("pins", "pinned_groups_by_reason"), ("filters", "kept_pin_reasons")):
        raw = (out.get(section) or {}).get(key)
        if raw and len(raw) > RAW_REASONS_KEPT + 1:
            out[section] = {**out[section], key: top_reasons(Counter(raw))}
    if out.get("compiled"):
        out.pop("traceback_tail", None)
    return out


def print_summary(summaries: list[dict[str, Any]]) -> None:
    for s in summaries:
        n = s["models"]
        print(f"\n== {s['size']} side: {n} models, {s['families']} families ==")
        print(f"{'':44s}{'pt2':>20s}{'pickle':>20s}   target")
        for label, key in (("compiled", "compiled"), ("exact (ORT vs zeroed torch)", "exact")):
            print(f"{label:44s}{_pct(s['pt2'][key], n):>20s}{_pct(s['pickle'][key], n):>20s}")
        print(f"{'exact in both forms':44s}{_pct(s['exact_both'], n):>20s}{'':20s}   >= {EXACT_TARGET:.0%}")
        print(f"{'zeroed filters removed':44s}{_pct(s['pt2']['removed_filters'], s['pt2']['zeroed_filters']):>20s}"
              f"{_pct(s['pickle']['removed_filters'], s['pickle']['zeroed_filters']):>20s}")
        print(f"{'slim ONNX larger than original':44s}{len(s['pt2']['slim_onnx_larger']):>20d}"
              f"{len(s['pickle']['slim_onnx_larger']):>20d}   0")
        print(f"{'models with an unknown-op pin':44s}{len(s['unknown_op_models']):>20d}{'':20s}   0")
        for target in TVM_TARGETS:
            t = s["tvm"]
            print(f"{'TVM ' + target + ' builds':44s}{_pct(t[target]['built'], t['attempted']):>20s}{'':20s}"
                  f"   >= {TVM_TARGET:.0%}")
        for cause, cases in list(s["causes"].items())[:15]:
            print(f"  {len(cases):3d}  {cause[:150]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated suite names (default: all)")
    ap.add_argument("--families", help="comma-separated families")
    ap.add_argument("--forms", default=",".join(FORMS), help="pt2,pickle")
    ap.add_argument("--default-size", action="store_true", help="also run every model at its default side (slow)")
    ap.add_argument("--no-small", action="store_true", help="skip the small side (with --default-size)")
    ap.add_argument("--tvm", default="", help="build the slim model with TVM for these targets (cpu,arm)")
    ap.add_argument("--tvm-sample", type=int, default=0, help="TVM on this many models, stratified by family")
    ap.add_argument("--no-exact", action="store_true", help="skip the exactness cases (with --tvm)")
    ap.add_argument("--rerun", action="store_true", help="discard cached records of the selected cases")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from the records")
    ap.add_argument("--probe-sizes", action="store_true", help="re-find each selected model's smallest side")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per case (default 900 small / 1800 default)")
    ap.add_argument("--isolation", choices=("fork", "spawn"), default="fork")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    tvm = tuple(t for t in args.tvm.split(",") if t and t != "none")
    if args.worker:  # spawned child
        model, size, kind = args.worker.split("__")
        out = args.worker_out
        _child(Case(model, size, kind), out, out.with_suffix(".log"), tvm)
        return 0

    specs = select_specs(args.models, args.families)
    if args.probe_sizes:
        for spec in specs:
            side, kwarg = probe_smallest(spec)
            mark = "" if (side, kwarg) == (spec.small, spec.img_size_kwarg or side == spec.default) else "  <- differs"
            print(f"{spec.name:36s} table {spec.small:4d}  probed {side}  img_size={kwarg}{mark}", flush=True)
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    forms = [f for f in args.forms.split(",") if f]
    sizes = ([] if args.no_small else ["small"]) + (["default"] if args.default_size else [])
    cases: list[Case] = []
    if not args.no_exact:
        cases += [Case(s.name, size, f) for size in sizes for s in specs for f in forms]
    if tvm:
        tvm_specs = specs
        if args.tvm_sample:  # sample among models whose slim model exists (the pt2 form compiled)
            known = load_records(args.cache)
            compiled = [s for s in specs if (known.get(Case(s.name, "small", TVM_FORM).key) or {}).get("compiled")]
            tvm_specs = stratified(compiled or specs, args.tvm_sample)
        cases += [Case(s.name, size, "tvm") for size in sizes for s in tvm_specs]

    if not args.report_only:
        if args.rerun:
            for c in cases:
                (args.cache / f"{c.key}.json").unlink(missing_ok=True)
        todo = [c for c in cases if not (args.cache / f"{c.key}.json").exists()]
        print(f"conformance: {len(cases)} cases selected, {len(cases) - len(todo)} cached, {len(todo)} to run "
              f"({args.isolation} isolation)", flush=True)
        if todo and args.isolation == "fork":
            _warm_up()
        for i, case in enumerate(todo, 1):
            timeout = args.timeout or TIMEOUT_S[case.size]
            r = run_isolated(case, args.cache, isolation=args.isolation, tvm=tvm, timeout=timeout)
            verdict = ("exact" if r.get("exact") else (f"FAILED at {r.get('failed_stage')}: {r.get('error')}"
                       if not r.get("compiled") else f"INEXACT {r.get('ort', {}).get('slim', {}).get('max_rel')}"))
            if case.kind == "tvm":
                verdict = " ".join(f"{t}:{'ok' if (r.get('tvm') or {}).get(t, {}).get('built') else 'FAIL'}" for t in tvm) \
                    if r.get("compiled") else verdict
            print(f"[{i}/{len(todo)}] {case.key} {r['wall_s']:.0f}s {verdict}"[:400], flush=True)

    records = load_records(args.cache)
    summaries = write_results(records, list(SUITE), argv, args.out)  # the table always covers the whole suite
    print_summary(summaries)
    print(f"\nwrote {args.out / 'conformance.json'} and {args.out / 'conformance.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
