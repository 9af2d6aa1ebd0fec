"""Adversarially robust sparse models on digits, and pruning x quantization.

Study 1 (robustness): LeNet-5 on digits (up-sampled to 1x28x28), PGD-Linf adversarial training
(eps 8/255, step 2/255, 10 steps, random start) in every phase. A dense model trained
adversarially is the common start; from it each method prunes filters of the pruned layers
(conv2, fc1; conv1 and the classifier stay dense) to 8x and 16x fewer filters (rates 0.875,
0.9375) with the same prune-phase and retraining epochs, all adversarial:
magnitude+AT, ADMM+AT, reweighted+AT, reweighted ADMM+AT. A naturally trained dense model is
the reference without AT. Reported: natural accuracy, PGD-10 and PGD-50 accuracy on the whole
test split (540 images), of the retraining epoch chosen by (natural + PGD) / 2 on 256 images.

Study 2 (compression x quantization): the reweighted+AT models at 8x and 16x, quantized to 8 and
4 bits (per-channel power-of-two scales) with 1 epoch of adversarial quantization-aware
retraining (and, at 8x, 4-bit without retraining, for contrast); accuracy, and storage counted from the
weights plus, when the compile pipeline is installed, the real slim float and QDQ ONNX files.

    python benchmarks/robustness.py               # the default budget: ~15 min on 2 shared cores
    python benchmarks/robustness.py --quick       # a smoke run (few epochs, one rate)

Writes benchmarks/results/robustness.{json,md}. One seed (budget); the machine is shared, so
wall times are noisy and the JSON records os.getloadavg().
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwdeploy.io import load_model
from rwdeploy.train import Recipe, run_pruning

RESULTS = Path(__file__).parent / "results"
METHODS = ("magnitude", "admm", "reweighted", "rw-admm")
RATES = {"8x": 0.875, "16x": 0.9375}


@dataclass
class Budget:
    dense_epochs: int = 5
    prune_epochs: int = 3
    retrain_epochs: int = 2
    qat_epochs: int = 1
    lr: float = 0.05
    retrain_lr: float = 0.01
    lam: float = 2e-4  # reweighted and reweighted-ADMM lambda (filter groups)
    rho: float = 1e-3
    eval_samples: int = 256
    eps: float = 8 / 255
    rates: dict[str, float] = field(default_factory=lambda: dict(RATES))


QUICK = Budget(dense_epochs=1, prune_epochs=1, retrain_epochs=1, qat_epochs=1, eval_samples=64, rates={"8x": 0.875})


def _recipe(b: Budget, *, model: str, method: str = "magnitude", rate: float = 0.0, adversarial: bool = True,
            dense: bool = False, quantize: dict | None = None, seed: int = 0) -> Recipe:
    r = Recipe(model=model, data="digits", method=method, scheme="filter", rate=rate, seed=seed, device="cpu")
    r.penalty.lam, r.admm.rho = b.lam, b.rho
    r.pretrain.epochs, r.pretrain.lr = (b.dense_epochs if dense else 0), b.lr
    r.prune.epochs, r.prune.lr = (0 if dense or quantize else b.prune_epochs), b.lr
    r.retrain.epochs, r.retrain.lr = (0 if dense or quantize else b.retrain_epochs), b.retrain_lr
    if adversarial:
        r.extra["adversarial"] = {"method": "pgd", "eps": b.eps, "step": b.eps / 4, "eval_steps": 50,
                                  "eval_samples": b.eval_samples}
    if quantize:
        r.extra["quantize"] = quantize
    return r


def _row(name: str, res, wall: float, **kw) -> dict:
    meta = res.metadata
    prune = meta["rwdeploy_prune"]
    row = {"name": name, **kw, "test_acc": res.final_acc, "prunable_sparsity": res.sparsity,
           "params_total": prune["params_total"], "params_nonzero": prune["params_nonzero"],
           "compression": prune["params_total"] / max(prune["params_nonzero"], 1), "wall_s": round(wall, 1)}
    if "adversarial" in meta:
        final = meta["adversarial"]["final"]
        row.update(natural_acc=final["natural_acc"], pgd10_acc=final["pgd_acc"], pgd50_acc=final["pgd_strong_acc"],
                   masking_suspect=final["masking_suspect"])
    if "robust_selection" in meta:
        row["selected_epoch"] = meta["robust_selection"]["epoch"]
    if "quantized_size" in meta:
        row["size"] = meta["quantized_size"]
    return row


def _natural_eval(path: Path, b: Budget) -> dict:
    """PGD accuracy of a model trained without AT (same attack, same evaluation)."""
    from rwdeploy.data import BatchLoader, load_dataset
    from rwdeploy.train.adversarial import PGDConfig, evaluate_robustness

    loaded = load_model(path)
    data = load_dataset("digits", tuple(loaded.input_shape[1:]))
    loader = BatchLoader(data, "test", loaded.input_shape, 256, shuffle=False)
    cfg = PGDConfig(eps=b.eps, step=b.eps / 4)
    res = evaluate_robustness(loaded.module, loader, mean=data.mean, std=data.std, cfg=cfg, strong_steps=50)
    return {"natural_acc": res.natural_acc, "pgd10_acc": res.pgd_acc, "pgd50_acc": res.pgd_strong_acc,
            "masking_suspect": res.masking_suspect}


def _files(path: Path, work: Path) -> dict | None:
    """Real file sizes from `compile` (channel removal + QDQ export), when the pipeline is installed."""
    try:
        from rwdeploy.compile import CompileOptions, compile_model
    except ImportError:
        return None
    out = work / f"{path.stem}-compiled"
    # sparse="off": slim.onnx is the dense slim float model, the baseline of the QDQ file
    result = compile_model(load_model(path), CompileOptions(out=out, measure=False, sparse="off"))
    files = result.report["files"]
    q = result.report.get("quantization", {})
    return {"original_onnx_bytes": files["original_onnx"]["bytes"], "slim_onnx_bytes": files["slim_onnx"]["bytes"],
            "slim_qdq_onnx_bytes": files.get("slim_qdq_onnx", {}).get("bytes"),
            "qdq_weights": files.get("slim_qdq_onnx", {}).get("weights"),
            "tvm_float_library_bytes": q.get("tvm", {}).get("float_library_bytes"),
            "tvm_qdq_library_bytes": q.get("tvm", {}).get("library_bytes"), "slim_storage": q.get("storage")}


def run(b: Budget, work: Path, log=print, part: str = "all") -> dict:
    """part: "all"; "robust" (study 1 only); "quant" (study 2 only: dense AT, reweighted, quantized)."""
    rows: list[dict] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    if part != "quant":
        natural = work / "dense-natural.pt"
        res = run_pruning(_recipe(b, model="lenet5", adversarial=False, dense=True), natural)
        rows.append({"name": "dense (natural training)", "method": "dense", "rate": None, "test_acc": res.final_acc,
                     **_natural_eval(natural, b), "wall_s": round(time.perf_counter() - t0, 1)})
        log(rows[-1])
    t = time.perf_counter()
    dense = work / "dense-at.pt"
    res = run_pruning(_recipe(b, model="lenet5", dense=True), dense)
    rows.append(_row("dense + AT", res, time.perf_counter() - t, method="dense", rate=None))
    log(rows[-1])
    pruned: dict[str, Path] = {}
    for label, rate in b.rates.items():
        for method in (METHODS if part != "quant" else ("reweighted",)):
            t = time.perf_counter()
            out = work / f"{method}-{label}.pt"
            res = run_pruning(_recipe(b, model=str(dense), method=method, rate=rate), out)
            rows.append(_row(f"{method} + AT", res, time.perf_counter() - t, method=method, rate=rate, target=label,
                             acc_after_hard_prune=next(r["test_acc"] for r in res.log if r["phase"] == "hard_prune")))
            log(rows[-1])
            if method == "reweighted":
                pruned[label] = out
    quant_rows: list[dict] = []
    for label, path in (pruned.items() if part != "robust" else ()):
        base = next(r for r in rows if r.get("method") == "reweighted" and r.get("target") == label)
        float_files = _files(path, work)
        quant_rows.append({"target": label, "bits": 32, "qat_epochs": None, "natural_acc": base["natural_acc"],
                           "pgd10_acc": base["pgd10_acc"], "compression": base["compression"], "files": float_files})
        settings = [(8, b.qat_epochs), (4, b.qat_epochs)] + ([(4, 0)] if label == next(iter(pruned)) else [])
        for bits, epochs in settings:
            t = time.perf_counter()
            out = work / f"reweighted-{label}-q{bits}-e{epochs}.pt"
            q = {"bits": bits, "per_channel": True, "epochs": epochs}
            res = run_pruning(_recipe(b, model=str(path), method="magnitude", rate=b.rates[label], quantize=q), out)
            row = _row(f"reweighted + AT, {bits}-bit", res, time.perf_counter() - t, target=label, bits=bits, qat_epochs=epochs)
            row["files"] = _files(out, work)
            quant_rows.append(row)
            log(row)
    return {"rows": rows, "quantization": quant_rows, "wall_s_total": round(time.perf_counter() - t0, 1),
            "cpu_s_total": round(time.process_time() - cpu0, 1)}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def from_log(path: Path) -> dict:
    """Rows and quantization rows from the JSON lines a run printed (e.g. of an interrupted run)."""
    rows, quant = [], []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            (quant if "bits" in row else rows).append(row)
    return {"rows": rows, "quantization": quant}


def markdown(report: dict) -> str:
    b = report["budget"]
    lines = ["# Robust sparse models and quantization on digits (LeNet-5)", "",
             f"PGD-Linf eps {255 * b['eps']:.0f}/255, step eps/4, 10 steps, random start, on [0, 1] pixels of the 28x28 up-sampled digits; "
             f"adversarial training in every phase. Dense AT {b['dense_epochs']} epochs; each method {b['prune_epochs']} "
             f"prune-phase + {b['retrain_epochs']} retraining epochs from the same dense AT model; filter pruning of conv2 and "
             f"fc1 (conv1, classifier dense); lambda {b['lam']}, rho {b['rho']}. Checkpoint: the retraining epoch with the best "
             f"(natural + PGD-10) / 2 on {b['eval_samples']} test images; figures below on all 540 test images. One seed.", "",
             f"Load average start/end: {report['loadavg_start']} / {report['loadavg_end']}; total wall {report.get('wall_s_total')} s, "
             f"CPU {report.get('cpu_s_total')} s "
             f"with {report['threads']} thread(s) (shared machine: times are noisy).", "",
             "| model | filters kept | compression (params) | natural % | PGD-10 % | PGD-50 % | after hard prune % | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        comp = f"{r['compression']:.1f}x" if "compression" in r else "1.0x"
        lines.append(f"| {r['name']} | {r.get('target', 'all')} | {comp} | {_pct(r.get('natural_acc'))} | {_pct(r.get('pgd10_acc'))} | "
                     f"{_pct(r.get('pgd50_acc'))} | {_pct(r.get('acc_after_hard_prune'))} | {r['wall_s']} |")
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    if not report["quantization"]:
        return "\n".join(lines + [""])
    lines += ["", "## Compression x quantization (reweighted + AT)", "",
              "Storage counted from the weights of the slim model (channels removed by `rwdeploy compile`): dense b-bit, or "
              "nonzero values at b bits + 1-bit bitmap, whichever is smaller; scales 32 bits each; biases float32; the ratio is "
              "against the dense float32 model. Files: `rwdeploy compile` output (`--sparse off`).", "",
              "| filters kept | bits | QAT epochs | natural % | PGD-10 % | counted bytes | x vs dense fp32 | slim ONNX bytes | slim QDQ ONNX bytes | TVM lib float / int8 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    dense_fp32 = 4 * next((r["params_total"] for r in report["rows"] if "params_total" in r), 0)
    for q in report["quantization"]:
        f = q.get("files") or {}
        size = f.get("slim_storage") or q.get("size")  # counted on the slim model when compiled
        counted = min(size["dense_quantized_bytes"], size["sparse_quantized_bytes"]) if size else None
        if counted is None:
            counted_cell, ratio = "(fp32)", "–"
        else:
            counted_cell, ratio = f"{counted:,}", f"{dense_fp32 / counted:.0f}x"
        tvm = f"{f.get('tvm_float_library_bytes') or '–'} / {f.get('tvm_qdq_library_bytes') or '–'}"
        lines.append(f"| {q['target']} | {q['bits']} | {q['qat_epochs'] if q['qat_epochs'] is not None else '–'} | "
                     f"{_pct(q.get('natural_acc'))} | {_pct(q.get('pgd10_acc'))} | {counted_cell} | {ratio} | "
                     f"{f.get('slim_onnx_bytes', '–')} | {f.get('slim_qdq_onnx_bytes') or '–'} | {tvm} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch per phase, 8x only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("all", "robust", "quant"), default="all",
                    help="robust: study 1 only; quant: study 2 only (dense AT + reweighted + quantized)")
    ap.add_argument("--from-log", type=Path, help="re-assemble results from the JSON lines of an earlier run's output")
    ap.add_argument("--note", help="with --from-log: a note recorded in the results")
    ap.add_argument("--eps", type=float, default=8 / 255, help="PGD budget in [0, 1] pixels (step = eps / 4)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else Budget()
    budget.eps = args.eps
    report = {"benchmark": "robustness", "loadavg_start": [round(v, 2) for v in os.getloadavg()],
              "threads": args.threads, "budget": budget.__dict__, "quick": args.quick}
    if args.from_log:
        report.update(from_log(args.from_log), assembled_from_log=args.from_log.name,
                      loadavg_start="not recorded (assembled from a log)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report.update(run(budget, Path(tmp), log=lambda r: print(json.dumps(r), flush=True), part=args.part))
    report["part"] = args.part
    if not args.from_log:
        report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    else:
        report["loadavg_end"] = "not recorded"
        if args.note:
            report["note"] = args.note
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = ("robustness" + (f"-{args.part}" if args.part != "all" else "") + (f"-{args.tag}" if args.tag else "")
            + ("-quick" if args.quick else ""))
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
