"""Run one conformance case and describe it as a JSON-ready record.

A case is (suite entry, input size, form). `run_case` prepares the zeroed model
(`conformance_prepare`), saves it in the form, and compiles the file through rwdeploy's public
entry points (`rwdeploy.io.load_model` + `rwdeploy.compile.compile_model`, no latency
measurement, sparse packing off: the suite is about channel removal). Then, independently of
the compile's own checks:

* exactness: ONNX Runtime runs the shipped `slim.onnx` (and `original.onnx`) on fresh random
  inputs and is compared with the zeroed torch model: exact when max|slim - zeroed| <=
  1e-4 * max|zeroed| on every probe;
* filters: each zeroed filter is looked up in rwdeploy's channel groups (a fresh analysis of the
  same trace) and counted as removed (the compile report's removed channels) or kept, with why:
  the pin reasons of its group by category, or "coupled channels not all zero" (another
  producer of the same channel carries weights), or "given back (structural constraint)";
* ONNX size: initializers (and Constant node tensors) of the slim file vs the original's;
* TVM (optional): `rwdeploy.runtime.tvm_build.build` of the slim program for cpu and arm, each
  recorded on its own, with the failing op where the error names one.
"""
from __future__ import annotations

import contextlib
import re
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch
from torch import fx

from conformance_models import ModelSpec
from conformance_prepare import PreparedModel, prepare, save

TOLERANCE = 1e-4  # max |slim - zeroed| / max |zeroed|, as the issue defines exact
PROBE_SEEDS = ((1001, 1.0), (1002, 3.0))  # (seed, scale) of the inputs ORT is checked on
MAX_ERROR_CHARS = 300


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    hint = getattr(err, "hint", None)
    line = f"{type(err).__name__}: {first}" + (f" ({hint})" if hint and hint not in first else "")
    return line[:MAX_ERROR_CHARS]


# ---------------------------------------------------------------------------------------------
# pin reasons -> categories

# (pattern in the reason text, category); the first match wins. Reasons look like
# "<node> (<op>): <why>", "model output", "<tensor> is used by N ops".
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("not understood by the channel analysis", "unknown op"),
    ("analysis failed", "analysis error"),
    ("model output", "model output"),
    ("model input", "model input"),
    ("is used by", "shared tensor"),
    ("layer norm over channels", "LayerNorm over channels"),
    ("functional normalisation with channel-wise parameters", "functional norm with channel parameters"),
    ("varies along channels", "constant varying along channels"),
    ("extra tensor argument", "extra tensor argument"),
    ("shape op the analysis could not follow", "shape op not followed"),
    ("indexing along channels", "indexing along channels"),
    ("pooling/padding", "pooling/padding over channels"),
    ("reduction over dims computed at run time", "reduction over run-time dims"),
    ("softmax without an explicit dim", "softmax without dim"),
    ("matmul with a weight tensor", "matmul with a weight tensor"),
    ("weight is not a parameter used once", "functional layer with a shared/computed weight"),
    ("parameters used elsewhere", "functional layer with a shared/computed weight"),
    ("channels are not on", "channels not on the channel dim"),
    ("changes the rank", "elementwise op changes the rank"),
    ("training", "training-mode op"),
    ("extra arguments", "layer with extra arguments"),
    ("groups or", "transposed conv with groups/output_size"),
)
_OP_IN_REASON = re.compile(r"^\S+ \((.+?)\): ")  # "<node> (<op>): ...", op may be ".norm()"


RAW_REASONS_KEPT = 12  # distinct raw reasons a record keeps (node names make many distinct)


def top_reasons(counts: Counter[str]) -> dict[str, int]:
    """The most frequent raw reasons, plus how many other distinct ones there were."""
    top = dict(counts.most_common(RAW_REASONS_KEPT))
    rest = len(counts) - len(top)
    if rest > 0:
        top[f"({rest} more distinct reasons)"] = sum(counts.values()) - sum(top.values())
    return top


def pin_category(reason: str) -> str:
    """'unknown op: <op>' for an op the analysis does not know, else the kind of reason."""
    for pattern, category in _CATEGORIES:
        if pattern in reason:
            if category in ("unknown op", "analysis error"):
                op = _OP_IN_REASON.match(reason)
                name = op.group(1) if op else "?"
                if name.startswith(".") and name.endswith("()"):  # a method: ".norm()"
                    name = name[1:-2]
                return f"{category}: {name.split('.')[0]}"  # "addcmul.default" -> "addcmul"
            return category
    why = reason.split(": ", 1)[-1]
    return f"other: {why[:80]}"


# ---------------------------------------------------------------------------------------------
# compile


@contextlib.contextmanager
def _tvm_free_target() -> Iterator[str]:
    """The target name that compiles without TVM.

    The pipeline's `onnx` target does exactly that once it exists (issue 10 point 4). Until
    then, the `cpu` entry of the documented target registry (`compile.TARGET_STAGES`) is
    emptied for the duration of the compile: the same slim stages and report, no TVM build.
    """
    from rwdeploy import compile as compile_mod

    if "onnx" in compile_mod.TARGET_STAGES:
        yield "onnx"
        return
    saved = compile_mod.TARGET_STAGES["cpu"]
    compile_mod.TARGET_STAGES["cpu"] = ()
    try:
        yield "cpu"
    finally:
        compile_mod.TARGET_STAGES["cpu"] = saved


def compile_file(path: Path, input_shape: tuple[int, ...], form: str, out: Path) -> dict[str, Any]:
    """rwdeploy.io.load_model + rwdeploy.compile.compile_model; the report, or where it failed."""
    from rwdeploy.compile import CompileOptions, compile_model
    from rwdeploy.io import load_model

    stage = {"name": "load"}

    def progress(st: Any, index: int, total: int, state: str) -> None:
        if state == "start":
            stage["name"] = st.name

    try:
        if form == "pickle":
            loaded = load_model(path, trust_pickle=True, input_shape=input_shape)
        else:
            loaded = load_model(path)
        with _tvm_free_target() as target:
            options = CompileOptions(out=out, target=target, measure=False, batches=(1,), sparse="off")
            result = compile_model(loaded, options, progress=progress)
    except Exception as err:  # noqa: BLE001 - every failure is a finding, recorded with its stage
        return {"compiled": False, "failed_stage": stage["name"], "error": one_line(err),
                "error_type": type(err).__name__, "traceback_tail": traceback.format_exc()[-1500:]}
    return {"compiled": True, "report": result.report, "target_used": target}


# ---------------------------------------------------------------------------------------------
# exactness in ONNX Runtime


def ort_max_rel(onnx_path: Path, reference: Callable[[torch.Tensor], torch.Tensor],
                inputs: list[torch.Tensor]) -> dict[str, float]:
    """Worst max|ort - ref| and that over max|ref|, over the inputs (one ORT thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst_abs = worst_rel = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = reference(x)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach().double().numpy()
        got = session.run(None, {name: x.numpy()})[0].astype(np.float64)
        if got.shape != ref.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf"),
                    "shape_mismatch": [list(got.shape), list(ref.shape)]}
        diff = float(np.abs(got - ref).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    return {"max_abs": worst_abs, "max_rel": worst_rel}


def probe_inputs(prepared: PreparedModel, batch: int) -> list[torch.Tensor]:
    return [prepared.example_input(batch=batch, seed=seed) * scale for seed, scale in PROBE_SEEDS]


# ---------------------------------------------------------------------------------------------
# ONNX weights


def onnx_weights(path: Path) -> dict[str, int]:
    """Initializers plus Constant-node tensors: how many, and their bytes."""
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors.extend(a.t for a in node.attribute if a.name == "value")
    total = 0
    for t in tensors:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return {"tensors": len(tensors), "initializers": len(model.graph.initializer), "bytes": total}


# ---------------------------------------------------------------------------------------------
# zeroed filters: removed or kept, and why


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, fx.GraphModule):  # ExportedProgram.module() refuses train()/eval()
        return fx.GraphModule(module, module.graph)
    return module


def analyse(path: Path, input_shape: tuple[int, ...], form: str) -> tuple[Any, Any]:
    """rwdeploy's trace and channel analysis of the saved file, as the compile sees it."""
    from rwdeploy.io import load_model
    from rwdeploy.passes.channel_groups import analyze_channel_groups
    from rwdeploy.passes.trace import trace_model

    loaded = load_model(path, trust_pickle=True, input_shape=input_shape) if form == "pickle" else load_model(path)
    x = loaded.example_input(seed=0)
    traced = trace_model(_plain(loaded.module), x)
    with torch.no_grad():
        analysis = analyze_channel_groups(traced.gm, x)
    return traced, analysis


def pins_summary(analysis: Any) -> dict[str, Any]:
    """Pinned groups by category, and by raw reason (so that categories can be redrawn)."""
    by_category: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for g in analysis.groups:
        for cat in {pin_category(r) for r in g.pinned}:
            by_category[cat] += 1
        by_reason.update({r[:MAX_ERROR_CHARS] for r in g.pinned})
    return {"groups": len(analysis.groups), "pinned_groups": sum(bool(g.pinned) for g in analysis.groups),
            "pinned_groups_by_category": dict(sorted(by_category.items())),
            "pinned_groups_by_reason": top_reasons(by_reason)}


def filter_accounting(prepared: PreparedModel, analysis: Any, channels: dict[str, Any] | None,
                      state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every zeroed filter: removed by the compile, or kept and why (counted by category)."""
    owner: dict[tuple[str, int], tuple[Any, int]] = {}  # (tensor, row) -> (group, channel)
    followers: set[str] = set()  # tensors sliced along with a channel they pass through (depthwise)
    for g in analysis.groups:
        for s in g.slices:
            if s.role == "follower" and s.dim == 0:
                followers.add(s.tensor)
            if s.role != "producer" or s.dim != 0:
                continue
            for c, rows in enumerate(s.indices):
                for r in rows:
                    owner.setdefault((s.tensor, r), (g, c))
    removed: dict[int, set[int]] | None = None
    consistent = None
    if channels is not None:
        removed = {entry["id"]: set(entry["channels"]) for entry in channels.get("removed", [])}
        by_id = {g.id: g for g in analysis.groups}
        consistent = channels.get("groups") == len(analysis.groups) and all(
            gid in by_id and sorted({s.tensor for s in by_id[gid].slices}) == entry["tensors"]
            for entry in channels.get("removed", []) for gid in [entry["id"]])
    kept_why: Counter[str] = Counter()
    kept_reasons: Counter[str] = Counter()  # raw pin reasons of the kept filters
    no_group: Counter[str] = Counter()  # layers whose zeroed filters no group produces
    n_removed = n_kept = 0
    for layer, rows in prepared.zeroed.items():
        key = f"{layer}.weight"
        for r in rows:
            hit = owner.get((key, r))
            if hit is None:
                why = "depthwise filter (follows its input channel)" if key in followers else "in no channel group"
                kept_why[why] += 1
                no_group[f"{layer} ({why.split()[0]})"] += 1
                n_kept += 1
                continue
            g, c = hit
            if removed is not None and consistent and c in removed.get(g.id, ()):
                n_removed += 1
                continue
            n_kept += 1
            if g.pinned:
                for cat in sorted({pin_category(reason) for reason in g.pinned}):
                    kept_why[f"pinned: {cat}"] += 1
                kept_reasons.update({reason[:MAX_ERROR_CHARS] for reason in g.pinned})
            elif not _producers_zero(g, c, state_dict):
                kept_why["coupled channels not all zero"] += 1
            elif removed is None or not consistent:
                kept_why["not compiled"] += 1
            else:
                kept_why["given back (structural constraint)"] += 1
    return {"zeroed": prepared.zeroed_filters, "zeroed_layers": len(prepared.zeroed),
            "layers": prepared.layers, "removed": n_removed if removed is not None and consistent else None,
            "kept": n_kept, "kept_why": dict(sorted(kept_why.items())),
            "kept_pin_reasons": top_reasons(kept_reasons),
            "no_producer_group_layers": dict(no_group.most_common(8)), "report_consistent": consistent}


def _producers_zero(group: Any, c: int, state_dict: dict[str, torch.Tensor]) -> bool:
    for s in group.slices_with("producer"):
        t = state_dict.get(s.tensor)
        if t is None:
            return False
        t = t.detach()
        if s.span is not None:  # grouped convs: the channel lives in these rows only
            lo, hi = s.span[c]
            t = t.narrow(0, lo, hi - lo)
        if bool(t.index_select(s.dim, torch.tensor(s.indices[c], dtype=torch.long)).any()):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# TVM


_UNSUPPORTED = re.compile(r"Unsupported function types? \[([^\]]*)\]")
_ATEN_OP = re.compile(r"\b(?:aten\.)?([a-z_][a-z0-9_]*)\.(?:default|Tensor|int|Scalar|dim|self)\b")


def failing_op(message: str) -> str | None:
    """The op a TVM error names, where it names one."""
    m = _UNSUPPORTED.search(message)
    if m:
        return ", ".join(x.strip(" '\"").split(".")[0] for x in m.group(1).split(","))
    m = _ATEN_OP.search(message)
    return m.group(1) if m else None


def _program_input_shape(program: torch.export.ExportedProgram, fallback: tuple[int, ...]) -> tuple[int, ...]:
    """The input shape the program accepts, at batch 1 where its batch is dynamic."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and isinstance(val, torch.Tensor):
            return tuple(d if isinstance(d, int) else 1 for d in val.shape)
    return fallback


def tvm_builds(slim_pt2: Path, input_shape: tuple[int, ...], targets: tuple[str, ...]) -> dict[str, Any]:
    """Build the shipped slim program for each target; each failure is recorded on its own."""
    import rwdeploy.sparse  # noqa: F401 - custom ops a packed program may hold
    from rwdeploy.runtime import tvm_build

    program = torch.export.load(str(slim_pt2))
    module = program.module()
    x = torch.randn(_program_input_shape(program, input_shape), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for target in targets:
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix=f"conf-tvm-{target}-") as tmp:
                art = tvm_build.build(module, x, target, out_dir=tmp)
                out[target] = {"built": True, "seconds": round(time.perf_counter() - t0, 1),
                               "size_bytes": art.size_bytes,
                               "unscheduled_kernels": len(art.kernels.get("unscheduled", []))}
        except Exception as err:  # noqa: BLE001
            text = f"{type(err).__name__}: {err}"
            out[target] = {"built": False, "seconds": round(time.perf_counter() - t0, 1),
                           "error": one_line(err), "op": failing_op(text)}
    return out


# ---------------------------------------------------------------------------------------------
# one case


def run_case(spec: ModelSpec, size_name: str, form: str, *, tvm: tuple[str, ...] = (),
             workdir: Path | None = None, account: bool = True) -> dict[str, Any]:
    """Everything the suite records about one (model, size, form). `account=False` skips the
    second channel analysis that accounts for each zeroed filter (pins, removed vs kept)."""
    size = spec.size(size_name)
    record: dict[str, Any] = {"model": spec.name, "arch": spec.arch, "family": spec.family,
                              "form": form, "size": size_name, "input_shape": [1, spec.channels, size, size],
                              "deploy": spec.deploy}
    seconds: dict[str, float] = {}
    record["seconds"] = seconds
    tmp_ctx = tempfile.TemporaryDirectory(prefix="conf-") if workdir is None else contextlib.nullcontext(workdir)
    with tmp_ctx as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        prepared = prepare(spec, size)
        seconds["prepare"] = time.perf_counter() - t0
        record["filters"] = {"zeroed": prepared.zeroed_filters, "layers": prepared.layers}
        t0 = time.perf_counter()
        try:
            path, facts = save(prepared, form, tmp)
        except Exception as err:  # noqa: BLE001 - e.g. torch.export of the model itself fails
            record.update(status="failed", compiled=False, failed_stage=f"save {form}", error=one_line(err))
            return record
        seconds["save"] = time.perf_counter() - t0
        record["saved"] = facts
        input_shape = prepared.input_shape

        t0 = time.perf_counter()
        out = tmp / "out"
        compiled = compile_file(path, input_shape, form, out)
        seconds["compile"] = time.perf_counter() - t0
        report = compiled.pop("report", None)
        record.update(compiled)

        if account:
            t0 = time.perf_counter()
            try:
                traced, analysis = analyse(path, input_shape, form)
                record["traced"] = traced.to_dict()
                record["pins"] = pins_summary(analysis)
                record["filters"] = filter_accounting(prepared, analysis,
                                                      report.get("channels") if report else None,
                                                      traced.gm.state_dict())
            except Exception as err:  # noqa: BLE001
                record["analysis_error"] = one_line(err)
            seconds["analyse"] = time.perf_counter() - t0

        if report is not None:
            _from_report(record, report)
            t0 = time.perf_counter()
            fixed = report.get("trace", {}).get("onnx_fixed_batch")  # ONNX files at the compile's batch
            batch = 2 if report["files"]["slim_onnx"].get("dynamic_batch") else fixed["batch"] if fixed else input_shape[0]
            inputs = probe_inputs(prepared, batch)
            slim = ort_max_rel(out / report["files"]["slim_onnx"]["path"], prepared.module, inputs)
            original = ort_max_rel(out / report["files"]["original_onnx"]["path"], prepared.module, inputs)
            record["ort"] = {"slim": slim, "original": original, "probe_batch": batch, "tolerance_rel": TOLERANCE}
            record["exact"] = slim["max_rel"] <= TOLERANCE
            weights = {v: onnx_weights(out / report["files"][f"{v}_onnx"]["path"]) for v in ("original", "slim")}
            weights["slim_larger"] = weights["slim"]["bytes"] > weights["original"]["bytes"]
            record["onnx_weights"] = weights
            seconds["ort"] = time.perf_counter() - t0
            if tvm:
                t0 = time.perf_counter()
                record["tvm"] = tvm_builds(out / report["files"]["slim_pt2"]["path"], input_shape, tvm)
                seconds["tvm"] = time.perf_counter() - t0
        else:
            record["exact"] = False
        record["status"] = "ok" if record.get("exact") else "failed"
    for k, v in seconds.items():
        seconds[k] = round(v, 2)
    return record


def _from_report(record: dict[str, Any], report: dict[str, Any]) -> None:
    model = report.get("model", {})
    record["params"] = model.get("params")
    record["macs"] = model.get("macs")
    ver = report.get("verification", {})
    record["verification"] = {"max_rel": ver.get("max_rel"), "onnxruntime": ver.get("onnxruntime")}
    record["trace_report"] = report.get("trace")
    files = report.get("files", {})
    record["dynamic_batch"] = {role: files.get(role, {}).get("dynamic_batch") for role in ("slim_pt2", "slim_onnx")}
    record["compile_input_shape"] = model.get("input_shape")
    record["compile_stage_seconds"] = {k: round(v, 2) for k, v in
                                       (report.get("compile", {}).get("stage_seconds") or {}).items()}
