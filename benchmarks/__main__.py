"""python -m benchmarks [attention|sd|all] [--smoke] [--preset sd15|sd21] [--only step,unet,...]"""
import argparse

from benchmarks import attention, sd


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "attention", "sd", "report"])
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, one repeat: keeps the code alive, measures nothing")
    ap.add_argument("--preset", default="sd15", choices=["sd15", "sd21"], help="architecture (random weights)")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(sd.SUITE))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=None, help="folder for the JSON results (default benchmarks/results)")
    a = ap.parse_args()
    if a.what == "report":
        from benchmarks.report import main as report
        return report()
    if a.what in ("all", "attention"):
        attention.run(smoke=a.smoke, out=a.out)
    if a.what in ("all", "sd"):
        sd.run(a.preset, [s for s in a.only.split(",") if s] or None, smoke=a.smoke, warmup=a.warmup, repeat=a.repeat, out=a.out)


if __name__ == "__main__":
    main()
