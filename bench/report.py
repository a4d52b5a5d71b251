#!/usr/bin/env python
"""Turn a bench/gpu_check.sh results folder ($OUT) into a README: card, driver, versions, what ran, the tables.

    python bench/report.py OUT                        # print the README
    python bench/report.py OUT --into bench/results   # copy OUT's files to bench/results/<date>-<card>/ + README.md

Runs anywhere (no GPU needed): it only reads summary.json (with the plan: each phase's counted work and H200
estimate beside what it took), tests.jsonl and the JSON files the phases wrote, and renders them with the
scripts' own markdown functions. A follow-up run (`--phase compile,...`) goes to the same folder: its files are
added (summary.json, gpu_check.log and tests.jsonl as <name>-<phases>.<ext>) and the README is rebuilt from all.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any


def _load(folder: Path, name: str) -> Any:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _tests(paths: list[Path], label: str) -> str:
    """Counts, failures and unfinished tests of one pytest phase, from the tests*.jsonl files."""
    from common import test_results

    counts: dict[str, int] = {}
    lines: list[str] = []
    for path in paths:
        res = test_results(path, label)
        for k, n in res["counts"].items():
            counts[k] = counts.get(k, 0) + n
        lines += [f"- FAILED `{nodeid}`: {msg}" for nodeid, msg in res["failed"]]
        lines += [f"- UNFINISHED (killed or hung) `{nodeid}`" for nodeid in res["unfinished"]]
    if not counts and not lines:
        return ""
    return "\n".join([", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", *lines])


def _plan(plan: dict[str, Any], phases: dict[str, Any]) -> list[str]:
    """The plan's counted work and H200 estimate beside what each phase took."""
    rows = [f"| {p['phase']} | {'optional' if p['optional'] else 'mandatory'} | {p.get('work') or ''} | "
            f"{p['estimate_s']} | {p['cap_s']} | {phases.get(p['phase'], {}).get('seconds', '')} | "
            f"{phases.get(p['phase'], {}).get('status', 'not in this run')} |" for p in plan["phases"]]
    fu = plan["follow_up"]
    return [f"Plan (H200 estimates from counted work; mandatory {plan['mandatory_estimate_s']} s of "
            f"{plan['mandatory_limit_s']} s; follow-up {fu['budget_s']} s runs {', '.join(fu['runs']) or 'nothing'}"
            f"{'; left: ' + ', '.join(fu['left']) if fu['left'] else ''}):", "",
            "| phase | kind | counted work | estimate s | cap s | took s | status |", "|---|---|---|---:|---:|---:|---|",
            *rows, *([""] + [f"PLAN PROBLEM: {x}" for x in plan["problems"]] if plan["problems"] else []), ""]


def folder_name(summary: dict[str, Any]) -> str:
    """<date>-<card>, e.g. 2026-12-02-nvidia-h200 (a rehearsal is named so)."""
    date = (summary.get("started") or "unknown")[:10]
    card = (summary.get("info") or {}).get("card") or "unknown-card"
    if summary.get("mode") == "rehearse":
        card = "rehearsal-cpu"
    return f"{date}-{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}"


def readme(folder: Path) -> str:
    bench = Path(__file__).resolve().parent
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    files = sorted(folder.glob("summary*.json"), key=lambda p: (p.name != "summary.json", p.name))  # the first run first
    summaries = [_load(folder, p.name) for p in files]
    summaries = [s for s in summaries if s]
    if not summaries:
        raise SystemExit(f"bench/report.py: no summary.json in {folder}")
    first = summaries[0]
    info, smi = first.get("info") or {}, first.get("nvidia_smi") or {}
    pk = info.get("packages") or {}
    copy = info.get("copy") or {}
    title = "CPU REHEARSAL (not evidence: code paths only)" if first.get("mode") == "rehearse" else "GPU evidence run"
    out = [f"# {title}: {info.get('card', '?')}, {first.get('started', '?')}", "",
           "| | |", "|---|---|",
           f"| card | {info.get('card')} (sm {info.get('capability')}, {info.get('sms')} SMs, L2 {info.get('l2_mib')} MiB, "
           f"{info.get('memory_gib')} GiB) |",
           f"| driver | {smi.get('driver_version', 'n/a')}; clocks SM {smi.get('clocks.sm', 'n/a')} (max "
           f"{smi.get('clocks.max.sm', 'n/a')}), memory {smi.get('clocks.mem', 'n/a')}; power limit "
           f"{smi.get('power.limit', 'n/a')} |",
           f"| versions | python {info.get('python')}, torch {pk.get('torch')}, CUDA {info.get('cuda')}, triton "
           f"{pk.get('triton')}, transformers {pk.get('transformers')}, numpy {pk.get('numpy')} |",
           f"| copy bandwidth | {copy.get('gbs', float('nan')):.0f} GB/s (read + write; {copy.get('method', 'n/a')}) |",
           ""]
    for s in summaries:
        out += [f"`{s.get('command')}` ({s.get('mode')}, budget {s.get('budget_s')} s, took {s.get('elapsed_s')} s):", "",
                "| phase | status | seconds | limit | estimate | result |", "|---|---|---:|---:|---:|---|"]
        for name, r in s.get("phases", {}).items():
            out.append(f"| {name} | {r.get('status')} | {r.get('seconds', '')} | {r.get('limit_s')} | "
                       f"{r.get('estimate_s')} | {r.get('result') or r.get('reason', '')} |")
        if s.get("follow_up"):
            out += ["", f"Follow-up for what did not run: `{s['follow_up']}`"]
        out.append("")
        if s.get("plan"):
            out += _plan(s["plan"], s.get("phases", {}))
    tests = sorted(folder.glob("tests*.jsonl"))
    for label, what in (("gpu-tests", "CUDA-only tests (`-m 'gpu and not heavy'`)"), ("gpu-heavy", "heavy CUDA tests"),
                        ("suite", "the rest of the suite")):
        text = _tests(tests, label)
        if text:
            out += [f"## Tests: {what}", "", text, ""]
    sections = (("probe.json", "Calibration probe (bench/probe.py)", "probe"),
                ("kernels.json", "Kernels: the decode path (bench/kernel_bench.py)", "kernel_bench"),
                ("kernels-rest.json", "Kernels: the rest (bench/kernel_bench.py)", "kernel_bench"),
                ("bench.json", "End to end (bench/run.py)", "run"),
                ("compile.json", "hf-compile (bench/run.py --engines hf-compile)", "run"))
    for name, heading, module in sections:
        data = _load(folder, name)
        if data is not None:
            out += [f"## {heading}", "", __import__(module).markdown(data), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the results folder gpu_check.sh wrote ($OUT)")
    ap.add_argument("--into", type=Path, help="copy the files to INTO/<date>-<card>/ and write README.md there")
    args = ap.parse_args(argv)
    if args.into is None:
        print(readme(args.out))
        return 0
    summary = _load(args.out, "summary.json")
    if summary is None:
        raise SystemExit(f"bench/report.py: no summary.json in {args.out}")
    dest = args.into / folder_name(summary)
    dest.mkdir(parents=True, exist_ok=True)
    follow_up = dest.joinpath("summary.json").exists()
    for f in sorted(p for p in args.out.iterdir() if p.is_file()):
        target = dest / f.name
        if follow_up and f.name in ("summary.json", "gpu_check.log", "tests.jsonl"):
            phases = "-".join(n for n in summary.get("phases", {}) if n != "info") or "info"
            target = dest / f"{f.stem}-{phases}{f.suffix}"
        shutil.copy2(f, target)
    (dest / "README.md").write_text(readme(dest) + "\n")
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
