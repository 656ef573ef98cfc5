"""What each `md4` subcommand does with its parsed options (md4.cli parses them): thin handlers
that call the library (md4.load, md4.train, md4.evaluate, md4.pictures, ...) and print the result.
User errors are md4.errors.UserError; md4.cli turns them into one sentence and exit status 2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from md4.errors import UserError
from md4.validate import check


def torch_threads(n: int) -> None:
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


def cmd_eval(args) -> None:
    import md4
    from md4.evaluate import eval_table, evaluate_model, format_eval

    torch_threads(args.threads)
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


# `md4 sample` flags of the samplers' options (md4.sampling.sampler_options), in `options`
SAMPLER_FLAGS = ("--order", "--threshold", "--remask", "--eta", "--t-on", "--t-off", "--alpha-on")
# `md4 sample` options that only one kind of model uses: given to the other kind, they are refused
TEXT_OPTIONS = ("--prompt", "--infill", "--length", "--sampler", "--temperature", "--top-k", "--top-p", "--block",
                "--judge") + SAMPLER_FLAGS
IMAGE_OPTIONS = ("--out", "--inpaint", "--region")
MASKED_OPTIONS = ("--sampler", "--temperature", "--top-k", "--top-p", "--block", "--prompt", "--infill", "--trace",
                  "--guidance") + SAMPLER_FLAGS


def check_counts(args, **lowest) -> None:
    """Each named option, when given (not None), a whole number >= its lowest value; else a
    UserError naming the flag."""
    for name, lo in lowest.items():
        value = getattr(args, name)
        if value is not None:
            check(value, int, "--" + name.replace("_", "-"), lo=lo)


def given(args, flags) -> list[str]:
    """The flags among `flags` whose values differ from the command's defaults (`args.options`:
    the subcommand's parser, md4.cli)."""
    dest = [flag[2:].replace("-", "_") for flag in flags]
    return [flag for flag, d in zip(flags, dest) if getattr(args, d) != args.options.get_default(d)]


def only_for(flags: list[str]) -> str:
    """"--top-k applies" or "--top-k, --block apply": the start of a refusal."""
    return f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'}"


def cmd_sample(args) -> None:
    import md4

    torch_threads(args.threads)
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


def cmd_genppl(args) -> None:
    import md4
    from md4.evaluate import quality_table, reference_quality, sample_quality
    from md4.judge import Judge

    torch_threads(args.threads)
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
    from md4.sampling import check_options, check_sampler
    from md4.trace import Recorder, check_path

    if not model.method.reverse_process:  # e.g. the AR baseline: its own sampler, no options
        asked = given(args, MASKED_OPTIONS)
        if asked:
            raise UserError(f"{only_for(asked)} to masked diffusion models, not to {model.config.method}.")
        return {}, None
    check_sampler(model.method, args.sampler, time_independent=not model.net.uses_time)  # before any work
    names = [flag[2:].replace("-", "_") for flag in given(args, SAMPLER_FLAGS)]
    options = {name: getattr(args, name) for name in names}
    kwargs = {"sampler": args.sampler, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
              "block": args.block, "options": check_options(args.sampler, options)}
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
    from md4.data import check_labels, load_corpus, random_rows

    t0 = time.time()
    report = {}
    if args.region is not None and not args.inpaint:
        raise UserError("--region applies with --inpaint; give both or neither.")
    if args.inpaint:
        corpus = load_corpus(model.config.data.corpus)
        model.check_corpus(corpus)
        test = random_rows(corpus.test, args.num, args.seed)
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


def cmd_demo(args) -> None:
    import md4
    from md4.config import load_config
    from md4.evaluate import evaluate_model, format_eval
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

    if args.records and args.table:
        raise UserError("Give either --records or --table, not both.")
    table_only = [] if args.table else given(args, ["--object", "--bins"])
    if table_only:
        raise UserError(f"{only_for(table_only)} to --table only.")
    if args.records:
        return cmd_prepare_records(args)
    if args.table:
        return cmd_prepare_table(args)
    meta = prepare(args.inputs, args.out, hf=args.hf, hf_split=args.hf_split, text_field=args.text_field,
                   valid=args.valid, test=args.test or 0.0, tokenizer=args.tokenizer, workers=args.workers,
                   piece_chars=args.piece_chars, shard_tokens=args.shard_tokens, max_documents=args.max_documents,
                   valid_docs=args.valid_docs)
    sizes = ", ".join(f"{s} {v['tokens']:,} tokens in {len(v['shards'])} shard(s)" for s, v in meta["splits"].items())
    print(f"{args.out}: {meta['characters']:,} characters -> {sizes} ({meta['seconds']:.1f} s); "
          f"train with --set data.corpus={args.out}")


def cmd_prepare_records(args) -> None:
    """`md4 data prepare --records`: files of records (or a source such as moses) -> a records folder."""
    from md4.data.records import describe, prepare_records

    text_only = given(args, ["--hf", "--valid-docs"])
    if text_only:
        raise UserError(f"{', '.join(text_only)} prepare{'s' * (len(text_only) == 1)} text corpora, not --records.")
    check_counts(args, max_length=0)
    valid, test = (0.05 if v is None else v for v in (args.valid, args.test))
    meta = prepare_records(args.inputs, args.out, field=args.field, symbols=args.symbols, max_length=args.max_length,
                           valid=valid, test=test)
    print(f"{args.out}: {describe(meta)}; train with --set data.corpus={args.out}")


def cmd_prepare_table(args) -> None:
    """`md4 data prepare FILE --table`: a CSV file or an R data frame -> a table folder."""
    from md4.data.tables import describe, prepare_table

    other = given(args, ["--hf", "--valid-docs", "--field", "--max-length"])
    if other:
        raise UserError(f"{', '.join(other)} prepare{'s' * (len(other) == 1)} other corpora, not --table.")
    if len(args.inputs) != 1:
        raise UserError(f"--table prepares one file, got {len(args.inputs)}.")
    check_counts(args, bins=2)
    valid, test = (0.05 if v is None else v for v in (args.valid, args.test))
    meta = prepare_table(args.inputs[0], args.out, name=args.object, bins=args.bins, valid=valid, test=test)
    print(f"{args.out}: {describe(meta)}; train with --set data.corpus={args.out} "
          f"--set data.length={len(meta['columns'])}")


def cmd_impute(args) -> None:
    """`md4 impute RUN --rows test|valid|FILE --hide F`: hide cells at random, fill them (and a
    file's missing cells) with the model, and report accuracy per column against the majority."""
    import torch

    import md4
    from md4.data.corpora import load_corpus
    from md4.data.tables import (TableTokenizer, format_report, hide_cells, impute_report, raw_cells, read_table,
                                 write_filled)

    torch_threads(args.threads)
    check_counts(args, draws=1, steps=1, limit=0)
    model = md4.load(args.path, device=args.device)
    tok = model.tokenizer
    if not isinstance(tok, TableTokenizer):
        raise UserError(f"{args.path} models {tok.name} tokens; md4 impute fills cells of table models.")
    corpus = load_corpus(model.config.data.corpus, min_length=model.length)
    model.check_corpus(corpus)
    if args.rows in ("train", "valid", "test"):
        rows, raw = torch.as_tensor(corpus.split(args.rows).astype("int64")), None
    else:
        names, columns = read_table(args.rows, args.object)
        rows = torch.as_tensor(tok.encode_table(names, columns, fill_missing=True))
        raw = raw_cells(names, columns, tok.names)
    if args.limit:
        rows = rows[: args.limit]
        raw = raw[: args.limit] if raw is not None else None
    if args.hide:
        hidden = hide_cells(rows, tok, args.hide, args.seed) & (rows != tok.mask_id)
    else:
        hidden = torch.zeros_like(rows, dtype=torch.bool)
    if not (hidden | (rows == tok.mask_id)).any():
        raise UserError("No cell to fill: the rows have no missing cell; hide some with --hide.")
    report, preds = impute_report(model, rows, hidden, corpus.train, draws=args.draws, steps=args.steps,
                                  seed=args.seed)
    if args.out:
        if raw is None:
            raise UserError("--out writes the filled rows of a file given with --rows FILE.")
        write_filled(args.out, tok, rows, preds[next(iter(preds))], raw)
    if report["hidden"]:
        print(json.dumps(report) if args.json else format_report(report, tok.names))
    else:
        print(f"filled {int((rows == tok.mask_id).sum())} missing cells of {len(rows)} rows"
              + (f"; written to {args.out}" if args.out else "; write them with --out"))


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


def cmd_push(args) -> None:
    from md4 import publish

    if args.out:
        print(f"model files and card written to {publish.stage(args.run, args.repo_id, args.out, args.license)}")
        return
    url = publish.push(args.run, args.repo_id, private=args.private, license=args.license, message=args.message)
    print(f"pushed to {url}")


def cmd_serve(args) -> None:
    from md4 import serve

    if not 0 <= args.port < 65536:
        raise UserError(f"--port must lie in 0..65535, got {args.port}.")
    serve.serve(args.path, host=args.host, port=args.port, device=args.device, max_steps=args.max_steps)
