"""Start-up cost of the CLI paths that must stay fast (no torch import): `--help`, `recipes`, `plan`.

    python benchmarks/cli_startup.py [--repeat 5]

Prints the median wall time of each command in a fresh process, next to `python -c "import torch"` for scale
(targets: `plan recipe=zephyr-dpo` < 1.5 s), and checks that `plan` imports none of torch, transformers, trl,
datasets and peft. Run with HF_HUB_OFFLINE=1 (set here): plan then makes no network call for Hub models.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "trl", "datasets", "peft")
CASES = {
    "alignctl --help": ["-m", "alignctl.cli", "--help"],
    "alignctl recipes": ["-m", "alignctl.cli", "recipes"],
    "alignctl plan": ["-m", "alignctl.cli", "plan"],
    "alignctl plan recipe=zephyr-dpo": ["-m", "alignctl.cli", "plan", "recipe=zephyr-dpo"],
    'python -c "import torch"': ["-c", "import torch"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    n = ap.parse_args().repeat
    times = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, args in CASES.items():
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env)
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
    torch_time = times['python -c "import torch"']
    for name, t in times.items():
        print(f"{name:<36} {t:6.2f} s   ({t / torch_time:4.2f} x import torch)")
    probe = ("import sys; from alignctl.cli import main; main(['plan', 'recipe=zephyr-dpo']); "
             "print('heavy:' + ','.join(m for m in HEAVY if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}; " + probe], capture_output=True, text=True,
                           env=env, check=True).stdout.strip().splitlines()[-1].removeprefix("heavy:")
    print(f"heavy modules imported by plan recipe=zephyr-dpo: {heavy or 'none'}")


if __name__ == "__main__":
    main()
