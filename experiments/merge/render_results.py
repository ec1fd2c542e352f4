"""Render bench_vs_mergekit.py --json output as the markdown table in RESULTS.md."""
import json
import sys

data = json.load(open(sys.argv[1]))
print(f"Run: {data['meta']['date']}, {data['meta']['machine']}, {data['meta']['cpus']} CPUs, device {data['meta']['device']}, "
      f"torch threads {data['meta']['threads']} (both tools), load average at end {[round(x, 1) for x in data['meta']['loadavg_end']]}\n")
print("| set | method | max rel diff | mergekit s | fusionlab s | speedup | mergekit peak RSS MB | fusionlab peak RSS MB | mergekit process s | fusionlab process s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in data["rows"]:
    print(f"| {r['set']} | {r['method']} | {r['max_rel_diff']:.1e} | {r['mergekit_s']} | {r['fusionlab_s']} | {r['speedup']}x | "
          f"{r['mergekit_rss_mb']} | {r['fusionlab_rss_mb']} | {r['mergekit_process_s']} | {r['fusionlab_process_s']} |")

# one line per (set, method): medians over the repeats (the rows above are every run)
groups: dict = {}
for r in data["rows"]:
    groups.setdefault((r["set"], r["method"]), []).append(r)
if any(len(g) > 1 for g in groups.values()):
    import statistics

    print("\nMedians over repeats:\n")
    print("| set | method | runs | max rel diff | mergekit s | fusionlab s | speedup | mergekit peak RSS MB | fusionlab peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (set_name, method), g in groups.items():
        mk = statistics.median(r["mergekit_s"] for r in g)
        fl = statistics.median(r["fusionlab_s"] for r in g)
        print(f"| {set_name} | {method} | {len(g)} | {max(r['max_rel_diff'] for r in g):.1e} | {mk:.2f} | {fl:.2f} | "
              f"{mk / fl:.2f}x | {max(r['mergekit_rss_mb'] for r in g)} | {max(r['fusionlab_rss_mb'] for r in g)} |")
