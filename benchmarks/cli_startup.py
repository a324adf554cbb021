"""How long the `surgery` command and `import surgery` take to start, against a bare Python start in the same run.

    python -m benchmarks.cli_startup [--repeats 10] [--out benchmarks/cli_startup.json]

Each command runs `--repeats` times in a fresh process, interleaved with the others (a shared machine's load then
falls on every row alike); the table gives the fastest and the median wall time, the median's excess over a bare
`python -c pass`, and whether the fastest run meets its target (`surgery --help` and `surgery <command> --help`
0.5 s, `import surgery` 0.3 s). Each row also says whether torch or transformers was imported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

CHECK = "; import sys; print(int('torch' in sys.modules), int('transformers' in sys.modules))"
ROWS = {  # name -> (python code, target in seconds or None)
    "python -c pass (baseline)": ("pass", None),
    "import surgery": ("import surgery" + CHECK, 0.3),
    "surgery --help": ("from surgery.cli import main; main(['--help'])" + CHECK, 0.5),
    "surgery --help (the installed script)": ("script", 0.5),
    "surgery eval --help": ("from surgery.cli import main\ntry: main(['eval', '--help'])\nexcept SystemExit: pass\n" + CHECK[2:], 0.5),
    "surgery compare --help": ("from surgery.cli import main\ntry: main(['compare', '--help'])\nexcept SystemExit: pass\n" + CHECK[2:], 0.5),
}


SCRIPT = Path(sys.executable).with_name("surgery")  # the installed console script, beside this interpreter


def time_once(code: str) -> tuple[float, str]:
    command = [str(SCRIPT), "--help"] if code == "script" else [sys.executable, "-c", code]
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    last = out.strip().splitlines()[-1] if out.strip() and code != "script" else ""
    return time.perf_counter() - start, last


def run(repeats: int) -> list[dict]:
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    loaded: dict[str, str] = {}
    for _ in range(repeats):
        for name, (code, _) in ROWS.items():
            seconds, last = time_once(code)
            times[name].append(seconds)
            loaded[name] = last
    base = statistics.median(times["python -c pass (baseline)"])
    rows = []
    for name, (_, target) in ROWS.items():
        t = times[name]
        flags = loaded[name].split()
        rows.append({"command": name, "fastest_s": min(t), "median_s": statistics.median(t),
                     "over_bare_python_s": statistics.median(t) - base, "target_s": target,
                     "meets_target": None if target is None else min(t) <= target,
                     "imports_torch": flags[0] == "1" if len(flags) == 2 else None,
                     "imports_transformers": flags[1] == "1" if len(flags) == 2 else None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| command | fastest (s) | median (s) | over bare python (s) | target (s) | met | torch / transformers imported |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        imported = "" if r["imports_torch"] is None else f"{'yes' if r['imports_torch'] else 'no'} / " \
                                                         f"{'yes' if r['imports_transformers'] else 'no'}"
        met = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")
        lines.append(f"| {r['command']} | {r['fastest_s']:.3f} | {r['median_s']:.3f} | {r['over_bare_python_s']:.3f} | "
                     f"{r['target_s'] or ''} | {met} | {imported} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cli_startup.json"))
    args = parser.parse_args(argv)
    rows = run(args.repeats)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": str(date.today()), "machine": f"{platform.machine()}, {platform.python_version()}",
              "repeats": args.repeats, "command": "python -m benchmarks.cli_startup", "rows": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0 if all(r["meets_target"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
