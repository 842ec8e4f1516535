"""Writes the documentation's tables of numbers from the committed results JSON.

Every measured number in the README and the docs comes from here: nothing is
typed by hand. The pages hold marked regions,

    <!-- generated: NAME (docs/gen_tables.py) -->
    ...
    <!-- end generated: NAME -->

and this script rewrites the inside of each from ``experiments/results/``,
headed by where the numbers come from: the machine, the date and the command
that the JSON records. A field the JSON does not record is shown as
"not recorded", never filled in.

    python docs/gen_tables.py            # rewrite the regions (``make docs`` runs this)
    python docs/gen_tables.py --check    # exit 1 if a committed page differs from what it would write
    python docs/gen_tables.py --figure   # also redraw docs/assets/step_time_vs_d.png

``tests/test_docs.py`` runs the check, so a page whose tables are stale fails
the tests. The figure is drawn only with ``--figure`` (matplotlib's PNG bytes
change between versions; the figure's data are the scaling_d and step results).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
from typing import Any, Callable, Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PAGES = ("README.md", "docs/index.md", "docs/performance.md", "docs/results.md", "docs/inference.md",
         "docs/troubleshooting.md", "docs/pairwise.md")
FIGURE = ROOT / "docs" / "assets" / "step_time_vs_d.png"
NOT_RECORDED = "*not recorded*"

LAYOUT_NAMES = {"neurons": "neuron-major", "points": "point-major"}
# kronjax.Plan()'s fields: a results JSON's config.plan is shown where it differs from these.
AUTOMATIC_PLAN = {"active_capacity": None, "candidate_capacity": None, "index_delta": 0.25,
                  "index": "auto", "update": "auto", "layout": "auto", "init_chunk": 256}

BEGIN = re.compile(r"<!-- generated: ([\w-]+) \(docs/gen_tables\.py\) -->\n")


# ----------------------------------------------------------------------------- formatting


def num(v: Any, digits: int = 4) -> str:
  """A number for a table: ``digits`` significant digits, scientific below 1e-3 or from 1e6."""
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
      return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"
  return str(v)


def ms(seconds: float | None, digits: int = 3) -> str:
  return "-" if seconds is None else num(1000 * seconds, digits)


def ratio(v: float | None) -> str:
  if v is None:
    return "-"
  return f"{v:.0f}x" if abs(v) >= 100 else f"{num(v, 3)}x"


def cell(v: Any) -> str:
  return num(v).replace("|", "\\|").replace("*", "\\*")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(out)


def dict_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A results.json ``table`` (list of dicts, columns in first-seen order) as markdown."""
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  return table(columns, [[row.get(c) for c in columns] for row in rows])


def load(relative: str) -> dict:
  return json.loads((RESULTS / relative).read_text())


def machine(env: Mapping[str, Any] | None) -> str:
  """What the results JSON says about the machine, in one line."""
  if not env:
    return NOT_RECORDED
  parts = []
  if "backend" in env:
    device = env.get("device") or env.get("devices")
    if isinstance(device, list):
      device = ", ".join(map(str, device))
    count = env.get("device_count")
    parts.append(f"{env['backend']} backend" + (f" ({count} x {device})" if device and count
                                                 else f" ({device})" if device else ""))
  if "cpu_count" in env:
    parts.append(f"{env['cpu_count']} CPUs")
  if "platform" in env:
    parts.append(str(env["platform"]))
  if "jax" in env:
    parts.append(f"jax {env['jax']}")
  if "python" in env:
    parts.append(f"Python {env['python']}")
  native = env.get("native")
  if isinstance(native, Mapping):
    parts.append("native CPU kernels " + ("on" if native.get("available") else "off"))
  if env.get("x64"):
    parts.append("x64 enabled")
  return ", ".join(parts) if parts else NOT_RECORDED


def provenance(relative: str, data: Mapping[str, Any], *, script: str | None = None) -> str:
  """The source line under each table: file, machine, date, command."""
  date = data.get("date")
  command = data.get("command")
  if command:
    command_text = f"`{_relative_command(command)}`"
  elif isinstance(data.get("config"), Mapping) and "file" in data["config"]:
    cfg = data["config"]
    overrides = ", ".join(f"`{o}`" for o in cfg.get("overrides") or []) or "none"
    command_text = (f"{NOT_RECORDED} (a `kronjax run` of `{cfg['file']}`, overrides: {overrides}"
                    f"{', smoke' if cfg.get('smoke') else ''}; the parameters it ran with are in "
                    f"the JSON's `config.params`)")
  elif script:
    command_text = f"{NOT_RECORDED} (written by `{script}`)"
  else:
    command_text = NOT_RECORDED
  return (f"*Source:* `experiments/results/{relative}`. *Machine:* {machine(data.get('environment'))}. "
          f"*Date:* {date or NOT_RECORDED}. *Command:* {command_text}.")


def _relative_command(command: str) -> str:
  """A recorded command without the recording machine's virtual-environment path."""
  return re.sub(r"\S*/\.venv/bin/", "", command)


def params_line(data: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
  """The run's parameters, and the plan fields it set (``config.plan``) where not automatic."""
  params = data.get("config", {}).get("params", {})
  items = [(k, v) for k, v in params.items() if keys is None or k in keys]
  line = "*Parameters:* " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in items) + "."
  plan = data.get("config", {}).get("plan") or {}
  given = [(k, v) for k, v in plan.items() if v != AUTOMATIC_PLAN.get(k)]
  if given:
    line += " *Plan:* " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in given) + "."
  return line


# ----------------------------------------------------------------------------- the tables


def scaling_d_summary() -> str:
  """README and home page: step time at a few d, kronjax against the dense baseline."""
  data = load("scaling_d/results.json")
  m = data["metrics"]
  rows = []
  for k, kron, dense in zip(m["log2_d"], m["kronjax_ms"], m["dense_ms"]):
    if k in (10, 14, 16, 17, 18, 20):
      rows.append([f"2^{k} = {2 ** k}", num(kron, 3), num(dense, 4) if dense is not None else
                   "does not fit (W and its gradient > "
                   f"{m['dense_max_bytes'] / 2 ** 30:g} GiB)",
                   ratio(dense / kron) if dense is not None else "-"])
  head = (f"Median milliseconds per training step, width m = {m['width']}, n = {m['n']} training "
          f"points, batch {m['batch_size']}, float32:")
  return "\n\n".join([head, table(["d", "kronjax ms", "dense baseline ms", "dense / kronjax"], rows),
                      provenance("scaling_d/results.json", data)])


def step() -> str:
  data = load("step.json")
  fl, vs, b1, floor = data["flat_in_d"], data["vs_dense"], data["batch1_paths"], data["floor"]
  path = data.get("update")
  head = (f"m = {data['m']}, n = {data['n']}, batch {data['batch']}, update path `{path}`, "
          f"layout `{data['layout']}` ({LAYOUT_NAMES[data['layout']]} `P`).")
  t1 = table(["d", "kronjax ms (median)", "p10-p90 ms", "active per point"],
             [[f"2^{r['log2_d']}", ms(r["median_s"]), f"{ms(r['p10_s'])}-{ms(r['p90_s'])}",
               num(r.get("active"), 4)] for r in fl["rows"]])
  nl = floor["other_layout"]
  t2 = table(["measurement", "result"], [
      ["max / min of the medians over d", num(fl["max_over_min"], 3)],
      [f"dense baseline vs kronjax at d = 2^{vs['log2_d']}",
       f"{ms(vs['dense']['median_s'])} ms vs {ms(vs['kronjax']['median_s'])} ms: "
       f"{ratio(vs['speedup'])}"],
      ["floor: the step's bare passes over `P` (see above), one call per step",
       f"{ms(floor['floor']['median_s'])} ms; step / floor = {num(floor['ratio'], 3)} "
       f"(per round {num(min(floor['ratio_per_round']), 3)}-{num(max(floor['ratio_per_round']), 3)})"],
      *([[f"in compiled loops of {floor['in_loop']['steps_per_call']} steps per call (the step "
          "as `fit`'s chunks run it; the floor as a `lax.scan`)",
          f"{ms(floor['in_loop']['step']['median_s'])} ms vs "
          f"{ms(floor['in_loop']['floor']['median_s'])} ms; step / floor = "
          f"{num(floor['in_loop']['ratio'], 3)} (per round "
          f"{num(min(floor['in_loop']['ratio_per_round']), 3)}-"
          f"{num(max(floor['in_loop']['ratio_per_round']), 3)})"]] if "in_loop" in floor else []),
      [f"the same step with `P` {LAYOUT_NAMES[nl['layout']]}",
       f"{ms(nl['kronjax']['median_s'])} ms "
       f"({ratio(nl['kronjax']['median_s'] / floor['kronjax']['median_s'])} the step above)"],
      [f"batch 1, m = {b1['m']}, n = {b1['n']}: sparse vs full path",
       f"{ms(b1['sparse']['median_s'])} ms vs {ms(b1['dense']['median_s'])} ms: "
       f"{ratio(b1['speedup'])}"],
  ])
  return "\n\n".join([head, t1, t2, provenance("step.json", data, script="experiments/bench_step.py")])


def threshold() -> str:
  data = load("threshold.json")
  rows = []
  for q in data["query"]:
    for r in q["queries"]:
      rows.append([q["m"], r["batch"], num(r["active_mean"], 4), num(q["candidates_mean"], 4),
                   num(r["scan_ms"], 4), num(r["bucketed_ms"], 4), ratio(r["speedup_bucketed"]),
                   num(q["build_ms"]["bucketed"], 4)])
  t1 = table(["m", "B", "active", "candidates", "scan ms", "bucketed ms", "speedup",
              "one rebuild ms"], rows)
  tr = data["train"]
  t2 = table(["index", "median ms", "mean ms", "p90 ms", "rebuilds", "overflows"],
             [[k, num(tr[k]["median_ms"], 3), num(tr[k]["mean_ms"], 3),
               num(tr[k]["p90_ms"], 3), tr[k]["rebuilds"], tr[k]["overflows"]]
              for k in ("scan", "bucketed")])
  n = data["query"][0]["n"]
  head1 = f"Query time of the threshold index, n = {n} points:"
  head2 = (f"A whole training step, {tr['optimizer']}, batch {tr['batch']}, m = {tr['m']}, "
           f"n = {tr['n']}, update path `{tr['update']}`, "
           f"{tr['steps']} steps (same losses with both kinds: {num(tr['same_losses'])}):")
  return "\n\n".join([head1, t1, head2, t2,
                      provenance("threshold.json", data, script="experiments/bench_threshold.py")])


def init() -> str:
  data = load("init.json")
  s, imp = data["summary"], data["implicit"]
  rows = [
      [f"implicit, d = {imp['d']}", num(s["implicit_median_s"], 3),
       f"{num(s['implicit_peak_rss_gib'], 3)} GiB peak RSS"],
      [f"explicit, d = {data['explicit_half_d']['d']}", num(data["explicit_half_d"]["median_s"], 3), ""],
      [f"explicit, d = {s['d_small']}", num(s["explicit_median_s_at_d_small"], 3), ""],
      [f"explicit, d = {s['d_big']} (extrapolated linearly, not run)",
       num(s["explicit_extrapolated_s_at_d_big"], 4), ""],
  ]
  return "\n\n".join([f"n = {imp['n']}, m = {imp['m']}:", table(["init", "median s", "memory"], rows),
                       provenance("init.json", data, script="experiments/bench_init.py")])


def sweep() -> str:
  blocks = []
  for name in ("sweep.json", "sweep_retain.json"):
    data = load(name)
    rows = []
    for r in data["results"]:
      runs = r.get("runs") or {}
      xla = r.get("xla_product") or {}
      rows.append([
          r["optimizer"], f"{r['m']} / {r['n']} / {r['batch']}", r["members"],
          ms(r["sequential_16_steps"]["median_s"]),
          f"{ms(r['sweep_step_shared_data']['median_s'])} ({ratio(r['ratio_shared_vs_sequential'])})",
          f"{ms(r['sweep_step_stacked_data']['median_s'])} ({ratio(r['ratio_stacked_vs_sequential'])})",
          ms(r["update_floor"]["median_s"]),
          (f"{ms(xla['sweep_xla']['median_s'])} vs {ms(xla['sequential_xla']['median_s'])}"
           if xla else "-"),
          (f"{ms(runs['sweep_fit']['median_s'])} vs {ms(runs['sequential_fits']['median_s'])} "
           f"({ratio(runs['ratio_sweep_fit_vs_sequential_fits'])})" if runs else "-"),
          num(r.get("sweep_minor_page_faults_per_step"), 3),
          (f"{num(r['temp_bytes_sweep_step'] / 2**20, 3)} / {num(r['temp_bytes_member_step'] / 2**20, 3)}"
           if r.get("temp_bytes_sweep_step") is not None else "-"),
          num(r["max_abs_diff_sweep_vs_sequential_P"], 2),
      ])
    head = (f"`{name}` (`retain_freed_memory` {'on' if data.get('retain_freed_memory') else 'off'}); "
            "milliseconds per step of all members:")
    blocks += [head, table(["optimizer", "m / n / B", "members", "separate jitted steps",
                            "sweep, data shared (ratio)", "vmap, data stacked (ratio)",
                            "update floor", "XLA only: sweep vs separate",
                            "sweep.fit vs separate fits (ratio)", "page faults per sweep step",
                            "XLA temporaries MiB: sweep / member", "max abs P difference"],
                           rows),
               provenance(name, data, script="experiments/bench_sweep.py")]
  return "\n\n".join(blocks)


def sharding() -> str:
  data = load("sharding.json")
  rows = [[r["m"], r["batch"], r["classes"], r["optimizer"], r["devices"], r["dtype"],
           ", ".join(r["collective_ops"]), r["measured_bytes"], r["estimated_bytes"]["total"],
           num(r["matches_estimate"]), r["P_bytes"]] for r in data["results"]]
  head = ("Collectives in the compiled HLO of one neuron-sharded step (simulated CPU devices), "
          "bytes per step:")
  return "\n\n".join([head, table(["m", "B", "C", "optimizer", "devices", "dtype", "collectives",
                                   "measured bytes", "estimated bytes", "equal", "bytes of P"], rows),
                      provenance("sharding.json", data, script="experiments/bench_sharding.py")])


def checkpoint() -> str:
  data = load("checkpoint.json")
  st, summary = data["settings"], data["summary"]
  runs = [(label, summary[key]) for label, key in (("1 process", "1_process"),
                                                   ("2 processes", "2_processes"))]
  rows = [
      ["state size (GiB)"] + [num(r["state_bytes"] / 2**30, 3) for _, r in runs],
      ["save, blocking (s)"] + [num(r["save_s"], 3) for _, r in runs],
      ["restore (s)"] + [num(r["restore_s"], 3) for _, r in runs],
      ["asynchronous save: the call blocks (s)"] + [num(r["async_blocking_s"], 3) for _, r in runs],
      ["asynchronous save: committed after (s)"] + [num(r["async_committed_s"], 3) for _, r in runs],
      ["train step (s)"] + [num(r["step_s"], 3) for _, r in runs],
      ["first train step after a save (s)"] + [num(r["first_step_after_save_s"], 3) for _, r in runs],
  ]
  head = (f"m = {st['m']}, n = {st['n']}, batch {st['batch']}, {st['dtype']}, "
          f"`{st['optimizer']}` (the state is `P`, `A` and two momentum traces), median of "
          f"{st['repeats']}; restoring a 1-process checkpoint into 2 processes takes "
          f"{num(summary['restore_1_process_to_2_s'], 3)} s, the reverse "
          f"{num(summary['restore_2_processes_to_1_s'], 3)} s:")
  return "\n\n".join([head, table(["", *(label for label, _ in runs)], rows),
                       provenance("checkpoint.json", data)])


def drift() -> str:
  data = load("drift.json")
  st = data["settings"]
  rows = []
  for r in data["runs"]:
    last_step, last = r["drift"][-1]
    rows.append([r["optimizer"], r["update"], last_step, num(last, 3), num(r["drift_after_resync"], 3),
                 ms(r["step_median_s"]), ms(r["resync_median_s"])])
  head = (f"max |P - (W0 X^T + A K)| after long {st['dtype']} runs, m = {st['width']}, "
          f"n = {st['n']}, batch {st['batch']}:")
  return "\n\n".join([head, table(["optimizer", "update path", "steps", "drift", "after resync",
                                   "step ms", "resync ms"], rows),
                      provenance("drift.json", data)])


def auto() -> str:
  data = load("auto.json")
  rows = []
  for r in data["shapes"]:
    resolved = r["resolved"]["default"]
    fastest = r["fastest"]
    rows.append([r["width"], r["n"], r["batch"],
                 f"{resolved['update']} / {resolved['layout']} / {resolved['index']}",
                 ms(r["ab_median_s"]["default"]), fastest, ms(r["ab_median_s"][fastest]),
                 f"{r['default_over_fastest']:.3f}x", f"{r['default_over_fastest_all_resident']:.3f}x"])
  head = ("Milliseconds per `jit_train_step` of the default `Plan` and of the fastest explicit "
          "(update / layout / index) setting, measured A/B with only those two states resident "
          "(the last column: all settings resident at once, interleaved), plain SGD, float32:")
  return "\n\n".join([head, table(["m", "n", "B", "default resolves to", "default ms",
                                    "fastest explicit", "its ms", "default / fastest",
                                    "all resident"], rows),
                       provenance("auto.json", data)])


def init_scaling() -> str:
  data = load("init_scaling.json")
  a, b, s = data["a"], data["b"], data["settings"]
  gib = 2.0**30
  rows = [
      [f"d = 2^30 ({' x '.join(map(str, s['a']['dims']))}), m = {s['a']['m']}, n = {s['a']['n']}",
       f"kronecker (R = {a['init']['init_rank']})", "init", num(a["init"]["median_s"], 3),
       num(a["init"]["peak_rss_bytes"] / gib, 3)],
      ["", f"kronecker (R = {a['predict']['init_rank']})", f"predict {s['a']['n_new']} new points",
       num(a["predict"]["median_s"], 3), num(a["predict"]["peak_rss_bytes"] / gib, 3)],
      [f"d = 2^20 ({' x '.join(map(str, s['b']['dims']))}), m = {s['b']['m']}, n = {s['b']['n']}",
       f"kronecker (R = {b['kronecker']['init_rank']})", "init", num(b["kronecker"]["median_s"], 3),
       num(b["kronecker"]["peak_rss_bytes"] / gib, 3)],
      ["", "implicit", "init", num(b["implicit"]["median_s"], 3),
       num(b["implicit"]["peak_rss_bytes"] / gib, 3)],
      ["", "explicit", "init (not run: estimated)", f"~{num(b['explicit']['estimated_s'], 2)}", "-"],
  ]
  head = (f"Seconds (median after compilation) and peak resident memory, float32, Gram "
          f"{s['a_gram']} / {s['b_gram']}:")
  return "\n\n".join([head, table(["problem", "init", "what", "seconds", "peak GiB"], rows),
                       provenance("init_scaling.json", data)])


def pairwise_scale() -> str:
  """Entity-indexed data at scale: init time and memory, the step against its bytes floor, a
  million pairs, and the epoch cost against the dense network's."""
  data = load("pairwise_scale.json")
  st, goals, gib = data["settings"], data["goals"], 2.0**30
  blocks = []
  if data.get("partial"):
    blocks.append(f"*Partial run:* not measured: {', '.join(data.get('missing') or []) or 'none'}.")
  blocks.append(f"Pairs of {st['entities'][0]} x {st['entities'][1]} entities (random unit-norm "
                f"tables, dims {st['dims'][0]} and {st['dims'][1]}: d = {st['d']}), index drawn "
                f"uniformly, {st['dtype']}, kronecker init, `optax.sgd`, Gram mode `entities`.")
  rows = []
  for key, label in (("init_default_plan", "`Plan()`"), ("init_points_layout",
                                                           "`Plan(layout=\"points\")`")):
    r = data.get(key) or {}
    if not r.get("completed"):
      rows.append([label, "not measured", "-", "-", "-", "-", "-", "-"])
      continue
    leaf = r["largest_leaf_state"]
    rows.append([f"{label}, n = {r['n']}, m = {r['m']}", LAYOUT_NAMES.get(r["layout"], r["layout"]),
                 num(r["dataset_and_init_s"], 3), num(r["dataset_and_init_compiled_s"], 3),
                 num(r["peak_rss_bytes"] / gib, 3), num(r["state_bytes"]["P_A_T_opt_state"] / gib, 3),
                 ratio(r["peak_rss_over_state"]),
                 f"{' x '.join(map(str, leaf['shape']))} (n^2 = {num(float(r['n_squared']))}: "
                 f"{'none' if r['no_n_squared_leaf'] else 'present'})"])
  blocks += [f"`kronjax.Dataset` + `kronjax.init` in a fresh process, compilation included (goal "
             f"under {num(goals['init_s'])} s), and the process's peak resident memory against the "
             f"bytes of `P`, `A_T` and the optimizer state (goal within "
             f"{num(goals['peak_rss_over_state'])}x):",
             table(["plan", "`P` stored", "seconds", "compiled, seconds", "peak RSS GiB",
                    "P + A_T + opt GiB", "peak / state", "largest array (any n^2?)"], rows)]
  steps = data.get("steps") or {}
  if steps.get("completed"):
    bw = steps["bandwidth"]
    rows = [[r["batch"], "`Plan(update=\"sparse\")`" if r["plan"] else "`Plan()`", r["path"],
             r["auto_path"], ms(r["median_s"], 4), f"{ms(r['p10_s'], 4)}-{ms(r['p90_s'], 4)}",
             num(r["touched_rows_mean"], 4), num(r["floor_bytes"] / 2**20, 4),
             ms(r.get("bytes_floor_s", r["floor_s"])),
             ms(r["flops_floor_s"]) if "flops_floor_s" in r else "-", ms(r["floor_s"]),
             ratio(r["over_floor"])] for r in steps["rows"]]
    blocks += [f"`kronjax.jit_train_step`, n = {steps['n']}, m = {steps['m']}, medians over "
               f"{steps['rounds']} interleaved rounds after compilation. The floor: the `P` rows the "
               f"step reads and writes (the touched rows, those of the neurons the batch fires, "
               f"on the sparse path and on the full path with `P` neuron-major; all m with `P` "
               f"point-major) "
               f"plus its `B x n` Gram rows, at the {num(bw['bytes_per_s'] / 1e9, 3)} GB/s of a numpy "
               f"copy of {bw['array_mib']} MiB (read plus written) in the same process, or the "
               f"product's `2 x rows x B x n` flops at the "
               f"{num(steps['gemm']['flops_per_s'] / 1e9, 3) if 'gemm' in steps else '-'} GFLOP/s "
               f"of a compute-bound `sgemm` in the same process, where that takes longer:",
               table(["B", "plan", "path", "`Plan()` picks", "ms", "p10-p90 ms", "touched rows",
                      "floor MiB", "bytes ms", "flops ms", "floor ms", "step / floor"], rows)]
  large = data.get("large") or {}
  if large.get("completed"):
    blocks += [f"n = {large['n']} pairs, m = {large['m']}, `Plan(update=\"sparse\")`, "
               f"batch 1:",
               table(["measurement", "value"], [
                   ["`Dataset` + `init` (s)", num(large["dataset_and_init_s"], 3)],
                   ["P + A_T + optimizer state (GiB)",
                    num(large["state_bytes"]["P_A_T_opt_state"] / gib, 3)],
                   ["peak resident memory (GiB)", num(large["peak_rss_bytes"] / gib, 3)],
                   [f"steps completed (path `{large['path']}`)",
                    f"{large['completed_steps']} of {large['steps']} ({large['skipped_steps']} "
                    f"skipped)"],
                   ["ms per step (median; p10-p90)",
                    f"{ms(large['median_s'], 4)} ({ms(large['p10_s'], 4)}-{ms(large['p90_s'], 4)})"],
                   ["epoch: n steps (s)", f"{num(large['epoch_s'], 4)} "
                                          f"({num(large['epoch_s'] / 3600, 3)} h)"],
               ])]
  curve, cross = data.get("curve") or {}, data.get("crossing") or {}
  if curve.get("completed") and cross:
    dense = cross["dense"]
    keys = sorted(dense, key=int)
    rows = [[r["n"], ms(r["sparse"]["median_s"], 4), ms(r["full"]["median_s"], 4), r["auto_path"],
             num(r["best_epoch_s"], 3)] + [num(dense[k]["epoch_s"][str(r["n"])], 3) for k in keys]
            for r in curve["rows"]]
    cross_rows = []
    for k in keys:
      v, c = dense[k], dense[k]["crossing"]
      where = (c.get("note", "none") if c["n"] is None else
               f"n = {num(c['n'], 3)}" + (" (extrapolated)" if c["extrapolated"] else ""))
      cross_rows.append([f"d = {v['d']}", f"{ms(v['median_s'], 4)} ms "
                         f"({'measured' if v['measured'] else v['source']})", where,
                         f"n = {num(v['count_model_crossing_n'], 3)}"])
    blocks += [f"The epoch in kernel space against the dense network's, m = {curve['m']}, B = "
               f"{curve['batch']}: kernel epoch = (n / B) x the faster path's step (`O(n^2)`), "
               f"dense epoch = (n / B) x the dense step (`O(n m d)`):",
               table(["n", "sparse ms", "full ms", "auto picks", "kernel epoch s"]
                     + [f"dense epoch s, d = {dense[k]['d']}" for k in keys], rows),
               "Where the dense network becomes cheaper (the kernel step, interpolated in n, costs "
               "the dense step; by operation count, (n / B) T n row updates against 3 n m d "
               f"multiply-adds, T = {num(cross['touched_rows_mean'], 4)} touched rows):",
               table(["dense network", "dense step", "measured crossing", "count-model crossing"],
                     cross_rows)]
  blocks.append(provenance("pairwise_scale.json", data, script="experiments/bench_pairwise.py"))
  return "\n\n".join(blocks)


def runner_result(relative: str, *, keys: Sequence[str] | None = None, plot: bool = True) -> str:
  data = load(relative)
  parts = [params_line(data, keys), dict_table(data["table"])]
  if plot and data.get("plots"):
    folder = pathlib.PurePosixPath(relative).parent
    for name in data["plots"]:
      parts.append(f"![{folder}/{name}](assets/results/{folder}/{name})")
  parts.append(provenance(relative, data))
  return "\n\n".join(parts)


def sweep_grid() -> str:
  data = load("sweep_grid/results.json")
  m = data["metrics"]
  p = data["config"]["params"]
  rows = [[b] + [f"{num(m['train_loss'][i][j], 3)} / {num(m['eval_loss'][i][j], 3)}"
                 for j in range(len(p["learning_rates"]))]
          for i, b in enumerate(p["thresholds"])]
  best = m["best"]
  extra = table(["measurement", "value"], [
      ["best held-out loss", f"{num(best['eval_loss'], 3)} at b = {best['b']}, lr = {best['lr']}"],
      ["members that diverged", m["diverged"]],
      ["vmapped grid, ms per step of all members", num(m["vmapped_ms_per_grid_step"], 3)],
      ["vmapped grid, ms per member-step", num(m["vmapped_ms_per_member_step"], 3)],
      ["each cell alone, ms per step (min / median / max)",
       " / ".join(num(f(sum(m["single_ms_per_step"], [])), 3) for f in
                  (min, lambda v: sorted(v)[len(v) // 2], max))],
      ["active capacity every member carries", m["vmapped_active_capacity"]],
  ])
  return "\n\n".join([params_line(data), "Final train / held-out loss, b (rows) by learning rate "
                      "(columns):", table(["b \\ lr"] + p["learning_rates"], rows), extra,
                      "![sweep_grid](assets/results/sweep_grid/sweep_grid.png)",
                      provenance("sweep_grid/results.json", data)])


def kiba() -> str:
  """The KIBA drug-target benchmark: kronjax and KronRLS on the same features, the published rows."""
  relative = "kiba/results.json"
  data = load(relative)
  m = data["metrics"]
  chosen = m["kronjax"]["chosen"]
  rows = [[r["method"], num(r["test MSE"], 3), num(r["test CI"], 3),
           "-" if r["train seconds"] is None else num(r["train seconds"], 3)]
          for r in data["table"]]
  facts = table(["measurement", "value"], [
      ["pairs (train folds / test fold)", f"{m['n_train']} / {m['n_test']}"],
      ["drugs x targets, feature dims", f"{m['drugs']} x {m['targets']}, "
                                         f"{m['feature_dims'][0]} x {m['feature_dims'][1]}"],
      ["kronjax setting chosen on the validation fold",
       f"lr = {chosen['learning_rate']}, b = {chosen['threshold']}, weight decay = "
       f"{chosen['weight_decay']}, {chosen['epoch']} epoch(s)"],
      ["KronRLS ridge chosen on the validation fold", num(m["kronrls"]["lambda"])],
      ["peak resident memory of the run, MiB", num(m["peak_rss_mib"], 4)],
  ])
  sweep = table(["b", "learning rate", "epoch", "validation MSE", "active neurons per point"],
                [[r["threshold"], r["learning_rate"], r["epoch"], num(r["validation_mse"], 3),
                  num(r["active_per_step"], 3)] for r in m["sweep"]])
  return "\n\n".join([
      params_line(data), table(["method", "test MSE", "test CI", "train seconds"], rows), facts,
      "The threshold on the validation fold (the sweep that chose the setting):", sweep,
      "![kiba](assets/results/kiba/kiba.png)", provenance(relative, data)])


def dispatch() -> str:
  data = load("dispatch.json")
  rows = [[r["batch"], f"{r['m']} / {r['n']}", r["update_path"], r["steps"],
           num(r["scan_ms_per_step"], 3),
           f"{num(r['fit_ms_per_step'], 3)} ({ratio(r['fit_over_scan'])})",
           f"{num(r['fit_chunk1_ms_per_step'], 3)} ({ratio(r['fit_chunk1_over_scan'])})"]
          for r in data["rows"]]
  head = ("Milliseconds per training step: a bare `jax.jit(lax.scan(kronjax.train_step))` over "
          "the batches against `kronjax.fit` (`chunk=\"auto\"`, everything it does included) and "
          f"`fit(chunk=1)` (one compiled step per Python iteration); medians of {data['rounds']} "
          "interleaved rounds after compilation:")
  return "\n\n".join([head, table(["B", "m / n", "update path", "steps", "bare scan",
                                   "fit (ratio)", "fit, chunk=1 (ratio)"], rows),
                      provenance("dispatch.json", data, script="experiments/bench_dispatch.py")])


def contention() -> str:
  """The step beside a busy process: each setting quiet and busy, busy / quiet, auto / best."""
  data = load("contention.json")
  quiet, busy = data["median_s"]["quiet"], data["median_s"]["busy"]
  described = {
      "auto": "`Plan()`, kernel threads: XLA's pool",
      "points/blas": "point-major, gemm on BLAS's own threads (the kernel's split off)",
  }
  rows = []
  for name, s in data["settings"].items():
    what = described.get(name) or (
        f"`Plan(layout=\"{s['layout']}\")`, kernels capped at {s['threads']} thread"
        f"{'s' if s['threads'] != 1 else ''}")
    cpu = data.get("cpu_s_per_step", {}).get("quiet", {}).get(name)
    rows.append([name, what, data["layout"][name], ms(quiet[name]), ms(busy[name]),
                 ratio(data["busy_over_quiet"][name]), ms(cpu) if cpu is not None else "-"])
  head = (f"m = {data['m']}, n = {data['n']}, batch {data['batch']}, update path "
          f"`{data['update_path']['auto']}`, plain SGD, float32; milliseconds per "
          f"`jit_train_step` (medians of {data['rounds']} interleaved rounds of "
          f"{data['steps_per_round']} steps per setting and condition); busy: beside one process "
          f"spinning on one core. XLA's intra-op pool: {data['pool_threads']} threads.")
  best = data["best_explicit"]
  twin = data.get("auto_runs_as")
  summary = table(["condition", "auto / best explicit setting", "best explicit setting",
                   f"auto / {twin or '-'} (the same program: the benchmark's own spread)"], [
      [c, ratio(data["auto_over_best"][c]), best[c],
       ratio(quiet["auto"] / quiet[twin]) if twin and c == "quiet" else
       ratio(busy["auto"] / busy[twin]) if twin else "-"] for c in ("quiet", "busy")])
  return "\n\n".join([head, table(["setting", "what", "`P` stored", "quiet ms", "busy ms",
                                   "busy / quiet", "CPU ms per step (quiet)"], rows), summary,
                      provenance("contention.json", data,
                                 script="experiments/bench_contention.py")])


def chosen_text(c: Mapping[str, Any]) -> str:
  """What a method of a ``warm`` / ``cold`` experiment chose on validation, in words."""
  if "trees" in c:
    return f"{c['trees']} trees of {c['max_leaf_nodes']} leaves, lr = {c['learning_rate']}"
  if "threshold" in c:
    bias = f", bias lr = {c['bias_learning_rate']}" if "bias_learning_rate" in c else ""
    return (f"lr = {c['learning_rate']}, b = {num(c['threshold'], 3)}, decay = "
            f"{c['weight_decay']}{bias}, {c['epoch']} epoch(s)")
  if "lambda" in c:
    return f"lambda = {num(c['lambda'], 3)}"
  return "-"


def chosen_table(data: Mapping[str, Any], cold_name: str) -> str:
  """Per method of ``data["table"]``, its choices in the ``warm`` and ``cold`` regimes."""
  regimes = data["metrics"]["regimes"]
  return table(["method", "chosen on validation (warm)", f"chosen on validation ({cold_name})"],
               [[r["method"]] + [chosen_text(regimes[g]["methods"][r["method"]].get("chosen") or {})
                                 for g in ("warm", "cold")] for r in data["table"]])


def movielens() -> str:
  """MovieLens-100k: each kronjax option beside the baselines, warm pairs and unseen movies."""
  relative = "movielens/results.json"
  data = load(relative)
  m = data["metrics"]
  regimes = m["regimes"]
  rows = [[r["method"], num(r["warm test RMSE"], 4), num(r["cold test RMSE"], 4),
           num(r["warm validation RMSE"], 4), num(r["cold validation RMSE"], 4)]
          for r in data["table"]]

  settings = chosen_table(data, "cold")
  facts = table(["measurement", "value"], [
      ["users x movies, ratings", f"{m['users']} x {m['movies']}, {m['ratings']}"],
      ["feature dims (user x movie)", f"{m['feature_dims'][0]} x {m['feature_dims'][1]}"],
      ["ratings train / validation / test (warm)",
       f"{regimes['warm']['n_train']} / {regimes['warm']['n_val']} / {regimes['warm']['n_test']}"],
      ["ratings train / validation / test (cold)",
       f"{regimes['cold']['n_train']} / {regimes['cold']['n_val']} / {regimes['cold']['n_test']}"],
      ["peak resident memory of the run, MiB", num(m["peak_rss_mib"], 4)],
  ])
  curve = table(["regime", "b", "learning rate", "epoch", "validation RMSE", "test RMSE",
                 "active neurons per point"],
                [[regime, num(c["threshold"], 3), c["learning_rate"], c["epoch"],
                  num(c["validation_rmse"], 4), num(c["test_rmse"], 4),
                  num(c["active_per_step"], 3)]
                 for regime in ("warm", "cold") for c in regimes[regime]["threshold_curve"]])
  return "\n\n".join([
      params_line(data), table(["method", "warm test RMSE", "cold test RMSE",
                                "warm validation RMSE", "cold validation RMSE"], rows),
      settings, facts,
      "The threshold curve (mirrored start; per `b` the learning rate and epoch chosen on "
      "validation):", curve,
      "![movielens](assets/results/movielens/movielens.png)", provenance(relative, data)])


def hlo_costs() -> str:
  """The XLA-path step as an accelerator runs it: kernel launches and bytes from the HLO."""
  data = load("hlo_costs.json")
  model = data["model"]
  rows = []
  for r in data["results"]:
    plan = r["plan"]
    top = max(r["by_category"].items(), key=lambda kv: kv[1]["bytes"])[0]
    loops = ", ".join(str(t) for t in r["loops"]) or "none"
    rows.append([r["case"], r["width"], r["n"], r["batch"], f"{plan['update']} / {plan['layout']}",
                 r["kernels"], loops, num(r["bytes"] / 2**20), num(r["floor_bytes"] / 2**20),
                 f"{r['bytes'] / r['floor_bytes']:.1f}x", top,
                 f"{r['model_launch_ms']:.3f}", f"{r['model_memory_ms']:.3f}", r["dominant"]])
  head = ("The training step compiled for XLA (native kernels off, state donated, as "
          "`jit_train_step` runs it), read from its optimized HLO: kernels launched (a loop body "
          "once per iteration), MiB moved against the step's bytes floor (the P entries it must "
          "read and write, and the Gram rows), the category moving the most bytes, and the two "
          f"times a model of an accelerator gives: launches at {model['launch_us']:g} us each, "
          f"bytes at {model['bandwidth_bytes_per_s'] / 1e12:g} TB/s (an H100's HBM):")
  return "\n\n".join([head, table(["shape", "m", "n", "B", "update / layout", "kernels",
                                    "loop trips", "MiB moved", "MiB floor", "moved / floor",
                                    "most bytes", "launch ms", "memory ms", "expected to dominate"],
                                   rows),
                       provenance("hlo_costs.json", data)])


def kiba_ablation() -> str:
  """KIBA: each kronjax option beside KronRLS on the same features, warm pairs and unseen drugs."""
  relative = "kiba_ablation/results.json"
  data = load(relative)
  m = data["metrics"]
  regimes = m["regimes"]
  rows = [[r["method"], num(r["warm test MSE"], 4), num(r["warm test CI"], 3),
           num(r["cold test MSE"], 4), num(r["cold test CI"], 3),
           num(r["warm validation MSE"], 4), num(r["cold validation MSE"], 4)]
          for r in data["table"]]

  settings = chosen_table(data, "unseen drugs")

  def sizes(regime: str) -> str:
    r = regimes[regime]
    return f"{r['n_train']} / {r['n_val']} / {r['n_test']} ({r['drugs_in_train']} drugs in training)"

  facts = table(["measurement", "value"], [
      ["drugs x targets, measured pairs", f"{m['drugs']} x {m['targets']}, {m['pairs']}"],
      ["feature dims (drug x target)", f"{m['feature_dims'][0]} x {m['feature_dims'][1]}"],
      ["pairs train / validation / test (warm)", sizes("warm")],
      ["pairs train / validation / test (unseen drugs)", sizes("cold")],
      ["peak resident memory of the run, MiB", num(m["peak_rss_mib"], 4)],
  ])
  curve = table(["regime", "b", "learning rate", "epoch", "validation MSE", "test MSE", "test CI",
                 "active neurons per point"],
                [["warm" if regime == "warm" else "unseen drugs", num(c["threshold"], 3),
                  c["learning_rate"], c["epoch"], num(c["validation_mse"], 4),
                  num(c["test_mse"], 4), num(c["test_ci"], 3), num(c["active_per_step"], 3)]
                 for regime in ("warm", "cold") for c in regimes[regime]["threshold_curve"]])
  return "\n\n".join([
      params_line(data),
      table(["method", "warm test MSE", "warm test CI", "unseen drugs: test MSE",
             "unseen drugs: test CI", "warm validation MSE", "unseen drugs: validation MSE"],
            rows),
      settings, facts,
      "The threshold curve (mirrored start; per `b` the learning rate and epoch chosen on "
      "validation):", curve,
      "![kiba_ablation](assets/results/kiba_ablation/kiba_ablation.png)",
      provenance(relative, data)])


TABLES: dict[str, Callable[[], str]] = {
    "scaling-d-summary": scaling_d_summary,
    "step": step,
    "threshold": threshold,
    "init": init,
    "sweep": sweep,
    "sharding": sharding,
    "drift": drift,
    "checkpoint": checkpoint,
    "auto": auto,
    "init-scaling": init_scaling,
    "pairwise-scale": pairwise_scale,
    "hlo-costs": hlo_costs,
    "dispatch": dispatch,
    "contention": contention,
    "movielens": movielens,
    "kiba-ablation": kiba_ablation,
    "init-law": lambda: runner_result("init_law/results.json"),
    "quickstart": lambda: runner_result("quickstart/results.json"),
    "scaling-d": lambda: runner_result("scaling_d/results.json"),
    "convergence": lambda: runner_result("convergence/results.json"),
    "scaling-m": lambda: runner_result("scaling_m/results.json"),
    "sparsity": lambda: runner_result("sparsity/results.json"),
    "norms": lambda: runner_result("norms/results.json"),
    "sweep-grid": sweep_grid,
    "kiba": kiba,
    "digit-pairs": lambda: runner_result("digit_pairs/results.json"),
    "digit-pairs-lr16": lambda: runner_result("digit_pairs/lr16/results.json"),
    "digit-pairs-three": lambda: runner_result("digit_pairs/three_images/results.json"),
    "digit-pairs-three-lr16": lambda: runner_result("digit_pairs/three_images/lr16/results.json"),
}


# ----------------------------------------------------------------------------- the pages


def render(text: str, *, where: str = "") -> str:
  """``text`` with every generated region rewritten."""
  out, pos = [], 0
  for match in BEGIN.finditer(text):
    name = match.group(1)
    end_marker = f"<!-- end generated: {name} -->"
    end = text.find(end_marker, match.end())
    if end < 0:
      raise ValueError(f"{where}: region {name!r} has no {end_marker!r}")
    if name not in TABLES:
      raise ValueError(f"{where}: unknown generated region {name!r}; known: {sorted(TABLES)}")
    body = TABLES[name]()
    if where == "README.md":  # README images and links are relative to the repository root
      body = body.replace("](assets/results/", "](experiments/results/")
    out += [text[pos:match.end()], body, "\n", end_marker]
    pos = end + len(end_marker)
  out.append(text[pos:])
  return "".join(out)


def stale_pages(root: pathlib.Path = ROOT) -> list[str]:
  """Pages whose generated regions differ from what ``render`` writes now."""
  return [page for page in PAGES if (root / page).exists()
          and render((root / page).read_text(), where=page) != (root / page).read_text()]


def write_pages(root: pathlib.Path = ROOT) -> list[str]:
  changed = []
  for page in PAGES:
    path = root / page
    if not path.exists():
      continue
    text = path.read_text()
    new = render(text, where=page)
    if new != text:
      path.write_text(new)
      changed.append(page)
  return changed


def draw_figure(path: pathlib.Path = FIGURE) -> pathlib.Path:
  """Step time against d: kronjax and the dense baseline (scaling_d and step results)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sd, st = load("scaling_d/results.json"), load("step.json")
  m = sd["metrics"]
  d = [2 ** k for k in m["log2_d"]]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.loglog(d, m["kronjax_ms"], "o-", color="C0",
            label=f"kronjax, m={m['width']}, n={m['n']}, B={m['batch_size']}")
  ran = [(x, t) for x, t in zip(d, m["dense_ms"]) if t is not None]
  ax.loglog(*zip(*ran), "s-", color="C1", label="dense baseline, same m, n, B")
  skipped = [x for x, t in zip(d, m["dense_ms"]) if t is None]
  top = max(t for _, t in ran)
  if skipped:
    ax.loglog(skipped, [top] * len(skipped), "x", color="C1", ms=9,
              label=f"dense: does not fit ({m['dense_max_bytes'] / 2 ** 30:g} GiB cap)")
  rows = st["flat_in_d"]["rows"]
  ax.loglog([2 ** r["log2_d"] for r in rows], [1000 * r["median_s"] for r in rows], "D--", color="C2",
            label=f"kronjax, m={st['m']}, n={st['n']}, B={st['batch']}")
  vs = st["vs_dense"]
  ax.loglog([2 ** vs["log2_d"]], [1000 * vs["dense"]["median_s"]], "D", color="C3",
            label=f"dense baseline, m={st['m']}, n={st['n']}, B={st['batch']}")
  ax.set_ylim(top=top * 5)
  ax.set_xlabel("input dimension d")
  ax.set_ylabel("ms per training step (median)")
  ax.set_title("step time against the input dimension (CPU, float32)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if a page is not current")
  parser.add_argument("--figure", action="store_true", help=f"also redraw {FIGURE.relative_to(ROOT)}")
  args = parser.parse_args(argv)
  if args.check:
    stale = stale_pages()
    if stale:
      print("generated tables are stale in: " + ", ".join(stale) +
            "; run `python docs/gen_tables.py` (or `make docs`) and commit the pages.")
      return 1
    print("generated tables are current in " + ", ".join(PAGES))
    return 0
  changed = write_pages()
  print("rewrote " + (", ".join(changed) if changed else "nothing (all current)"))
  if args.figure:
    print(f"drew {draw_figure().relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
