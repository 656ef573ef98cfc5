"""The `md4` command: train, eval, sample, demo. User errors print one sentence and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from md4.errors import UserError


def _torch_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def cmd_train(args) -> None:
    from md4.config import load_config
    from md4.train import train

    cfg = load_config(args.config, args.set)
    model_dir = train(cfg, args.out, progress=not args.quiet)
    print(f"model saved to {model_dir}")


def evaluate_model(model, split: str = "valid", data: str | None = None, mc_samples: int = 1,
                   timesteps: int = 0, batch_size: int = 32, limit: int = 0, seed: int = 0,
                   progress: bool = True) -> dict:
    """Evaluate a loaded model on a split of its corpus (or of `data`): a summary dict."""
    from md4.data import eval_chunks, load_corpus
    from md4.evaluate import sequence_nelbo, summarize
    from md4.pretrained import check_labels

    corpus = load_corpus(data or model.config.data.corpus, min_length=model.length)
    chunks = eval_chunks(corpus.split(split), model.length)
    labels = check_labels(corpus, split, model.config.model.num_classes)  # conditional models: -log p(x | y)
    if limit > 0:
        chunks = chunks[:limit]
        labels = labels[:limit] if labels is not None else None
    nelbo = sequence_nelbo(model.diffusion, model.net, chunks, mc_samples=mc_samples, batch_size=batch_size,
                           timesteps=timesteps, seed=seed, device=model.device, progress=progress, labels=labels)
    image = getattr(corpus.tokenizer, "name", "") == "image"  # bits per token = bits per dimension
    return {"model": str(model.source), "corpus": corpus.name, "split": split, "mc_samples": mc_samples,
            "timesteps": timesteps, "unit": "bits/dim" if image else "bits/token",
            "class_conditional": labels is not None, **summarize(nelbo, model.length)}


def format_eval(r: dict) -> str:
    bound = "continuous time" if not r["timesteps"] else f"T={r['timesteps']}"
    unit = r.get("unit", "bits/token") + (" given the class" if r.get("class_conditional") else "")
    return (f"{r['corpus']} {r['split']}: {r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f} {unit} "
            f"(perplexity {r['perplexity']:.3f}; NELBO {bound}, {r['sequences']} sequences of {r['length']}, "
            f"{r['mc_samples']} draw(s) of t each)")


def cmd_eval(args) -> None:
    import md4

    _torch_threads(args.threads)
    for mc, name in ((args.mc_samples, "--mc-samples"), (args.batch_size, "--batch-size")):
        if mc < 1:
            raise UserError(f"{name} must be at least 1, got {mc}.")
    if args.timesteps < 0:
        raise UserError(f"--timesteps must be 0 (continuous time) or a positive number of steps, got {args.timesteps}.")
    model = md4.load(args.path, device=args.device)
    r = evaluate_model(model, args.split, args.data, args.mc_samples, args.timesteps, args.batch_size,
                       args.limit, args.seed, progress=not args.json)
    print(json.dumps(r) if args.json else format_eval(r))


def cmd_sample(args) -> None:
    import md4

    _torch_threads(args.threads)
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}.")
    model = md4.load(args.path, device=args.device)
    labels = parse_label(args.label, args.num, model.num_classes)
    if getattr(model.tokenizer, "name", "") == "image":
        return sample_images(model, args, labels)
    if args.out or args.trace or args.inpaint:
        raise UserError("--out, --trace and --inpaint write pictures and need an image model.")
    t0 = time.time()
    x = model.sample(args.num, steps=args.steps, grid=args.grid, length=args.length, seed=args.seed, progress=True,
                     labels=labels, guidance=args.guidance)
    texts = model.decode(x)
    if args.json:
        print(json.dumps({"samples": texts, "seconds": time.time() - t0}))
    else:
        for i, s in enumerate(texts):
            print(f"--- sample {i} ---\n{s}")


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
    if args.inpaint:
        corpus = load_corpus(model.config.data.corpus)
        test = torch_rows(corpus.test, args.num, args.seed)
        y = check_labels(corpus, "test", model.num_classes)
        y = y[test[1]] if y is not None else None
        r = pictures.inpaint(model, test[0], args.inpaint, args.region, labels=y, guidance_weight=args.guidance,
                             steps=args.steps, grid=args.grid, seed=args.seed)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="md4", description="Masked diffusion models (MD4) for discrete data.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (resumes a run folder that has a checkpoint)")
    t.add_argument("--config", default="demo", help="preset name (tiny, demo, text8) or path to a YAML file")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. model.layers=4")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    def model_args(q):
        q.add_argument("path", help="run folder or model folder (config.json + model.safetensors)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
        q.add_argument("--json", action="store_true", help="print JSON")

    e = sub.add_parser("eval", help="NELBO of held-out data: bits per token ± standard error, perplexity")
    model_args(e)
    e.add_argument("--split", default="valid", choices=["valid", "test", "train"])
    e.add_argument("--data", help="another corpus name or text file (zero-shot)")
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
    s.add_argument("--label", default=None, help="class-conditional models: a class number, or 'all' to cycle")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (0 = none)")
    s.add_argument("--out", default=None, help="image models: PNG grid of samples (default samples.png)")
    s.add_argument("--trace", default=None, help="image models: PNG strip of pixels being revealed, one row per sample")
    s.add_argument("--inpaint", default=None, help="image models: PNG of test images, masked inputs and completions")
    s.add_argument("--region", default="center", help="region to inpaint: center, top, bottom, left, right")
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="train the demo model on the embedded corpus, evaluate it and sample")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--samples", type=int, default=3)
    d.add_argument("--eval-sequences", type=int, default=0, help="validation sequences to evaluate (0 = all)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"md4: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("md4: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
