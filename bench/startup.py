"""Start-up of the command line: ``diskport --version``, ``--help``, ``inspect`` of a local qcow2 (empty, and
with 200 MiB of data), VHDX and raw, and ``convert`` of the empty qcow2 to raw, each a whole process, with the
floors beside them: the interpreter's own start-up, click's import (every command pays it), numpy's (the
mapping needs it, so convert pays it; the readers open without it, so inspect does not) and qemu-img's own
convert of the same image.

    python bench/startup.py [--runs 15] [--baseline SRC]

Every case runs ``--runs`` times, the variants alternating within each round so that load from other jobs falls
on all of them alike; the table gives the median wall time and the median CPU time (user+sys of the child,
which load from other jobs disturbs less). ``--baseline SRC`` also runs the ``src`` folder of another checkout
(``git archive main src | tar -x -C /tmp/base`` then ``--baseline /tmp/base/src``) with the same interpreter,
so a change is measured against what it changes. Both trees are byte-compiled first (``compileall``), as an
installed wheel is: with PYTHONDONTWRITEBYTECODE set, as in these VMs, an editable checkout would otherwise
compile every module it imports on every run. hyperfine, where installed, gives the same figures:
``hyperfine -N -w 3 -r 15 'diskport --version'``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user+sys) seconds of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="the src folder of another checkout, run for comparison")
    args = parser.parse_args()
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SystemExit("needs qemu-img (apt-get install qemu-utils)")
    work = Path(tempfile.mkdtemp(prefix="diskport-startup-"))
    try:
        qcow2, raw, vhdx = work / "disk.qcow2", work / "disk.raw", work / "disk.vhdx"
        data, out = work / "data.qcow2", work / "out.raw"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", qcow2, "1G"], check=True)
        subprocess.run([qemu_img, "create", "-q", "-f", "raw", raw, "64M"], check=True)
        subprocess.run([qemu_img, "create", "-q", "-f", "vhdx", vhdx, "1G"], check=True)
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", data, "1G"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 200M", data], check=True,
                       stdout=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        for tree in [REPO / "src", *([args.baseline] if args.baseline is not None else [])]:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
        script = Path(sys.executable).parent / "diskport"
        variants: dict[str, tuple[list[str], dict[str, str]]] = {}
        if args.baseline is not None:
            variants["baseline (python -m)"] = ([sys.executable, "-m", "diskport"],
                                                {**env, "PYTHONPATH": str(args.baseline.resolve())})
        variants["this tree (python -m)"] = ([sys.executable, "-m", "diskport"],
                                             {**env, "PYTHONPATH": str(REPO / "src")})
        if script.exists():
            variants["installed script"] = ([str(script)], env)
        cases = {"--version": ["--version"], "--help": ["--help"], "inspect qcow2": ["inspect", str(qcow2)],
                 "inspect qcow2, 200 MiB data": ["inspect", str(data)], "inspect vhdx": ["inspect", str(vhdx)],
                 "inspect raw": ["inspect", str(raw)],
                 "convert qcow2 -> raw": ["convert", "-q", "--force", str(qcow2), str(out)]}
        floors = {"python -c pass": [sys.executable, "-c", "pass"],
                  "python -c 'import click'": [sys.executable, "-c", "import click"],
                  "python -c 'import click, numpy'": [sys.executable, "-c", "import click, numpy"],
                  "python -c 'import diskport.cli' (this tree)": [sys.executable, "-c", "import diskport.cli"],
                  "qemu-img convert qcow2 -> raw": [qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(qcow2),
                                                    str(work / "peer.raw")]}
        here = {**env, "PYTHONPATH": str(REPO / "src")}
        plan: list[tuple[str, list[str], dict[str, str]]] = [(name, cmd, here) for name, cmd in floors.items()]
        for case, extra in cases.items():
            for variant, (cmd, venv) in variants.items():
                plan.append((f"{case} [{variant}]", [*cmd, *extra], venv))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in plan}
        for round_ in range(args.warmup + args.runs):
            for name, cmd, venv in plan:
                sample = run_once(cmd, venv)
                if round_ >= args.warmup:
                    results[name].append(sample)
        load = os.getloadavg()[0]
        print(f"{args.runs} runs each, alternating; load average {load:.1f} on {os.cpu_count()} CPUs at the end")
        print(f"{'case':52s} {'wall median':>12s} {'wall min':>9s} {'CPU median':>11s}")
        for name, samples in results.items():
            walls = [w for w, _ in samples]
            cpus = [c for _, c in samples]
            print(f"{name:52s} {statistics.median(walls) * 1000:9.1f} ms {min(walls) * 1000:6.1f} ms "
                  f"{statistics.median(cpus) * 1000:8.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
