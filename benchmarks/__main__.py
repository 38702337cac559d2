"""python -m benchmarks [attention|sd|memory|all|report] [--smoke] [--preset sd15|sd21|sdxl] [--only step,unet,...]
[--device cpu --res 256]"""
import argparse
import sys

from . import attention, cpu, memory, sd


def main():
    if sys.argv[1:2] == ["memory"]:  # its own options (--whole, --preset flux-dev, ...): benchmarks/memory.py
        return memory.main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "attention", "sd", "memory", "report"])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny config on CPU, one repeat: keeps the code alive, measures nothing")
    ap.add_argument("--preset", default="sd15", choices=["sd15", "sd21", "sdxl"], help="architecture (random weights)")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(sd.SUITE) + " (memory "
                    "has its own options: python -m benchmarks memory --help)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=None, help="folder for the JSON results (default benchmarks/results)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="sd on cpu: the trainer's DreamBooth step vs diffusers', interleaved child processes "
                         "(benchmarks/cpu.py); default: cuda when available")
    ap.add_argument("--res", type=int, default=256, help="image side for --device cpu")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for --device cpu")
    a = ap.parse_args()
    if a.what == "report":
        from .report import main as report
        return report(a.out)  # the tables of the files in --out (default: benchmarks/results)
    if a.what in ("all", "attention"):
        attention.run(smoke=a.smoke, warmup=a.warmup, repeat=a.repeat, out=a.out)
    if a.what in ("all", "sd") and a.device == "cpu" and not a.smoke:
        cpu.run(a.preset, a.res, a.rounds, out=a.out)
    elif a.what in ("all", "sd"):
        only = [s for s in a.only.split(",") if s] or None
        sd.run(a.preset, only, smoke=a.smoke, warmup=a.warmup, repeat=a.repeat, out=a.out)


if __name__ == "__main__":
    main()
