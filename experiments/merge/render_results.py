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
