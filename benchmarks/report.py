"""Render the README's results tables from benchmarks/results/*.json only (smoke files are skipped).

Kernel compile checks (`python -m minidream.kernels.compile_check`) and GPU benchmarks (`python -m benchmarks`)
each get a table; the demo files (demo-*.json) are rendered in the README's demo section by hand.
"""
import json
import sys

from .common import RESULTS


def fmt_ms(r):
    return f"{r['median_ms']:.2f}" if r and "median_ms" in r else "—"


def fmt_spread(r):
    """Median with the interquartile range: a ratio means little without the spread of what it divides."""
    return f"{r['median_ms']:.2f} ({r['p25_ms']:.2f}–{r['p75_ms']:.2f})" if r and "p25_ms" in r else fmt_ms(r)


def compile_table(docs):
    """One table for every triton version checked: the launches are the same, ptxas's verdicts side by side."""
    versions = " / ".join(d["triton"] for d in docs)
    print(f"| shape | kernel | BLOCK_M×N | warps/stages | registers ({versions}) | spill bytes | shared KiB "
          f"| async copies |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in zip(*(d["results"] for d in docs)):
        r = rows[0]
        spill = " / ".join(str(x["stack_bytes"] + x["local_bytes"]) for x in rows)
        print(f"| {r['shape']} | {r['kernel']} | {r['BLOCK_M']}×{r['BLOCK_N']} | {r['num_warps']}/{r['num_stages']} | "
              f"{' / '.join(str(x['registers']) for x in rows)} | {spill} | {r['shared_bytes'] / 1024:.0f} | "
              f"{' / '.join(str(x['async_copies']) for x in rows)} |")


def attention_table(data):
    """fwd+bwd ms of every backend per shape, and ours (triton) against the best SDPA backend."""
    names = list(dict.fromkeys(b for r in data["results"] for b in r["backends"]))
    print(f"| shape | {' | '.join(f'{b} fwd+bwd ms' for b in names)} | triton ÷ best SDPA |\n"
          f"|{'---|' * (len(names) + 2)}")
    for r in data["results"]:
        cells = [fmt_ms(r["backends"].get(b, {}).get("fwd_bwd")) for b in names]
        ratio = r.get("speedup_fwd_bwd_vs_best_sdpa")
        vs = f"{ratio:.2f}× ({r['best_sdpa_fwd_bwd']})" if ratio else "—"
        print(f"| {r['shape']} | {' | '.join(cells)} | {vs} |")


def model_table(data):
    print("| case | ours ms (p25–p75) | diffusers ms (p25–p75) | speedup |\n|---|---|---|---|")
    for r in data["results"]:
        keys = ("mode", "cached_latents", "batch", "kind", "variant", "steps")
        case = ", ".join(f"{k}={v}" for k, v in r.items() if k in keys)
        ours = r.get("ours", r)
        if "mfu" in ours:  # the UNet's rows: the share of the GPU's bf16 peak, ours / diffusers'
            case += f" (MFU {ours['mfu']:.1%}" + (f" / {r['diffusers']['mfu']:.1%})" if "mfu" in r.get("diffusers", {})
                                                   else ")")
        if "speedup" in r:
            print(f"| {case} | {fmt_spread(ours)} | {fmt_spread(r.get('diffusers'))} | {r['speedup']:.2f}× |")
        else:
            print(f"| {case} | {fmt_spread(ours) if 'error' not in ours else ours['error']} | — | — |")
        for name in (k for k in r if k.startswith("ours --compile")):  # the compiled variants, against the same
            speed = f"{r['diffusers']['median_ms'] / r[name]['median_ms']:.2f}×" if "diffusers" in r else "—"
            mfu = f" (MFU {r[name]['mfu']:.1%})" if "mfu" in r[name] else ""
            print(f"| {case}, {name}{mfu} | {fmt_spread(r[name])} | {fmt_spread(r.get('diffusers'))} | {speed} |")


def step_table(data):
    """The trainer's step per variant (benchmarks/step.py); files from before it (ours vs diffusers) as model_table."""
    if not all("variants" in r for r in data["results"]):
        return model_table(data)
    print("| `--train`, latents | variant | ms/step (p25–p75) | × diffusers | × diffusers + torch.compile "
          "| peak GiB |\n|---|---|---|---|---|---|")
    for r in data["results"]:
        case = f"{r['mode']}, {'cached' if r['cached_latents'] else 'uncached'}"
        for name, v in r["variants"].items():
            ratio = (f"{v['speedup_vs_diffusers']:.2f}×" if "speedup_vs_diffusers" in v else "—",
                     f"{v['speedup_vs_diffusers_compiled']:.2f}×" if "speedup_vs_diffusers_compiled" in v else "—")
            peak = f"{v['peak_bytes'] / 2 ** 30:.2f}" if v.get("peak_bytes") else "—"
            print(f"| {case} | {name} | {fmt_spread(v)} | {ratio[0]} | {ratio[1]} | {peak} |")
        for name, why in r.get("errors", {}).items():
            print(f"| {case} | {name} | {why} | — | — | — |")


def cpu_step_table(data):
    gib = 2 ** 30
    print("| `--train` | ours s/step (p25–p75) | diffusers s/step (p25–p75) | speed ours/diffusers (per-round range) "
          "| peak RSS ours / diffusers GiB |\n|---|---|---|---|---|")
    for r in data["results"]:
        o, d, per = r["ours"], r["diffusers"], r["speedup_per_round"]
        print(f"| {r['mode']} | {o['median_s']:.2f} ({o['p25_s']:.2f}–{o['p75_s']:.2f}) | {d['median_s']:.2f} "
              f"({d['p25_s']:.2f}–{d['p75_s']:.2f}) | {r['speedup']:.2f}× ({min(per):.2f}–{max(per):.2f}) | "
              f"{o['peak_rss_bytes'] / gib:.2f} / {d['peak_rss_bytes'] / gib:.2f} |")
    compiled = [r for r in data["results"] if "ours --compile on" in r]
    if compiled:  # the same rounds' --compile on side (its warm-up steps compiled; only later steps are timed)
        print("\n| `--train` | ours --compile on s/step (p25–p75) | × diffusers | × ours eager | peak RSS GiB |\n"
              "|---|---|---|---|---|")
        for r in compiled:
            c = r["ours --compile on"]
            print(f"| {r['mode']} | {c['median_s']:.2f} ({c['p25_s']:.2f}–{c['p75_s']:.2f}) | "
                  f"{r['diffusers']['median_s'] / c['median_s']:.2f}× | {r['ours']['median_s'] / c['median_s']:.2f}× | "
                  f"{c['peak_rss_bytes'] / gib:.2f} |")


def memory_table(data):
    gib = 2 ** 30
    print("| recipe | peak RSS GiB | × diffusers' default |\n|---|---|---|")
    for r in data["results"]:
        vs = f"{r['vs_diffusers_unet']:.2f}×" if r.get("vs_diffusers_unet") else "—"
        print(f"| {r['recipe']} | {r['peak_rss'] / gib:.2f} | {vs} |")


def sync_table(data):
    """The step before and after its losses stayed on the device (benchmarks/results/step-sync-cpu-*.json)."""
    print("| step | ours s/step, median (min-max) | × diffusers, median (min-max) |\n|---|---|---|")
    for side, r in data["sides"].items():
        t, x = r["ours_s_per_step"], r["speedup_vs_diffusers"]
        print(f"| {side} | {t['median']:.4f} ({t['min']:.4f}-{t['max']:.4f}) | {x['median']:.3f} "
              f"({x['min']:.3f}-{x['max']:.3f}) |")


def main(folder=None):
    from pathlib import Path
    folder = Path(folder or RESULTS)
    files = sorted(p for p in folder.glob("*.json") if "smoke" not in p.name and not p.name.startswith("demo-"))
    if not files:
        print(f"No kernel or GPU results (other than smoke runs) in {folder}.")
        return
    docs = [(f, json.loads(f.read_text())) for f in files]
    compiled = [(f, d) for f, d in docs if d.get("check") == "kernel-compile"]
    if compiled:
        names = ", ".join(str(shown(f)) for f, _ in compiled)
        print(f"\n**kernel compile check** — {compiled[0][1]['target']}, {compiled[0][1]['host']}, triton "
              f"{' / '.join(d['triton'] for _, d in compiled)} ({names})\n")
        compile_table([d for _, d in compiled])
    for f, data in docs:
        if data.get("check") == "kernel-compile" or "sections" in data:  # `minidream bench` prints its own tables
            continue
        print(f"\n**{data['benchmark']}** — {data['device']}, torch {data['torch']}, triton {data.get('triton')}, "
              f"diffusers {data.get('diffusers')} ({shown(f)})\n")
        tables = {"attention": attention_table, "step-cpu": cpu_step_table, "memory-cpu": memory_table,
                  "step-sync-cpu": sync_table}
        table = tables.get(data["benchmark"], step_table if data["benchmark"].startswith("step-") else model_table)
        table(data)


def shown(f):
    """A results file's path as the README cites it (relative to the checkout when it is inside)."""
    try:
        return f.resolve().relative_to(RESULTS.parent.parent)
    except ValueError:
        return f


if __name__ == "__main__":
    sys.exit(main())
