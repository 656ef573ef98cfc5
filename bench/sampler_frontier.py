"""Sample quality against network calls: every sampler setting of SETTINGS at NFE budgets (steps
T) 8, 16, 32, 64, 128, 256 and 1024, on one model, from the same seed (and the same prompts).

    python bench/sampler_frontier.py runs/char256 --num 32 --out runs/frontier     # the table and the PNG
    python bench/sampler_frontier.py RUN --settings jump "remdm cap" --budgets 8 64  # a part of it

Each row draws `--num` samples of the model's length with one sampler setting at T steps
(md4.sampling.sample, the same generator seed for every row), counts the network's calls with a
wrapper (batch calls, and rows evaluated per sample = the x axis, "calls/sample"), times it, and
scores the samples (md4.evaluate.text_quality): the judge's bits per character, MAUVE against
`--num` chunks of the model's test split (featurizer: the judge's mean last-layer state, bootstrap
SE), unigram entropy and distinct-1..4 over the model's tokens, each ± SE over samples. A row
"data" scores `--num` other test chunks (the ceiling: real text against real text).

The reference is ancestral sampling at T = 1024, drawn with `cached` when the network ignores t
(the same samples for the same seed, fewer calls); column "~ref" says whether a row's judge
bits/char lies within one standard error (of the difference) of the reference's. Settings whose
sampler or options this md4 lacks (remdm and the confidence options come with the samplers of
issue 17) are skipped with the reason printed. Rows are appended to OUT/frontier.json as they
finish and a rerun skips the rows it finds there (it can run in several sittings); OUT/frontier.md
holds the table and OUT/frontier.png quality against calls per sample.

`--tiny`: budgets 4 and 8, 4 samples, few bootstrap replicates: the test's smoke run (with a
fake judge passed to `main`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import md4
from md4 import sampling
from md4.evaluate import markdown_table, pm, reference_chunks, text_quality
from md4.judge import DISTINCT_N
from sampling_speed import Counting

BUDGETS = (8, 16, 32, 64, 128, 256, 1024)
REFERENCE_T = 1024
DATA = "data @ -"  # the key of the real-text row


@dataclass(frozen=True)
class Setting:
    """A row group: `sampler` with `options` (md4.sampling.sample's options dict) at each budget up
    to `max_steps` (None: all); `steps=False` for a sampler whose calls do not depend on T (run once)."""

    name: str
    sampler: str
    options: dict = field(default_factory=dict)
    max_steps: int | None = None
    steps: bool = True


# The settings, in the table's order. Exact samplers first (the model's law), then heuristics.
SETTINGS = [
    Setting("ancestral", "ancestral", max_steps=256),         # T = 1024: `cached` draws the same samples
    Setting("cached", "cached"),                               # = ancestral draw for draw, fewer calls
    Setting("jump", "jump"),                                   # ancestral's law, other draws
    Setting("mean", "mean", max_steps=64),                    # ancestral's law (two-stage step)
    Setting("confidence top", "confidence"),
    Setting("confidence margin", "confidence", {"order": "margin"}),
    Setting("confidence entropy", "confidence", {"order": "entropy"}),
    *[Setting(f"confidence threshold {tau}", "confidence", {"threshold": tau}, steps=False) for tau in (0.5, 0.7, 0.9)],
    Setting("remdm cap eta=0.02", "remdm", {"remask": "cap", "eta": 0.02}),
    Setting("remdm rescale eta=0.02", "remdm", {"remask": "rescale", "eta": 0.02}),
    Setting("remdm conf eta=1", "remdm", {"remask": "conf", "eta": 1.0}),
    Setting("remdm loop eta=0.02", "remdm", {"remask": "loop", "eta": 0.02, "t_on": 0.55, "t_off": 0.05}),
]


def unavailable(setting: Setting, method, time_independent: bool) -> str | None:
    """Why this md4 or this model cannot run the setting, or None."""
    if setting.sampler not in sampling.SAMPLERS:
        return f"md4.sampling has no sampler {setting.sampler!r} (issue 17's samplers are not merged)"
    if setting.options:
        if "options" not in inspect.signature(sampling.sample).parameters:
            return "md4.sampling.sample takes no sampler options (issue 17's samplers are not merged)"
        known = sampling.sampler_options(setting.sampler)
        missing = [k for k in setting.options if k not in known]
        if missing:
            return f"the {setting.sampler} sampler has no option {', '.join(missing)}"
    try:
        sampling.check_sampler(method, setting.sampler, time_independent)
    except md4.UserError as e:
        return str(e)
    return None


def plan(settings: list[Setting], budgets: tuple, method, time_independent: bool) -> list[tuple[Setting, int]]:
    """(setting, T) pairs to run, the reference (ancestral's law at T = 1024) first; skipped
    settings are printed with their reason."""
    reference = Setting("ancestral", "cached" if time_independent else "ancestral")
    rows = [(reference, REFERENCE_T)]
    for s in settings:
        why = unavailable(s, method, time_independent)
        if why:
            print(f"# skipped {s.name}: {why}", file=sys.stderr)
            continue
        ts = [t for t in budgets if t <= (s.max_steps or t)] if s.steps else [budgets[0]]
        rows += [(s, t) for t in ts if (s.sampler, s.options, t) != (reference.sampler, {}, REFERENCE_T)]
    return rows


def key(name: str, steps) -> str:
    return f"{name} @ {steps}"


def draw(model, setting: Setting, steps: int, num: int, seed: int, grid: str, prompt=None) -> tuple[torch.Tensor, dict]:
    """`num` samples with one setting: (x [num, N], {"calls", "calls_per_sample", "seconds"})."""
    counted = Counting(model.denoiser())
    extra = {"options": setting.options} if setting.options else {}
    if prompt is not None:
        extra.update(known=prompt[0], known_mask=prompt[1])
    t0 = time.perf_counter()
    x = sampling.sample(model.method, counted, num, model.length, steps=steps, grid=grid, sampler=setting.sampler,
                        generator=torch.Generator(model.device).manual_seed(seed), device=model.device, **extra)
    seconds = time.perf_counter() - t0
    return x, {"calls": counted.calls, "calls_per_sample": counted.rows / num, "seconds": seconds}


def within(r: dict, ref: dict, metric: str = "judge_bits_per_char") -> bool:
    """|r - ref| <= the standard error of the difference (independent SEs combined)."""
    return abs(r[metric] - ref[metric]) <= math.hypot(r[metric + "_se"], ref[metric + "_se"])


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r.get("reference")), None)
    head = ["setting", "sampler", "T", "calls/sample", "batch calls", "wall s", "judge bits/char", "~ref", "MAUVE",
            "entropy bits"] + [f"distinct-{n}" for n in DISTINCT_N]
    body = [[r["setting"] + (" (reference)" if r.get("reference") else ""), r["sampler"], r["steps"],
             f"{r['calls_per_sample']:.1f}" if "calls" in r else "-", r.get("calls", "-"),
             f"{r['seconds']:.1f}" if "seconds" in r else "-", pm(r, "judge_bits_per_char"),
             ("yes" if within(r, ref) else "no") if ref and "calls" in r and not r.get("reference") else "",
             pm(r, "mauve"), pm(r, "entropy_bits")] + [pm(r, f"distinct_{n}") for n in DISTINCT_N] for r in rows]
    return markdown_table(head, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Four panels against calls per sample (log scale): judge bits/char, MAUVE, entropy, distinct-4;
    one line per setting with SE bars; the reference and the data as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator, ScalarFormatter

    metrics = [("judge_bits_per_char", "judge bits/char (lower is better)"), ("mauve", "MAUVE"),
               ("entropy_bits", "unigram entropy (bits)"), ("distinct_4", "distinct-4")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    settings = list(dict.fromkeys(r["setting"] for r in rows if "calls" in r and not r.get("reference")))
    xs = sorted(r["calls_per_sample"] for r in rows if "calls" in r)
    for ax, (metric, label) in zip(axes.flat, metrics):
        for i, name in enumerate(settings):
            pts = sorted((r["calls_per_sample"], r[metric], r[metric + "_se"]) for r in rows
                         if r["setting"] == name and not r.get("reference") and metric in r)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, label=name,
                            ls="-" if len(pts) > 1 else "none", color=plt.cm.tab20(i % 20))
        for r, style in ((next((r for r in rows if r.get("reference")), None), "--"),
                         (next((r for r in rows if r["setting"] == "data"), None), ":")):
            if r and metric in r:
                ax.axhline(r[metric], ls=style, color="k", lw=1,
                           label=f"ancestral T={REFERENCE_T}" if style == "--" else "real text")
                ax.axhspan(r[metric] - r[metric + "_se"], r[metric] + r[metric + "_se"], color="k", alpha=0.07)
                if "calls" in r:  # the reference at its own cost
                    ax.plot(r["calls_per_sample"], r[metric], "k*", ms=9)
        ax.set_xscale("log")
        ax.set_xticks([b for b in (2, 4, *BUDGETS) if min(xs) / 1.5 <= b <= max(xs) * 1.5] or xs[:1])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("network calls per sample")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None, judge=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="run or model folder (a masked diffusion model with a test split)")
    p.add_argument("--num", type=int, default=32, help="samples per row (one batch)")
    p.add_argument("--out", default=None, help="folder for frontier.json, .md and .png (default PATH/frontier)")
    p.add_argument("--judge", default="smollm2", help="judge LM and featurizer (md4.judge.Judge.load)")
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="steps T to run")
    p.add_argument("--settings", nargs="+", help="run only these settings (names in SETTINGS)")
    p.add_argument("--grid", default=None, help="time grid (default: the model's config)")
    p.add_argument("--prompt-len", type=int, default=0, help="condition on the first K tokens of --num test chunks "
                                                               "(other chunks than MAUVE's reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--boot", type=int, default=50, help="MAUVE bootstrap replicates")
    p.add_argument("--tiny", action="store_true", help="budgets 4 and 8, 4 samples (a smoke run)")
    args = p.parse_args(argv)
    if args.tiny:
        args.budgets, args.num, args.boot = [4, 8], min(args.num, 4), 5
    torch.set_num_threads(args.threads)
    out = Path(args.out or Path(args.path) / "frontier")
    out.mkdir(parents=True, exist_ok=True)
    model = md4.load(args.path, device=args.device)
    grid = args.grid or model.config.sample.grid
    if judge is None:
        from md4.judge import Judge

        judge = Judge.load(args.judge, device=args.device)
    names = {s.name for s in SETTINGS}
    if args.settings and set(args.settings) - names:
        p.error(f"unknown settings {sorted(set(args.settings) - names)}; choose among {sorted(names)}")
    settings = [s for s in SETTINGS if not args.settings or s.name in args.settings]
    todo = plan(settings, tuple(sorted(args.budgets)), model.method, sampling.ignores_time(model.net))

    real = reference_chunks(model, 2 * args.num, args.seed)  # MAUVE's reference, then the data row / prompts
    if len(real) < 2 * args.num:
        p.error(f"the test split has {len(real)} chunks of {model.length} tokens; --num {args.num} needs {2 * args.num}")
    reference = judge.features(model.decode(real[:args.num])).numpy()
    prompt = None
    if args.prompt_len:
        known_mask = torch.zeros(model.length, dtype=torch.bool)
        known_mask[:args.prompt_len] = True
        prompt = (real[args.num:].to(model.device), known_mask.expand(args.num, -1).to(model.device))

    def score(x) -> dict:
        return text_quality(judge, model.decode(x), x.cpu(), reference, seed=args.seed, boot=args.boot)

    saved = out / "frontier.json"  # the machine (threads, device) is recorded per row
    state = json.loads(saved.read_text()) if saved.is_file() else {}
    meta = {"model": str(model.source), "num": args.num, "length": model.length, "grid": grid, "seed": args.seed,
            "judge": judge.name, "featurizer": judge.feature_name, "prompt_len": args.prompt_len, "boot": args.boot}
    # rows of an earlier sitting count only when they were drawn and scored the same way
    done = {key(r["setting"], r["steps"]): r for r in state.get("rows", [])} if state.get("meta") == meta else {}
    if DATA not in done:
        x = real[args.num:]
        done[DATA] = {"setting": "data", "sampler": "-", "steps": "-", "num": args.num, **score(x)}
    for setting, steps in todo:
        k = key(setting.name, steps if setting.steps else "-")
        if k not in done:
            x, cost = draw(model, setting, steps, args.num, args.seed, grid, prompt)
            cost.update(threads=args.threads, device=args.device)
            done[k] = {"setting": setting.name, "sampler": setting.sampler, "options": setting.options,
                       "steps": steps if setting.steps else "-", "num": args.num,
                       "reference": steps == REFERENCE_T and setting.name == "ancestral", **cost, **score(x)}
            print(f"{k}: {cost['calls_per_sample']:.1f} calls/sample, {cost['seconds']:.1f} s, judge bits/char "
                  f"{pm(done[k], 'judge_bits_per_char')}, MAUVE {pm(done[k], 'mauve')}", file=sys.stderr, flush=True)
            saved.write_text(json.dumps({"meta": meta, "rows": list(done.values())}, indent=1))
    # the table and the plot show every row drawn the same way, this sitting's and earlier ones'
    order = {s.name: i for i, s in enumerate(SETTINGS)}
    rows = sorted((r for k, r in done.items() if k != DATA),
                  key=lambda r: (not r.get("reference"), order.get(r["setting"], len(order)),
                                 r["steps"] if isinstance(r["steps"], int) else math.inf))
    rows.append(done[DATA])
    saved.write_text(json.dumps({"meta": meta, "rows": list(done.values())}, indent=1))
    prompted = f", the first {args.prompt_len} given (test text)" if args.prompt_len else ""
    title = (f"{model.source}: {args.num} samples of {model.length} tokens per row{prompted}, {grid} grid, seed "
             f"{args.seed}; judge and MAUVE featurizer {judge.feature_name}")
    text = f"{title}\n\n{table(rows)}\n"
    (out / "frontier.md").write_text(text)
    plot(rows, out / "frontier.png", title)
    print(text)
    print(f"written: {out / 'frontier.md'}, {out / 'frontier.png'}, {saved}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
