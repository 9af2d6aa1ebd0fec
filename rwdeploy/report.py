"""The compile report: `report.json` (schema `rwdeploy.report/1`) and a readable `report.md`.

The JSON is the record; the markdown is rendered from it and nothing else, so both always
agree. Sections a run did not produce are absent (see docs/ARCHITECTURE.md, "Report").
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from rwdeploy.io import atomic_file

SCHEMA = "rwdeploy.report/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# Order of the sections in the JSON document (unknown sections follow, sorted).
SECTION_ORDER = ("model", "compile", "trace", "layers", "channels", "sparse", "verification",
                 "files", "latency", "targets", "environment")


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
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    return str(obj)


# ---------------------------------------------------------------------------------------------
# Building sections


def layer_rows(before: Iterable[Any], after: Iterable[Any]) -> list[dict[str, Any]]:
    """Per layer (by name, in the original's order): shapes, params and MACs before and after.

    `before`/`after` are `LayerStats` of the original and the slim model. A layer missing from
    the slim model (removed outright) has `after` fields of None.
    """
    slim = {}
    for s in after:
        slim.setdefault(s.name, s)
    rows, seen = [], set()
    for s in before:
        if s.name in seen:  # a layer called twice is one row
            continue
        seen.add(s.name)
        a = slim.get(s.name)
        rows.append({
            "name": s.name,
            "type": s.type,
            "shape_before": list(s.weight_shape),
            "shape_after": list(a.weight_shape) if a else None,
            "params_before": s.params,
            "params_after": a.params if a else 0,
            "macs_before": s.macs,
            "macs_after": a.macs if a else 0,
            "zero_fraction_before": s.zero_fraction,
            "zero_fraction_after": a.zero_fraction if a else None,
        })
    return rows


def channels_section(analysis: Any, record: Any) -> dict[str, Any]:
    """Channel groups: how many, which were pinned and why (from the analysis), which were
    removed and what each layer folded (from the pass's record)."""
    groups = list(getattr(analysis, "groups", []) or [])
    pinned = [
        {"id": g.id, "size": g.size, "reasons": list(g.pinned),
         "tensors": sorted({sl.tensor for sl in g.slices})}
        for g in groups if g.pinned
    ]
    section: dict[str, Any] = {"groups": len(groups), "pinned": pinned}
    data = record.to_dict() if hasattr(record, "to_dict") else dict(record or {})
    section["removed"] = data.pop("removed_groups", [])
    section["layer_changes"] = data.pop("layers", [])
    data.pop("pinned_groups", None)  # the same list as `pinned`
    section.update(data)
    return section


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt_int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ratio(before: Any, after: Any) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.1%}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


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
                        "original_ms": o, "slim_ms": s, "speedup": o / s if s > 0 else math.inf})
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    model = doc.get("model", {})
    name = model.get("arch") or (Path(model["path"]).name if model.get("path") else "model")
    lines += [f"# rwdeploy compile report: {name}", "", f"Schema `{doc.get('schema')}`.", ""]

    if model:
        p, m = model.get("params", {}), model.get("macs", {})
        lines += ["## Summary", ""]
        rows = [
            ["params", _fmt_int(p.get("original")), _fmt_int(p.get("slim")), _ratio(p.get("original"), p.get("slim"))],
            ["MACs", _fmt_int(m.get("original")), _fmt_int(m.get("slim")), _ratio(m.get("original"), m.get("slim"))],
        ]
        files = doc.get("files", {})
        if "original_onnx" in files and "slim_onnx" in files:
            o, s = files["original_onnx"]["bytes"], files["slim_onnx"]["bytes"]
            rows.append(["ONNX size", _fmt_bytes(o), _fmt_bytes(s), _ratio(o, s)])
        lines += _table(["", "original", "slim", "slim/original"], rows)
        src = model.get("path") or model.get("source")
        lines += [f"Source: `{src}` ({model.get('source')}), input shape {model.get('input_shape')}, "
                  f"traced with `{doc.get('trace', {}).get('method', '?')}`.", ""]

    ver = doc.get("verification")
    if ver:
        lines += ["## Equivalence", ""]
        lines += [f"Slim vs original on {len(ver.get('probe_inputs', []))} probe inputs: max abs error "
                  f"{ver['max_abs']:.3g}, max relative error {ver['max_rel']:.3g} "
                  f"(tolerance {ver['tolerance_rel']:g}): {'passed' if ver['passed'] else 'FAILED'}.", ""]
        ort_check = ver.get("onnxruntime")
        if ort_check:
            for variant in ("original", "slim"):
                if variant in ort_check:
                    e = ort_check[variant]
                    lines.append(f"- ONNX Runtime vs torch, {variant}: max abs {e['max_abs']:.3g}, "
                                 f"max relative {e['max_rel']:.3g}")
            lines.append("")

    layers = doc.get("layers")
    if layers:
        lines += ["## Layers", ""]
        rows = [[r["name"], r["type"], "×".join(map(str, r["shape_before"])),
                 "×".join(map(str, r["shape_after"])) if r["shape_after"] else "removed",
                 _fmt_int(r["params_before"]), _fmt_int(r["params_after"]),
                 _fmt_int(r["macs_before"]), _fmt_int(r["macs_after"])] for r in layers]
        lines += _table(["layer", "type", "shape before", "shape after", "params before", "params after",
                         "MACs before", "MACs after"], rows)

    channels = doc.get("channels")
    if channels:
        lines += ["## Channel groups", "", f"{channels['groups']} groups analysed.", ""]
        if channels.get("removed"):
            lines += ["Removed:", ""]
            lines += [f"- {_removed_line(g)}" for g in channels["removed"]] + [""]
        folded = [c for c in channels.get("layer_changes", []) if isinstance(c, dict) and c.get("folded")]
        if folded:
            lines += ["Constants of removed channels folded into:", ""]
            lines += [f"- {c['name']}: {c['folded']}" for c in folded] + [""]
        if channels.get("pinned"):
            lines += ["Pinned (kept whatever their weights):", ""]
            for g in channels["pinned"]:
                lines.append(f"- group {g['id']} ({g['size']} channels; {', '.join(g['tensors'][:4])}"
                             f"{', ...' if len(g['tensors']) > 4 else ''}): {'; '.join(g['reasons'])}")
            lines.append("")

    quant = doc.get("quantization")
    if quant:
        onnx_q, tvm_q, size = quant.get("onnx", {}), quant.get("tvm", {}), quant.get("storage", {})
        grain = "per channel" if quant.get("per_channel") else "per layer"
        lines += ["## Quantization", "",
                  f"{quant.get('bits')}-bit weights, {grain}, power-of-two scales. QDQ ONNX stores them as "
                  f"{onnx_q.get('storage')} (opset {onnx_q.get('opset')}); ONNX Runtime vs the slim torch model: max rel. "
                  f"error {onnx_q.get('check', {}).get('max_rel', float('nan')):.3g}.", ""]
        if tvm_q:
            lines += [f"TVM build for the host ({tvm_q.get('weights')} weights): library {_fmt_bytes(tvm_q.get('library_bytes'))} "
                      f"vs {_fmt_bytes(tvm_q.get('float_library_bytes'))} with float weights; max rel. error "
                      f"{tvm_q.get('check', {}).get('max_rel', float('nan')):.3g}.", ""]
        if size:
            lines += [f"Weights counted: float32 {_fmt_bytes(size.get('float32_bytes'))}, dense {quant.get('bits')}-bit "
                      f"{_fmt_bytes(size.get('dense_quantized_bytes'))}, sparse {quant.get('bits')}-bit "
                      f"{_fmt_bytes(size.get('sparse_quantized_bytes'))} ({size.get('counting')}).", ""]

    files = doc.get("files")
    if files:
        lines += ["## Files", ""]
        lines += _table(["file", "role", "size"],
                        [[f"`{Path(info['path']).name}`", role, _fmt_bytes(info.get("bytes"))]
                         for role, info in files.items()])

    latency = doc.get("latency")
    if latency:
        lines += ["## Latency", ""]
        lines += _latency_tables(latency)

    targets = doc.get("targets")
    if targets:
        lines += ["## Targets", ""]
        lines += _targets_lines(targets)

    env = doc.get("environment")
    if env:
        lines += ["## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    return "\n".join(lines)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{row['median_ms']:.3f} ({row['p90_ms']:.3f}, n={row['n']})"


def _latency_tables(latency: list[dict[str, Any]]) -> list[str]:
    """One table per (target, runtime): batch rows, original vs slim median (p90, n)."""
    groups: dict[tuple[str, str], dict[tuple[int, int], dict[str, dict[str, Any]]]] = {}
    for r in latency:
        key = (r["target"], r["runtime"] + (" (emulated)" if r.get("emulated") else ""))
        groups.setdefault(key, {}).setdefault((r["batch"], r["threads"]), {})[r["variant"]] = r
    lines: list[str] = []
    for (target, runtime), by_batch in groups.items():
        lines += [f"### {runtime} on {target}", ""]
        variants = sorted({v for row in by_batch.values() for v in row},
                          key=lambda v: ("original", "slim", "packed").index(v)
                          if v in ("original", "slim", "packed") else 9)
        rows = []
        for (batch, threads), row in sorted(by_batch.items()):
            o, sl = row.get("original"), row.get("slim")
            speed = f"{o['median_ms'] / sl['median_ms']:.2f}×" if o and sl and sl["median_ms"] > 0 else "-"
            rows.append([batch, threads, *[_cell(row.get(v)) for v in variants], speed])
        lines += _table(["batch", "threads", *[f"{v} median ms (p90, n)" for v in variants],
                         "speed-up original/slim"], rows)
    return lines


def _kernels_cell(build: dict[str, Any]) -> str:
    kernels = build.get("kernels") or {}
    if not kernels:  # gpu: TVM's default (dlight) schedules, not counted
        return "TVM default"
    return f"{kernels.get('scheduled', 0)}/{sum(kernels.values())}"


def _targets_lines(targets: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, section in targets.items():
        tgt = section.get("target", {})
        lines += [f"### {name}", "", f"TVM target `{tgt.get('tvm_target')}`"
                  + (f", host `{tgt.get('host')}`" if tgt.get("host") else "") + ".", ""]
        rows = [[b["variant"], b["batch"], f"`{b['path']}`" if b.get("path") else "(not shipped)",
                 f"{b['build_s']:.1f}", _fmt_bytes(b.get("size_bytes")),
                 ", ".join(b.get("device_modules") or []) or "host",
                 _kernels_cell(b)] for b in section.get("builds", [])]
        if rows:
            lines += _table(["variant", "batch", "file", "build s", "size", "device code",
                             "kernels scheduled"], rows)
        for note in section.get("notes", []):
            lines.append(f"- {note}")
        if section.get("notes"):
            lines.append("")
    return lines


def _removed_line(g: Any) -> str:
    if not isinstance(g, dict):
        return str(g)
    tensors = g.get("tensors", [])
    what = f"{g.get('removed', '?')} of {g.get('size', '?')} channels"
    why = f" ({', '.join(g['why'])})" if g.get("why") else ""
    return (f"group {g.get('id', '?')}: {what}{why}; {', '.join(tensors[:4])}"
            f"{', ...' if len(tensors) > 4 else ''}")
