"""The compile report: `report.json` (schema `rwdeploy.report/1`), and one view of it for reading.

The JSON is the record. `view(doc)` turns it into blocks (headings, paragraphs, bullets,
tables): one part per section of the document, in the document's order, so every section
is shown. `report.md` is `markdown(view(doc))`; the terminal summary that `rwdeploy compile`
prints is the view's first part, `summary(doc)`, rendered by the CLI. Sections a run did not
produce are absent (see docs/ARCHITECTURE.md, "Report").
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Union

from rwdeploy.io import atomic_file

SCHEMA = "rwdeploy.report/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
VARIANT_ORDER = ("original", "slim", "quantized")


def make_report(sections: dict[str, Any]) -> dict[str, Any]:
    """A report document: the schema tag, then the sections that exist, in a stable order."""
    known = [k for k in SECTION_ORDER if k in sections]
    extra = sorted(k for k in sections if k not in SECTION_ORDER and k != "schema")
    return {"schema": SCHEMA, **{k: sections[k] for k in known + extra}}


def write_report(document: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write report.json and report.md into `folder` (each atomically)."""
    folder = Path(folder)
    json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
    with atomic_file(md_path) as tmp:
        tmp.write_text(render_markdown(document))
    return json_path, md_path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, set):  # (json writes tuples itself; a Path is its str)
        return list(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    return str(obj)


def layer_rows(before: Iterable[Any], after: Iterable[Any]) -> list[dict[str, Any]]:
    """Per layer (by name, in the original's order): shapes, params and MACs before and after.

    `before`/`after` are `LayerStats` of the original and the slim model. A layer missing from
    the slim model (removed outright) has `after` fields of None.
    """
    slim: dict[str, Any] = {}
    for s in after:
        slim.setdefault(s.name, s)
    rows: dict[str, dict[str, Any]] = {}
    for s in before:  # a layer called twice is one row
        a = slim.get(s.name)
        rows.setdefault(s.name, {
            "name": s.name, "type": s.type, "shape_before": list(s.weight_shape),
            "shape_after": list(a.weight_shape) if a else None, "params_before": s.params,
            "params_after": a.params if a else 0, "macs_before": s.macs, "macs_after": a.macs if a else 0,
            "zero_fraction_before": s.zero_fraction, "zero_fraction_after": a.zero_fraction if a else None})
    return list(rows.values())


def channels_section(analysis: Any, record: Any) -> dict[str, Any]:
    """Channel groups: how many, which were pinned and why (from the analysis), which were
    removed and what each layer folded (from the pass's record)."""
    groups = list(analysis.groups) if analysis is not None else []
    pinned = [
        {"id": g.id, "size": g.size, "reasons": list(g.pinned),
         "tensors": sorted({sl.tensor for sl in g.slices})}
        for g in groups if g.pinned
    ]
    section: dict[str, Any] = {"groups": len(groups), "pinned": pinned}
    data = record.to_dict() if record is not None else {}
    section["removed"] = data.pop("removed_groups", [])
    section["layer_changes"] = data.pop("layers", [])
    data.pop("pinned_groups", None)  # the same list as `pinned`
    data.pop("alignment", None)  # a section of its own
    section.update(data)
    return section


def speedups(latency: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """original/slim median latency per (runtime, target, batch, threads)."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in latency:
        key = (row["runtime"], row["target"], row["batch"], row["threads"])
        by_key.setdefault(key, {})[row["variant"]] = row
    out = []
    for (runtime, target, batch, threads), variants in by_key.items():
        if "original" in variants and "slim" in variants:
            o, s = variants["original"]["median_ms"], variants["slim"]["median_ms"]
            out.append({"runtime": runtime, "target": target, "batch": batch, "threads": threads,
                        "emulated": bool(variants["slim"].get("emulated")),
                        "original_ms": o, "slim_ms": s, "speedup": o / s if s > 0 else math.inf})
    return out


RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "tvm": "TVM"}
NOISE_RATIO = 1.05  # runtimes closer than this are not ranked: a shared machine's load moves them more


def fastest_runtimes(latency: list[dict[str, Any]], variant: str = "slim") -> list[dict[str, Any]]:
    """Per (batch, threads), the runtimes that timed `variant` in this process, fastest first.

    Only batches timed by at least two runtimes count, and never emulated or remote rows
    (their clock is not this machine's). `in_turns`: every row was timed in the same turns as
    the other runtime's calls (a local TVM target); else in separate stages, and a ratio near 1
    is within the noise of a shared machine."""
    by_key: dict[tuple[int, Any], dict[str, dict[str, Any]]] = {}
    for row in latency:
        if row["variant"] != variant or row.get("emulated") or row.get("device"):
            continue
        by_key.setdefault((row["batch"], row["threads"]), {})[row["runtime"]] = row
    out = []
    for (batch, threads), rows in sorted(by_key.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        if len(rows) < 2:
            continue
        ranked = sorted(rows.values(), key=lambda r: r["median_ms"])
        best = ranked[0]
        out.append({"batch": batch, "threads": threads, "variant": variant, "fastest": best["runtime"],
                    "target": best["target"], "in_turns": all(r.get("with_other_runtime") for r in ranked),
                    "median_ms": {r["runtime"]: r["median_ms"] for r in ranked},
                    "slower_by": {r["runtime"]: r["median_ms"] / best["median_ms"] for r in ranked[1:]
                                  if best["median_ms"] > 0}})
    return out


def runtime_choice_line(choice: dict[str, Any]) -> str:
    """One sentence: which runtime to ship the slim model with at this batch, and by how much."""
    best = choice["fastest"]
    ms = choice["median_ms"]
    others = ", ".join(f"{RUNTIME_NAMES.get(r, r)} {ms[r]:.3f} ms ({x:.2f}× slower)"
                       for r, x in choice["slower_by"].items())
    if all(x < NOISE_RATIO for x in choice["slower_by"].values()):
        how = "timed in turns" if choice.get("in_turns") else "timed in separate stages"
        ship = f"within {NOISE_RATIO - 1:.0%} of each other ({how}), either runtime"
    else:
        ship = {"onnxruntime": "ship `slim.onnx` with ONNX Runtime",
                "tvm": f"ship the TVM module for `{choice['target']}`"}.get(best, f"use {best}")
    return (f"Fastest for the {choice['variant']} model at b={choice['batch']} t={choice['threads']}: "
            f"{RUNTIME_NAMES.get(best, best)} {ms[best]:.3f} ms; {others}: {ship}{'' if ship.startswith('within') else ' on this machine'}.")


# The blocks of the view (what a reader sees), which markdown() (report.md) and the CLI's
# terminal renderer know how to draw.
class Heading(NamedTuple):
    text: str
    level: int = 2


class Paragraph(NamedTuple):
    text: str


class Bullets(NamedTuple):
    items: list[str]


class Table(NamedTuple):
    header: list[str]
    rows: list[list[str]]


Block = Union[Heading, Paragraph, Bullets, Table]


def _int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ratio(before: Any, after: Any) -> str:
    return "-" if not before or after is None else f"{after / before:.1%}"


def _shape(shape: list[int] | None) -> str:
    return "×".join(map(str, shape)) if shape else "removed"


def _tensors(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def summary(doc: dict[str, Any]) -> list[Block]:
    """The one-screen summary: original vs slim sizes and speed, packing, the worst error, a
    failed target step, the targets' notes. report.md starts with it; the CLI prints it."""
    model, files, rows = doc.get("model", {}), doc.get("files", {}), []

    def ratio_row(label: str, before: Any, after: Any, fmt: Callable[[Any], str] = _int) -> None:
        if before is not None and after is not None:
            rows.append([label, fmt(before), fmt(after), _ratio(before, after)])

    ratio_row("params", model.get("params", {}).get("original"), model.get("params", {}).get("slim"))
    ratio_row("MACs", model.get("macs", {}).get("original"), model.get("macs", {}).get("slim"))
    if "original_onnx" in files and "slim_onnx" in files:
        ratio_row("ONNX size", files["original_onnx"]["bytes"], files["slim_onnx"]["bytes"], _bytes)
    for r in speedups(doc.get("latency", [])):
        where = f" {r['target']} (emulated)" if r["emulated"] else ""
        rows.append([f"{r['runtime']}{where} b={r['batch']} t={r['threads']} ms", f"{r['original_ms']:.3f}",
                     f"{r['slim_ms']:.3f}", f"{r['speedup']:.2f}× faster"])
    for name, section in doc.get("targets", {}).items():
        insns = section.get("instructions", {}).get("per_variant", {})
        if "original" in insns and "slim" in insns:
            ratio_row(f"{name} insns/inference", insns["original"]["insns_per_inference"],
                      insns["slim"]["insns_per_inference"])
    sparse = doc.get("sparse")
    if sparse and sparse.get("skipped"):
        rows.append(["packed layers", "", "none", f"--sparse {sparse['mode']}: {sparse['target']} has no packed kernels"])
    elif sparse:
        packed = [l for l in sparse["layers"] if l["chosen"] != "dense"]
        kinds = ", ".join(sorted({l["chosen"] for l in packed})) or "none faster"
        rows.append([f"packed layers ({kinds})", "", f"{len(packed)}/{len(sparse['layers'])}",
                     f"--sparse {sparse['mode']}"])
        dense_b = sum(l["dense_bytes"] for l in sparse["layers"])
        ratio_row("weight bytes (packed)", dense_b or None, dense_b - sparse["bytes_saved"])
    align = doc.get("alignment")
    if align:
        rows.append(["zero channels kept for alignment", "", f"{align['kept_for_alignment']:,}",
                     f"--align {align['mode']}"])
    ver = doc.get("verification")
    if ver:
        rows.append(["max rel. error", "", f"{ver['max_rel']:.2e}", f"tol {ver['tolerance_rel']:g}"])
    blocks: list[Block] = [Table(["", "original", "slim", "slim/original"], rows)] if rows else []
    if model:
        src = model.get("path") or model.get("source")
        blocks.append(Paragraph(f"Source: `{src}` ({model.get('source')}), input shape {model.get('input_shape')}, "
                                f"traced with `{doc.get('trace', {}).get('method', '?')}`."))
    whole = (doc.get("alignment") or {}).get("whole_model")
    if whole and whole.get("candidates"):
        blocks.append(Paragraph(alignment_line(whole)))
    f64 = (ver or {}).get("float64")
    if f64:
        blocks.append(Paragraph(
            f"Ill-conditioned in float32 at the probes: slim and original differ by {ver['max_rel']:.2e} in float32, "
            f"as much as float32 rounding alone moves them (original {f64['float32_noise_of_original']:.2e}, "
            f"slim {f64['float32_noise_of_slim']:.2e}, against their float64 values); in float64 they agree to "
            f"{f64['max_rel']:.2e}."))
    fixed = doc.get("trace", {}).get("onnx_fixed_batch")
    if fixed:
        pt2 = "keeps its batch dynamic" if files.get("slim_pt2", {}).get("dynamic_batch") else "fixes it too"
        blocks.append(Paragraph(f"The ONNX files fix the batch at {fixed['batch']} ({fixed['why']}); "
                                f"`slim.pt2` {pt2}."))
    for choice in doc.get("runtime_choice", []):
        blocks.append(Paragraph(runtime_choice_line(choice)))
    hint = alignment_hint(doc)
    if hint:
        blocks.append(Paragraph(hint))
    if doc.get("target_failure"):
        blocks.append(Paragraph(f"FAILED {doc['target_failure']['summary']}."))
    notes = [f"{name}: {note}" for name, section in doc.get("targets", {}).items() for note in section.get("notes", [])]
    return blocks + ([Bullets(notes)] if notes else [])


def _failure_view(f: dict[str, Any]) -> list[Block]:
    return [Bullets([f"step `{f['stage']}` ({f['title']}), --target {f['target']}", f"error: {f['error']}",
                     f"node: `{f['node']}`" if f.get("node") else "node: not known",
                     f"what to do: {f['hint']}"])]


def _entries(d: dict[str, Any], leave_out: str = "") -> list[Block]:
    return [Bullets([f"{k}: {v}" for k, v in d.items() if k != leave_out])]


def _compile_view(c: dict[str, Any]) -> list[Block]:
    seconds = [[stage, f"{s:.2f}"] for stage, s in c.get("stage_seconds", {}).items()]
    return [*_entries(c, "stage_seconds"), *([Table(["stage", "seconds"], seconds)] if seconds else [])]


def _layers_view(layers: list[dict[str, Any]]) -> list[Block]:
    return [Table(["layer", "type", "shape before", "shape after", "params before", "params after", "MACs before",
                   "MACs after"],
                  [[r["name"], r["type"], _shape(r["shape_before"]), _shape(r["shape_after"]), _int(r["params_before"]),
                    _int(r["params_after"]), _int(r["macs_before"]), _int(r["macs_after"])] for r in layers])]


def _removed_line(g: dict[str, Any]) -> str:
    why = f" ({', '.join(g['why'])})" if g.get("why") else ""
    why += f", {g['kept_for_alignment']} more kept for alignment" if g.get("kept_for_alignment") else ""
    return (f"group {g.get('id', '?')}: {g.get('removed', '?')} of {g.get('size', '?')} channels{why}; "
            f"{_tensors(g.get('tensors', []))}")


def _channels_view(ch: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Paragraph(f"{ch['groups']} groups analysed.")]
    if ch.get("removed"):
        blocks += [Paragraph("Removed:"), Bullets([_removed_line(g) for g in ch["removed"]])]
    folded = [c for c in ch.get("layer_changes", []) if c.get("folded")]
    if folded:
        blocks += [Paragraph("Constants of removed channels folded into:"),
                   Bullets([f"{c['name']}: {c['folded']}" for c in folded])]
    if ch.get("pinned"):
        blocks += [Paragraph("Pinned (kept whatever their weights):"),
                   Bullets([f"group {g['id']} ({g['size']} channels; {_tensors(g['tensors'])}): "
                            f"{'; '.join(g['reasons'])}" for g in ch["pinned"]])]
    return blocks


def alignment_hint(doc: dict[str, Any]) -> str | None:
    """Where the slim model ran slower than the original on ONNX Runtime with alignment off: the
    likely cause and the option that measures it away (a timm MobileNetV2 at 90 % irregular
    sparsity: 0.77x with `--align off`, 1.54x with `auto`, 56 zero channels kept)."""
    if doc.get("alignment") is not None:
        return None
    slower = [r for r in speedups(doc.get("latency", []))
              if r["runtime"] == "onnxruntime" and not r["emulated"] and r["speedup"] < 1]
    if not slower:
        return None
    worst = min(slower, key=lambda r: r["speedup"])
    return (f"The slim model is slower than the original on ONNX Runtime ({worst['speedup']:.2f}× at "
            f"b={worst['batch']}): its channel counts are likely not multiples of the vector width; "
            f"`--align auto` keeps a few zero channels (exact) where that measures faster.")


def alignment_line(whole: dict[str, Any]) -> str:
    """`--align auto`'s whole-model choice in one line: the chosen candidate's speed-up over the
    original, then the others' (e.g. "alignment: auto chose N=16 (1.39x vs original at batch 1; off 0.74x)")."""
    rows = {r["name"]: r for r in whole["candidates"]}
    chosen = rows[whole["chosen"]]
    others = ", ".join(f"{n} {r['speedup_vs_original']:.2f}x" for n, r in rows.items() if n != whole["chosen"])
    # the batch it was timed at: the choice holds for that batch size (`--align-batch`)
    at = f" at batch {whole['batch']}" if whole.get("batch") else ""
    return f"alignment: auto chose {whole['chosen']} ({chosen['speedup_vs_original']:.2f}x vs original{at}; {others})"


def _alignment_view(al: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    whole = al.get("whole_model")
    if whole:
        head = (f"`--align auto` chose `{whole['chosen']}` for the whole model: {whole['reason']}"
                + (f" (measured on {whole['measured_on']})." if whole.get("measured_on") else "."))
        blocks.append(Paragraph(head))
        if whole.get("candidates"):
            rows = [[r["name"] + (" (chosen)" if r["name"] == whole["chosen"] else ""), r["align"],
                     str(r["kept_for_alignment"]), f"{r['params']:,}", f"{r['median_ms']:.4g}",
                     f"{r['speedup_vs_original']:.2f}×" + (f" (same model as {r['same_as']})" if r.get("same_as") else "")]
                    for r in whole["candidates"]]
            rows.append(["original (dense, reference)", "", "", "", f"{whole['original_ms']:.4g}", "1.00×"])
            blocks.append(Table(["candidate", "align", "kept for alignment", "params", "median ms", "vs original"], rows))
    how = (f"measured on {al['measured_on']}" if al.get("measured_on") else "nothing measured")
    rule = ("where faster (measured, else by the cost model)" if al["mode"] == "auto"
            else "where the group has that many")
    head = (f"`--align {al['mode']}`: kept counts rounded up to multiples of {al['multiple']} tensor channels {rule}; "
            f"{al['kept_for_alignment']} removable zero channels kept ({how}).")
    if whole:
        head = (f"The chosen plan ({whole['chosen']}): {al['kept_for_alignment']} removable zero channels kept"
                + (" (no group keeps any)" if not al["groups"] else "")
                + (f"; its groups' layers timed on {whole['groups_measured_on']}." if whole.get("groups_measured_on")
                   else "."))
    rows = [[str(g["id"]), str(g["size"]), str(g["removable"]), str(g["removed"]), str(g["kept_for_alignment"]),
             str(g["kept"]), g["reason"]] for g in al["groups"]]
    blocks.append(Paragraph(head + (f" {al['note']}." if al.get("note") else "")))
    if rows:
        blocks.append(Table(["group", "channels", "removable", "removed", "kept for alignment", "kept", "why"], rows))
    return blocks


def _sparse_view(sp: dict[str, Any]) -> list[Block]:
    if sp.get("skipped"):
        return [Paragraph(f"`--sparse {sp['mode']}`: {sp['skipped']}.")]
    head = (f"`--sparse {sp['mode']}`: {sp['packed_layers']} of {len(sp['layers'])} layers packed, "
            f"{_bytes(sp['bytes_saved'])} of weights saved; timed on {sp.get('measured_on') or 'nothing (forced)'}; "
            f"packed vs slim max relative error {sp.get('max_rel_vs_slim', float('nan')):.3g}.")
    rows = [[l["name"], l["kind"], _shape(l["weight_shape"]), f"{l['sparsity']:.1%}", l["chosen"], l["reason"],
             _bytes(l["dense_bytes"]), _bytes(l["packed_bytes"])] for l in sp["layers"]]
    return [Paragraph(head), Table(["layer", "kind", "weight", "sparsity", "stored as", "why", "dense", "packed"], rows),
            *([Bullets(sp["notes"])] if sp.get("notes") else [])]


def _verification_view(ver: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    if "max_rel" in ver:
        blocks.append(Paragraph(
            f"Slim vs original on {len(ver.get('probe_inputs', []))} probe inputs: max abs error {ver['max_abs']:.3g}, "
            f"max relative error {ver['max_rel']:.3g} (tolerance {ver['tolerance_rel']:g}): "
            f"{'passed' if ver['passed'] else 'FAILED'}."))
    ort = ver.get("onnxruntime", {})
    checks = [f"ONNX Runtime vs torch, {v}: max abs {ort[v]['max_abs']:.3g}, max relative {ort[v]['max_rel']:.3g}"
              for v in VARIANT_ORDER if v in ort]
    return blocks + ([Bullets(checks)] if checks else [])


def _quantization_view(q: dict[str, Any]) -> list[Block]:
    onnx_q, tvm_q, size = q.get("onnx", {}), q.get("tvm", {}), q.get("storage", {})
    blocks: list[Block] = [Paragraph(
        f"{q.get('bits')}-bit weights, {'per channel' if q.get('per_channel') else 'per layer'}, power-of-two scales. "
        f"QDQ ONNX stores them as {onnx_q.get('storage')} (opset {onnx_q.get('opset')}); ONNX Runtime vs the slim torch "
        f"model: max rel. error {onnx_q.get('check', {}).get('max_rel', float('nan')):.3g}.")]
    if tvm_q:
        blocks.append(Paragraph(
            f"TVM build for the host ({tvm_q.get('weights')} weights): library {_bytes(tvm_q.get('library_bytes'))} vs "
            f"{_bytes(tvm_q.get('float_library_bytes'))} with float weights; max rel. error "
            f"{tvm_q.get('check', {}).get('max_rel', float('nan')):.3g}."))
    if size:
        bits = q.get("bits")
        blocks.append(Paragraph(
            f"Weights counted: float32 {_bytes(size.get('float32_bytes'))}, dense {bits}-bit "
            f"{_bytes(size.get('dense_quantized_bytes'))}, sparse {bits}-bit {_bytes(size.get('sparse_quantized_bytes'))} "
            f"({size.get('counting')})."))
    return blocks


def _files_view(files: dict[str, Any]) -> list[Block]:
    return [Table(["file", "role", "size"], [[f"`{Path(info['path']).name}`", role, _bytes(info.get("bytes"))]
                                             for role, info in files.items()])]


def _latency_view(latency: list[dict[str, Any]]) -> list[Block]:
    """One table per (runtime, target): batch rows, each variant's median (p90, n), speed-up."""
    groups: dict[tuple[str, str], dict[tuple[int, int], dict[str, dict[str, Any]]]] = {}
    for r in latency:
        key = (r["runtime"] + (" (emulated)" if r.get("emulated") else ""), r["target"])
        groups.setdefault(key, {}).setdefault((r["batch"], r["threads"]), {})[r["variant"]] = r
    blocks: list[Block] = []
    for (runtime, target), by_batch in groups.items():
        variants = sorted({v for row in by_batch.values() for v in row},
                          key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER))
        rows = []
        for (batch, threads), row in sorted(by_batch.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
            o, sl = row.get("original"), row.get("slim")
            speed = f"{o['median_ms'] / sl['median_ms']:.2f}×" if o and sl and sl["median_ms"] > 0 else "-"
            cells = [f"{row[v]['median_ms']:.3f} ({row[v]['p90_ms']:.3f}, n={row[v]['n']})" if v in row else "-"
                     for v in variants]
            rows.append([str(batch), str(threads), *cells, speed])
        blocks += [Heading(f"{runtime} on {target}", 3),
                   Table(["batch", "threads", *[f"{v} median ms (p90, n)" for v in variants], "speed-up original/slim"],
                         rows)]
    return blocks


def _targets_view(targets: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    for name, section in targets.items():
        tgt = section.get("target", {})
        host = f", host `{tgt.get('host')}`" if tgt.get("host") else ""
        blocks += [Heading(name, 3), Paragraph(f"TVM target `{tgt.get('tvm_target')}`{host}.")]
        rows = [[b["variant"], str(b["batch"]), f"`{b['path']}`" if b.get("path") else "(not shipped)",
                 f"{b['build_s']:.1f}", _bytes(b.get("size_bytes")), ", ".join(b.get("device_modules") or []) or "host",
                 f"{b['kernels'].get('scheduled', 0)}/{sum(b['kernels'].values())}" if b.get("kernels")
                 else "TVM default"] for b in section.get("builds", [])]
        if rows:  # gpu kernels: TVM's default (dlight) schedules, not counted
            blocks.append(Table(["variant", "batch", "file", "build s", "size", "device code", "kernels scheduled"],
                                rows))
        notes = sorted({n for b in section.get("builds", []) for n in b.get("notes") or []}
                       - set(section.get("notes") or []))
        if notes:
            blocks.append(Bullets(notes))
    return blocks


def _other_view(value: Any) -> list[Block]:
    """A section this module has no layout for: its entries, as JSON."""
    items = value.items() if isinstance(value, dict) else enumerate(value if isinstance(value, list) else [value])
    return [Bullets([f"{k}: {json.dumps(v, default=_json_default)}" for k, v in items])]


# section -> (heading, view), in the document's order (the summary's heading is the report's own)
SECTION_VIEWS: dict[str, tuple[str, Callable[[Any], list[Block]]]] = {
    "target_failure": ("Target step failed", _failure_view),
    "compile": ("Settings", _compile_view),
    "trace": ("Trace", _entries),
    "layers": ("Layers", _layers_view),
    "channels": ("Channel groups", _channels_view),
    "alignment": ("Channel alignment", _alignment_view),
    "sparse": ("Sparse packing", _sparse_view),
    "verification": ("Equivalence", _verification_view),
    "quantization": ("Quantization", _quantization_view),
    "files": ("Files", _files_view),
    "latency": ("Latency", _latency_view),
    "runtime_choice": ("Fastest runtime", lambda rows: [Bullets([runtime_choice_line(c) for c in rows])]),
    "targets": ("Targets", _targets_view),
    "environment": ("Environment", _entries),
}
# Order of the sections in the JSON document (unknown sections follow, sorted).
SECTION_ORDER = ("model", *SECTION_VIEWS)


def view(doc: dict[str, Any]) -> list[Block]:
    """The whole report for reading: title, summary, then every other section in document order."""
    model = doc.get("model", {})
    name = model.get("arch") or (Path(model["path"]).name if model.get("path") else "model")
    blocks: list[Block] = [Heading(f"rwdeploy compile report: {name}", 1), Paragraph(f"Schema `{doc.get('schema')}`.")]
    first = summary(doc)
    blocks += [Heading("Summary"), *first] if first else []
    for key, value in doc.items():
        if key in ("schema", "model") or not value:
            continue
        title, section_view = SECTION_VIEWS.get(key, (key, _other_view))
        blocks += [Heading(title), *section_view(value)]
    return blocks


def markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            lines.append(b.text)
        elif isinstance(b, Bullets):
            lines += [f"- {item}" for item in b.items]
        else:
            lines += ["| " + " | ".join(b.header) + " |", "|" + "|".join("---" for _ in b.header) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in b.rows]
        lines.append("")
    return "\n".join(lines)


def render_markdown(doc: dict[str, Any]) -> str:
    return markdown(view(doc))
