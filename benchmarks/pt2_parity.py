"""`.pt2` parity, measured: the same pruned network compiled from its module and from a saved
`torch.export` program packs the same layers into the same arrays and ships the same slim ONNX.

Cases: the issue's 95%-sparse 4096 -> 1024 -> 1024 (-> 10) MLP, and zoo models with 85% of
every conv's weights zeroed plus two all-zero filters per conv (so channel removal has work
too). Each is compiled twice with `--sparse csr` (`compile_model`, target `onnx` unless
`--target` says otherwise): "module" (the nn.Module as a loaded model) and "pt2" (the program
saved with `torch.export.save`, loaded as `rwdeploy compile` loads it). Per form: layers packed,
slim / original ONNX bytes, ONNX Runtime's slim output against the dense torch model (max
relative error). Across forms: whether the packed arrays (values / indices / indptr / bias in
slim.pt2) are identical.

Writes benchmarks/results/pt2_parity.{json,md} (or under --out) and prints the table. No
timings: sizes and errors only.

    python benchmarks/pt2_parity.py
    python benchmarks/pt2_parity.py --cases mlp --target cpu     # + the TVM build's sparse kernels
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rwdeploy import models
from rwdeploy.compile import CompileOptions, compile_model
from rwdeploy.io import LoadedModel, atomic_file, load_model
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.ort_runner import OrtRunner

RESULTS = Path(__file__).resolve().parent / "results"
PACKED_ARRAYS = ("values", "indices", "indptr")


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4096, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build(case: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The pruned network of a case and its input shape."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if case == "mlp":
        model, shape = Mlp(), (1, 4096)
        layers, frac = [model.fc1, model.fc2], 0.95
    else:
        model, shape = models.create(case), models.input_shape(case)
        layers, frac = [m for m in model.modules() if isinstance(m, nn.Conv2d)], 0.85
    with torch.no_grad():
        for m in layers:
            m.weight[torch.rand(m.weight.shape, generator=g) < frac] = 0
            if case != "mlp":
                m.weight[:2] = 0
    return model.eval(), shape


def sparse_kernels(library: Path) -> int:
    from rwdeploy.runtime.tvm_build import kernel_names

    return sum(1 for n in kernel_names(library) if re.match(r"rw_(?:linear|conv2d)_sparse_", n))


def packed_arrays(slim_pt2: Path) -> dict[str, torch.Tensor]:
    import rwdeploy.sparse  # noqa: F401  (the packed program's ops)

    state = torch.export.load(str(slim_pt2)).state_dict
    return {k: v for k, v in state.items() if k.rpartition(".")[2] in PACKED_ARRAYS}


def run_case(case: str, target: str, workdir: Path) -> dict[str, Any]:
    model, shape = build(case)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    program = workdir / f"{case}.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(program))
    loaded = {"module": LoadedModel(model, shape, "pickle"), "pt2": load_model(program)}
    rows, arrays = {}, {}
    for form, lm in loaded.items():
        out = workdir / f"{case}-{form}"
        result = compile_model(lm, CompileOptions(out=out, target=target, sparse="csr", measure=False, batches=(1,)))
        files, sparse = result.report["files"], result.report["sparse"]
        with torch.no_grad():
            want = model(x).numpy()
        got = OrtRunner(out / "slim.onnx").run(x.numpy())
        rows[form] = {
            "packed_layers": sparse["packed_layers"], "layers": len(sparse["layers"]),
            "forms": sorted({l["form"] for l in sparse["layers"]}),
            "slim_onnx_bytes": files["slim_onnx"]["bytes"], "original_onnx_bytes": files["original_onnx"]["bytes"],
            "slim_over_original": round(files["slim_onnx"]["bytes"] / files["original_onnx"]["bytes"], 4),
            "ort_max_rel_vs_dense_torch": float(np.abs(got - want).max() / np.abs(want).max()),
            "sparse_kernels": sparse_kernels(out / "model.cpu.so") if (out / "model.cpu.so").exists() else None,
        }
        arrays[form] = packed_arrays(out / "slim.pt2")
    same = arrays["module"].keys() == arrays["pt2"].keys() and all(
        torch.equal(a, arrays["pt2"][k]) for k, a in arrays["module"].items())
    return {"case": case, "input_shape": list(shape), "target": target, "forms": rows,
            "packed_arrays": len(arrays["pt2"]), "packed_arrays_identical": bool(same)}


def table(results: list[dict[str, Any]]) -> str:
    head = ("| case | form | packed | slim ONNX bytes | original ONNX bytes | slim/original | ORT max rel vs dense | "
            "TVM sparse kernels | arrays identical |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in results:
        for form, row in r["forms"].items():
            kernels = "-" if row["sparse_kernels"] is None else row["sparse_kernels"]
            lines.append(f"| {r['case']} | {form} | {row['packed_layers']}/{row['layers']} | {row['slim_onnx_bytes']:,} | "
                         f"{row['original_onnx_bytes']:,} | {row['slim_over_original']:.3f} | "
                         f"{row['ort_max_rel_vs_dense_torch']:.1e} | {kernels} | "
                         f"{'yes' if r['packed_arrays_identical'] else 'NO'} ({r['packed_arrays']} arrays) |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="mlp,resnet20,mobilenet_v2")
    parser.add_argument("--target", default="onnx", help="onnx (no TVM) or a TVM target, e.g. cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="pt2_parity")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rwdeploy-pt2-") as tmp:
        results = [run_case(case, args.target, Path(tmp)) for case in args.cases.split(",")]
    text = table(results)
    print(text)
    doc = {"results": results, "environment": environment(), "loadavg": [list(load_before), list(os.getloadavg())],
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / f"{args.name}.json") as f:
        f.write_text(json.dumps(doc, indent=1))
    with atomic_file(args.out / f"{args.name}.md") as f:
        f.write_text(f"# .pt2 parity of sparse packing (`--sparse csr`)\n\n`{doc['command']}`\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
