"""Evaluation: the NELBO of held-out sequences with honest error bars, and the quality of samples.

Each sequence gets K Monte-Carlo draws of t, stratified within the sequence
(t_k = (u + k/K) mod 1 with its own u ~ U(0,1)), so sequences are independent and the standard
error across sequences is an honest one. Reported in bits per token (bpc for characters) =
NELBO / (N ln 2) and as perplexity exp(NELBO / N).

    r = evaluate_model(md4.load("runs/demo"), "test")      # a summary dict; format_eval(r) prints it
    q = sample_quality(model, Judge.load("smollm2"))       # generative perplexity of samples
    q = sample_quality(model, judge, reference=reference_features(model, judge))   # and their MAUVE

`md4 eval` and `md4 genppl` print these; benchmarks and notebooks call them directly.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from md4.data import check_labels, eval_chunks, load_corpus
from md4.data.records import real_tokens
from md4.data.zeroshot import ZERO_SHOT, eval_corpus
from md4.errors import UserError
from md4.guidance import with_labels
from md4.judge import DISTINCT_N, generative_perplexity
from md4.mauve import mauve


@torch.no_grad()
def sequence_nelbo(diffusion, denoiser, chunks: torch.Tensor, mc_samples: int = 1, batch_size: int = 32,
                   timesteps: int = 0, seed: int = 0, device=None, progress: bool = False,
                   autocast_dtype=None, labels: torch.Tensor | None = None,
                   known: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence NELBO in nats, averaged over `mc_samples` stratified draws of t: [M] float64.
    labels [M] long: class labels for a class-conditional network (its NELBO of x given y).
    known [M, N] bool: positions given, not scored (the bound on the others given them)."""
    device = torch.device(device or "cpu")
    g = torch.Generator(device).manual_seed(seed)
    out = []
    bar = tqdm(total=len(chunks) * mc_samples, desc="evaluating", unit="seq", disable=not progress, leave=False)
    def batches(rows):
        return rows.split(batch_size) if rows is not None else [None] * len(chunks.split(batch_size))

    for x0, y, kn in zip(chunks.split(batch_size), batches(labels), batches(known)):
        x0 = x0.to(device)
        net = with_labels(denoiser, None if y is None else y.to(device))
        u = torch.rand(len(x0), generator=g, device=device)
        total = torch.zeros(len(x0), dtype=torch.float64, device=device)
        for k in range(mc_samples):
            t = torch.remainder(u + k / mc_samples, 1.0)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                total += diffusion.nelbo(net, x0, timesteps=timesteps, generator=g, t=t,
                                         known=None if kn is None else kn.to(device)).double()
            bar.update(len(x0))
        out.append((total / mc_samples).cpu())
    bar.close()
    return torch.cat(out)


def summarize(nelbo: torch.Tensor, length: int) -> dict:
    """Mean and standard error of per-sequence NELBOs [M] (nats) in bits per token and perplexity."""
    m = len(nelbo)
    mean = nelbo.mean().item()
    se = nelbo.std().item() / math.sqrt(m) if m > 1 else float("nan")
    per_tok = length * math.log(2)
    return {
        "sequences": m,
        "length": length,
        "nats_per_sequence": mean,
        "bits_per_token": mean / per_tok,
        "bits_per_token_se": se / per_tok,
        "perplexity": math.exp(mean / length) if mean / length < 709.78 else math.inf,  # beyond: a float overflows
    }


def record_summary(nelbo: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per record and per real token, with standard errors: nelbo [M] nats, tokens [M] (L + 1).

    Per token is the ratio R = sum nelbo / sum tokens (bits per real token); its SE is the
    delta method's sqrt(var(nelbo_i - R tokens_i) / M) / mean(tokens)."""
    m = len(nelbo)
    ratio = (nelbo.sum() / tokens.sum()).item()
    se = lambda v: v.std().item() / math.sqrt(m) if m > 1 else float("nan")
    ln2 = math.log(2)
    return {"records": m, "mean_record_tokens": tokens.mean().item(),
            "nats_per_record": nelbo.mean().item(), "nats_per_record_se": se(nelbo),
            "bits_per_record": nelbo.mean().item() / ln2, "bits_per_record_se": se(nelbo) / ln2,
            "bits_per_real_token": ratio / ln2,
            "bits_per_real_token_se": se(nelbo - ratio * tokens) / tokens.mean().item() / ln2}


# ----------------------------------------------------------------------------- a loaded model
def evaluate_model(model, split: str | None = "valid", data: str | None = None, mc_samples: int = 1,
                   timesteps: int = 0, batch_size: int = 32, limit: int = 0, seed: int = 0,
                   progress: bool = True) -> dict:
    """Evaluate a loaded model on a split of its corpus (or of `data`: a corpus, a text file or a
    zero-shot set, whose test split is used; text is tokenized as the model reads it, see
    md4.data.zeroshot): a summary dict. split=None means valid, or test
    for a zero-shot set."""
    if data in ZERO_SHOT:
        if split not in (None, "test"):
            raise UserError(f"Zero-shot sets are evaluated on their test split only; drop --split {split}.")
        split = "test"
    corpus = eval_corpus(data or model.config.data.corpus, model.tokenizer, min_length=model.length)  # its tokens
    split = split or "valid"
    model.check_corpus(corpus)
    chunks = eval_chunks(corpus.split(split), model.length)
    labels = check_labels(corpus, split, model.config.model.num_classes)  # conditional models: -log p(x | y)
    if limit > 0:
        chunks = chunks[:limit]
        labels = labels[:limit] if labels is not None else None
    exact = model.method.exact_likelihood
    mc_samples, timesteps = bound_options(model, mc_samples, timesteps)
    nelbo = sequence_nelbo(model.method, model.net, chunks, mc_samples=mc_samples, batch_size=batch_size,
                           timesteps=timesteps, seed=seed, device=model.device, progress=progress, labels=labels)
    bad = int((~torch.isfinite(nelbo)).sum())
    if bad:
        raise UserError(f"The NELBO of model {model.source} is not finite on {bad} of {len(nelbo)} {corpus.name} "
                        f"sequences; its weights overflow or are damaged.")
    image = corpus.tokenizer.name == "image"  # bits per token = bits per dimension
    tokens = real_tokens(corpus.tokenizer, chunks)  # records: per record and per real token, not padding
    return {"model": str(model.source), "method": model.config.method, "corpus": corpus.name, "split": split,
            "mc_samples": mc_samples, "timesteps": timesteps, "bound": bound_name(timesteps, exact),
            "unit": "bits/dim" if image else "bits/token", "class_conditional": labels is not None,
            **summarize(nelbo, model.length), **(record_summary(nelbo, tokens) if tokens is not None else {})}


def bound_options(model, mc_samples: int, timesteps: int) -> tuple[int, int]:
    """(mc_samples, timesteps) to evaluate a loaded model with, checked: 1 and 0 for a method with
    an exact likelihood (one pass, no time); a UserError for a discrete-time bound of a method
    whose bound is in continuous time only."""
    if mc_samples < 1 or timesteps < 0:
        raise UserError(f"mc_samples must be at least 1 and timesteps at least 0, got {mc_samples} and {timesteps}.")
    if model.method.exact_likelihood:
        return 1, 0
    if timesteps and model.method.continuous_time_only:
        raise UserError(f"A {model.config.method} model has a continuous-time bound only; "
                        f"leave timesteps (--timesteps) at 0.")
    return mc_samples, timesteps


def bound_name(timesteps: int, exact: bool = False) -> str:
    """"exact" (AR), "continuous time" or "T=1000": which bound a NELBO is."""
    return "exact" if exact else "continuous time" if not timesteps else f"T={timesteps}"


def format_eval(r: dict) -> str:
    """One line for an evaluate_model result: bits per token ± SE, perplexity, bound, sizes."""
    bound = r.get("bound") or bound_name(r["timesteps"])
    what = "NLL exact" if bound == "exact" else f"NELBO {bound}"
    unit = r.get("unit", "bits/token") + (" given the class" if r.get("class_conditional") else "")
    records = (f"; {r['bits_per_record']:.3f} ± {r['bits_per_record_se']:.3f} bits per record (its length "
               f"included), {r['bits_per_real_token']:.4f} ± {r['bits_per_real_token_se']:.4f} bits per real token "
               f"(symbols and end, {r['mean_record_tokens']:.1f} per record)") if "bits_per_record" in r else ""
    return (f"{r['corpus']} {r['split']}: {r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f} {unit} "
            f"(perplexity {r['perplexity']:.3f}; {what}, {r['sequences']} sequences of {r['length']}, "
            f"{r['mc_samples']} draw(s) of t each){records}")


def eval_table(results: list[dict]) -> str:
    """One markdown row per evaluation: model, method, corpus, split, bits/token ± SE, ppl, #seqs, K, bound."""
    return markdown_table(["model", "method", "corpus", "split", "bits/token ± SE", "ppl", "#seqs", "K", "bound"], [
        [r["model"], r.get("method", ""), r["corpus"], r["split"],
         f"{r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f}", f"{r['perplexity']:.3f}", r["sequences"],
         r["mc_samples"], r.get("bound") or bound_name(r["timesteps"])] for r in results])


def markdown_table(header: list[str], rows: list[list]) -> str:
    """| a | b |, |---|---|, then one line per row."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


# ----------------------------------------------------------------------------- samples
def sample_quality(model, judge, num: int = 64, steps: int | None = None, grid: str | None = None, seed: int = 0,
                   batch_size: int = 16, progress: bool = True, reference=None) -> dict:
    """Draw `num` samples from a loaded model and score them with a loaded md4.judge.Judge; with
    `reference` (features of real text, `reference_features`) also their MAUVE against it."""
    t0 = time.time()
    x = model.sample(num, steps=steps, grid=grid, seed=seed, progress=progress)
    seconds = time.time() - t0
    r = text_quality(judge, model.decode(x), x.cpu(), reference, batch_size, seed, progress)
    exact = model.method.exact_likelihood
    steps, grid = model.schedule(steps, grid)
    return {"model": str(model.source), "method": model.config.method, "steps": model.length if exact else steps,
            "grid": "" if exact else grid, "sampling_seconds": seconds, **r}


def text_quality(judge, texts: list[str], ids=None, reference=None, batch_size: int = 16, seed: int = 0,
                 progress: bool = False, boot: int = 50) -> dict:
    """md4.judge.generative_perplexity of the texts and, given reference features [n_q, D], their
    MAUVE against them with the judge as featurizer (md4.mauve; k-means seeded `seed`; SE from
    `boot` bootstrap replicates)."""
    r = generative_perplexity(judge, texts, ids=ids, batch_size=batch_size, progress=progress)
    if reference is not None:
        m = mauve(judge.features(texts, batch_size, progress).numpy(), reference, seed=seed, boot=boot)
        r.update(mauve=m["mauve"], mauve_se=m["mauve_se"], mauve_clusters=m["clusters"], mauve_boot=m["boot"],
                 mauve_reference=len(reference), featurizer=judge.feature_name)
    return r


def reference_chunks(model, num: int, seed: int = 0, skip: int = 0) -> torch.Tensor:
    """Chunks skip .. skip + num - 1 of a random order (seeded) of the model's test split: [<= num, N]."""
    corpus = load_corpus(model.config.data.corpus, min_length=model.length)
    model.check_corpus(corpus)
    chunks = eval_chunks(corpus.test, model.length)
    return chunks[torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))[skip:skip + num]]


def reference_features(model, judge, num: int = 64, seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """The judge's features [<= num, D] of the first `num` reference chunks (MAUVE's real text)."""
    return judge.features(model.decode(reference_chunks(model, num, seed)), batch_size).numpy()


def reference_quality(model, judge, num: int = 64, batch_size: int = 16, seed: int = 0, reference=None) -> dict:
    """The same statistics for `num` random chunks of the model's test split (real text); with
    `reference` (the features of the first `num` chunks) the next `num` chunks are scored, so their
    MAUVE is that of real text against other real text at this size."""
    x = reference_chunks(model, num, seed, skip=num if reference is not None else 0)
    if not len(x):
        raise UserError(f"The test split of {model.config.data.corpus} has too few chunks of {model.length} "
                        f"tokens for two sets of {num}; lower --num.")
    r = text_quality(judge, model.decode(x), x, reference, batch_size, seed)
    return {"model": f"data ({model.config.data.corpus} test)", "method": "-", "steps": 0, "grid": "",
            "sampling_seconds": 0.0, **r}


def pm(r: dict, key: str, digits: int = 3) -> str:
    """"value ± SE" of r[key] and r[key + "_se"]; "-" when r has no key."""
    return f"{r[key]:.{digits}f} ± {r[key + '_se']:.{digits}f}" if key in r else "-"


def quality_table(results: list[dict]) -> str:
    """A markdown table of sample_quality / reference_quality results, one row each, under a line
    naming the judge and MAUVE's featurizer."""
    judges = sorted({r["judge"] for r in results})
    head = f"judge: {', '.join(judges)}"
    scored = [r for r in results if "mauve" in r]
    if scored:
        r = scored[0]
        head += (f"; MAUVE featurizer: {r['featurizer']}, {r['mauve_clusters']} clusters, against "
                 f"{r['mauve_reference']} test chunks, ± bootstrap SE ({r['mauve_boot']} replicates)")
    return head + "\n\n" + markdown_table(
        ["model", "method", "steps", "#samples", "gen ppl", "judge bits/char ± SE", "MAUVE ± SE",
         "unigram entropy (bits) ± SE"] + [f"distinct-{n} ± SE" for n in DISTINCT_N] + ["sampling s"],
        [[r["model"], r["method"], r["steps"] or "-", r["samples"], f"{r['gen_ppl']:.2f}",
          pm(r, "judge_bits_per_char"), pm(r, "mauve"), pm(r, "entropy_bits")]
         + [pm(r, f"distinct_{n}") for n in DISTINCT_N] + [f"{r['sampling_seconds']:.1f}"] for r in results])
