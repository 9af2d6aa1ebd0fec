"""Line counts of passes/ and of the compile pipeline, at several git revisions.

For each revision: physical lines (`wc -l`) and code lines, the lines that hold a token of
code once blank lines, comments and docstrings are left out (`tokenize` finds comments and
blank lines, `ast` the docstrings of modules, classes and functions). The pipeline is a fixed
set of files; a file absent at a revision counts 0 (rwdeploy/context.py did not exist before
the typed pipeline).

    python benchmarks/line_counts.py                          # before / the redesigns / HEAD
    python benchmarks/line_counts.py --rev HEAD --rev main    # any revisions

Writes benchmarks/results/line_counts.json and .md and prints the table.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The compile pipeline: the stages, their context types, the report, the CLI command and the
# runtime glue they alone use (issue 11's file set; add a module split out of them here).
PIPELINE = ("rwdeploy/compile.py", "rwdeploy/context.py", "rwdeploy/tvm_stages.py", "rwdeploy/report.py",
            "rwdeploy/cli/compile.py", "rwdeploy/quant/compile_stage.py", "runtime/arm_measure.py")
# (label, revision, what it is) for the default table. Both redesigns of issue 11 branched from
# 381016d: `pipe` (typed pipeline, merged as 80b404a) and `ops` (op specs, tip a297de6, merged
# as e9ef1fd on top of 80b404a).
DEFAULT_REVS = (
    ("before", "381016d", "before issue 11: both redesign branches start here"),
    ("ops branch", "a297de6", "the op-spec redesign alone (passes/), before its merge"),
    ("pipe branch", "80b404a", "main with the typed pipeline merged (passes/ gained verify.compare)"),
    ("redesign", "e9ef1fd", "main with both redesigns merged"),
    ("main, later", "e97e05d", "main after later features (ops for real architectures, .pt2 packing)"),
    ("main, merged", "0de1928", "main as last merged into this branch (sparse merge)"),
    ("now", "HEAD", "this checkout's HEAD"),
)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    lines: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.ENCODING)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstring_lines)


def count(rev: str, paths: list[str]) -> dict[str, dict[str, int]]:
    """Per file: physical and code lines at `rev` (files absent there are left out)."""
    out = {}
    for path in paths:
        try:
            source = git("show", f"{rev}:{path}")
        except subprocess.CalledProcessError:
            continue
        out[path] = {"physical": len(source.splitlines()), "code": code_lines(source)}
    return out


def passes_files(rev: str) -> list[str]:
    return [p for p in git("ls-tree", "-r", "--name-only", rev, "--", "passes").splitlines() if p.endswith(".py")]


def measure(label: str, rev: str, note: str) -> dict:
    commit = git("rev-parse", "--short", rev).strip()
    sets = {"passes": count(rev, passes_files(rev)), "pipeline": count(rev, list(PIPELINE))}
    return {"label": label, "rev": rev, "commit": commit, "note": note,
            **{name: {"files": len(files), "physical": sum(f["physical"] for f in files.values()),
                      "code": sum(f["code"] for f in files.values()), "per_file": files}
               for name, files in sets.items()}}


def table(rows: list[dict]) -> str:
    lines = ["| revision | commit | passes/ files | passes/ lines | passes/ code lines | pipeline files "
             "| pipeline lines | pipeline code lines |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, q = r["passes"], r["pipeline"]
        lines.append(f"| {r['label']} (`{r['rev']}`) | {r['commit']} | {p['files']} | {p['physical']} | {p['code']} "
                     f"| {q['files']} | {q['physical']} | {q['code']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", action="append", help="a git revision (repeatable; default: the standard four)")
    parser.add_argument("--out", type=Path, default=RESULTS / "line_counts")
    args = parser.parse_args(argv)
    revs = [(rev, rev, "") for rev in args.rev] if args.rev else list(DEFAULT_REVS)
    rows = [measure(*r) for r in revs]
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"pipeline_files": list(PIPELINE), "revisions": rows},
                                                        indent=2) + "\n")
    notes = "\n".join(f"- {r['label']} (`{r['rev']}`): {r['note']}" for r in rows if r["note"])
    args.out.with_suffix(".md").write_text(
        f"{text}\n\n{notes}\n\nPipeline files: {', '.join(f'`{p}`' for p in PIPELINE)}. Code lines leave out "
        "blank lines, comments and docstrings (tokenize + ast). `python benchmarks/line_counts.py`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
