"""The `md4` command: train, eval, sample, demo. User errors print one sentence and exit 2."""

from __future__ import annotations

import argparse
import json
import os
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
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"model saved to {model_dir}")


def evaluate_model(model, split: str = "valid", data: str | None = None, mc_samples: int = 1,
                   timesteps: int = 0, batch_size: int = 32, limit: int = 0, seed: int = 0,
                   progress: bool = True) -> dict:
    """Evaluate a loaded model on a split of its corpus (or of `data`): a summary dict."""
    from md4.data import eval_chunks, load_corpus
    from md4.evaluate import sequence_nelbo, summarize

    corpus = load_corpus(data or model.config.data.corpus, min_length=model.length)
    chunks = eval_chunks(corpus.split(split), model.length)
    if limit > 0:
        chunks = chunks[:limit]
    nelbo = sequence_nelbo(model.diffusion, model.net, chunks, mc_samples=mc_samples, batch_size=batch_size,
                           timesteps=timesteps, seed=seed, device=model.device, progress=progress)
    return {"model": str(model.source), "corpus": corpus.name, "split": split, "mc_samples": mc_samples,
            "timesteps": timesteps, **summarize(nelbo, model.length)}


def format_eval(r: dict) -> str:
    bound = "continuous time" if not r["timesteps"] else f"T={r['timesteps']}"
    return (f"{r['corpus']} {r['split']}: {r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f} bits/token "
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
    t0 = time.time()
    x = model.sample(args.num, steps=args.steps, grid=args.grid, length=args.length, seed=args.seed, progress=True)
    texts = model.decode(x)
    if args.json:
        print(json.dumps({"samples": texts, "seconds": time.time() - t0}))
    else:
        for i, s in enumerate(texts):
            print(f"--- sample {i} ---\n{s}")


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
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="train the demo model on the embedded corpus, evaluate it and sample")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--samples", type=int, default=3)
    d.add_argument("--eval-sequences", type=int, default=0, help="validation sequences to evaluate (0 = all)")
    d.set_defaults(fn=cmd_demo)
    add_data_parser(sub)
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
