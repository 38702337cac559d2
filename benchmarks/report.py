"""Render the README's results tables from benchmarks/results/*.json only (smoke files are skipped)."""
import json
import sys

from benchmarks.common import RESULTS


def fmt_ms(r):
    return f"{r['median_ms']:.2f}" if r and "median_ms" in r else "—"


def main():
    files = sorted(p for p in RESULTS.glob("*.json") if "smoke" not in p.name)
    if not files:
        print("No GPU results yet: every JSON under benchmarks/results/ is a CPU smoke run.")
        return
    for f in files:
        data = json.loads(f.read_text())
        print(f"\n**{data['benchmark']}** — {data['device']}, torch {data['torch']}, triton {data.get('triton')}, "
              f"diffusers {data.get('diffusers')} ({f.relative_to(RESULTS.parent.parent)})\n")
        rows = data["results"]
        if data["benchmark"] == "attention":
            print("| shape | triton fwd+bwd ms | best SDPA | its ms | speedup |\n|---|---|---|---|---|")
            for r in rows:
                b = r.get("best_sdpa_fwd_bwd")
                print(f"| {r['shape']} | {fmt_ms(r['backends'].get('triton', {}).get('fwd_bwd'))} | {b} | "
                      f"{fmt_ms(r['backends'].get(b, {}).get('fwd_bwd')) if b else '—'} | "
                      f"{r.get('speedup_fwd_bwd_vs_best_sdpa', float('nan')):.2f}× |")
        else:
            print("| case | ours ms | diffusers ms | speedup |\n|---|---|---|---|")
            for r in rows:
                case = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("mode", "cached_latents", "batch", "kind", "variant", "steps"))
                print(f"| {case} | {fmt_ms(r.get('ours', r))} | {fmt_ms(r.get('diffusers'))} | "
                      f"{r['speedup']:.2f}× |" if "speedup" in r else f"| {case} | {fmt_ms(r.get('ours', r))} | — | — |")


if __name__ == "__main__":
    sys.exit(main())
