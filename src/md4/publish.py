"""Publishing a trained model on the Hugging Face Hub: the repo files and a generated model card.

    md4 push runs/demo org/name [--private]     # config.json, model.safetensors, README.md
    md4 push runs/demo org/name --out card/     # the same three files written locally, no upload

The model card (README.md) has the Hub's YAML front matter (library_name, license, tags,
pipeline_tag), says what the model is, lists the numbers measured in the run (the last training
and validation NELBO of metrics.jsonl: upper bounds on the negative log-likelihood), shows how
to load it with md4 and gives the training config and the license. Uploads go through
huggingface_hub's HfApi (create_repo + upload_folder in one commit); its token applies.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from safetensors import safe_open

from md4 import checkpoint, hub
from md4.errors import UserError
from md4.build import METHODS
from md4.pretrained import model_folder

# Hub pipeline tag by md4 tokenizer
PIPELINES = {"char": "text-generation", "gpt2": "text-generation", "image": "unconditional-image-generation"}
TOKENIZERS = {"char": "characters: space and a-z (27 symbols, text8 normalization)",
              "gpt2": "GPT-2 BPE (50,257 tokens)", "image": "pixel intensities (256 levels per channel)"}


def parameter_count(weights: Path) -> int:
    """Number of network parameters in a model.safetensors (its "net.*" tensors), read from the header."""
    with safe_open(str(weights), "pt") as f:
        total = 0
        for key in f.keys():
            if key.startswith("net."):
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def run_numbers(folder: Path) -> dict:
    """The last logged values of the run that `folder` (a model folder) came from: step,
    loss_bpc, valid_bpc (with the step it was measured at), seconds; {} without metrics.jsonl."""
    path = folder.parent / "metrics.jsonl" if folder.name == "model" else folder / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for key in ("loss_bpc", "seconds"):
            if key in rec:
                out[key], out["step"] = rec[key], rec["step"]
        if "valid_bpc" in rec:
            out["valid_bpc"], out["valid_step"] = rec["valid_bpc"], rec["step"]
    return out


def model_card(meta: dict, repo_id: str, params: int, numbers: dict, license: str = "apache-2.0") -> str:
    """README.md for the Hub: YAML front matter, then markdown. meta = config.json's content."""
    cfg = meta.get("config", meta)
    method, tok = cfg.get("method", "md4"), meta.get("tokenizer", "char")
    image = tok == "image"
    unit = "bits/dim" if image else "bits/token"
    front = {"library_name": "md4", "license": license,
             "tags": ["md4", "masked-diffusion", "discrete-diffusion", method], "pipeline_tag": PIPELINES.get(tok)}
    m, d = cfg["model"], cfg["data"]
    lines = [f"---\n{yaml.safe_dump(front, sort_keys=False)}---", "", f"# {repo_id}", "",
             f"A {METHODS[method].description if method in METHODS else method} model trained with md4, a PyTorch library for masked diffusion.", "",
             "| | |", "|---|---|",
             f"| method | `{method}`, schedule `{cfg.get('schedule')}` |",
             f"| network | transformer: {m['layers']} layers, width {m['dim']}, {m['heads']} heads"
             f"{', time-conditioned' if m.get('time_cond') else ''}; {params:,} parameters |",
             f"| data | `{d['corpus']}`, sequences of {d['length']} tokens |",
             f"| tokens | {TOKENIZERS.get(tok, tok)} |"]
    if m.get("num_classes"):
        lines.append(f"| classes | {m['num_classes']} (class-conditional, classifier-free guidance) |")
    lines += ["", "## Numbers measured in the training run", ""]
    if numbers:
        lines += [f"| step | train NELBO ({unit}) | valid NELBO ({unit}, EMA weights) | training time |",
                  "|---|---|---|---|",
                  f"| {numbers.get('step', '-')} | {numbers.get('loss_bpc', float('nan')):.4f} | "
                  f"{numbers.get('valid_bpc', float('nan')):.4f} (step {numbers.get('valid_step', '-')}) | "
                  f"{numbers.get('seconds', 0) / 60:.1f} min |", "",
                  "Both are upper bounds on the negative log-likelihood (the NELBO" +
                  (", exact for the AR baseline" if method == "ar" else "") + "), one draw of t per sequence, "
                  f"on the first {cfg['train']['eval_batches'] * cfg['train']['batch_size']} validation "
                  f"sequences; `md4 eval {repo_id}` measures the whole split with error bars."]
    else:
        lines.append("No training metrics were found next to this model folder.")
    sample = (f"md4 sample {repo_id} --out samples.png" if image else f"md4 sample {repo_id} --num 4")
    lines += ["", "## Use", "", "```bash", 'pip install "md4[hub]"', sample, f"md4 eval {repo_id}", "```", "",
              "```python", "import md4", "", f'model = md4.load("{repo_id}")  # or "{repo_id}@REVISION"',
              "x = model.sample(4)                  # [4, length] token ids",
              "print(model.decode(x))" if not image else "# image models: md4.pictures.sample_grid(model, 16, 'grid.png')",
              "```", "", "Set `HF_HUB_OFFLINE=1` to load from the local cache only.", "",
              "## Training config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "",
              "## License", "", f"The weights are released under the `{license}` license (see the metadata above)."]
    return "\n".join(lines) + "\n"


def stage(run: str | Path, repo_id: str, dest: str | Path, license: str = "apache-2.0") -> Path:
    """Write the repo's files for the model of `run` (a run or model folder) into `dest`:
    config.json, model.safetensors (copies) and README.md (the model card). Returns dest."""
    if hub.parse_repo_id(repo_id) is None or "@" in repo_id:
        raise UserError(f"{repo_id!r} is not a Hub repo id; use the form org/name.")
    folder = model_folder(Path(run))
    meta = checkpoint.read_json(folder / "config.json")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in hub.MODEL_FILES:
        shutil.copyfile(folder / name, dest / name)
    card = model_card(meta, repo_id, parameter_count(folder / "model.safetensors"), run_numbers(folder), license)
    (dest / "README.md").write_text(card)
    return dest


def push(run: str | Path, repo_id: str, private: bool = False, license: str = "apache-2.0",
         message: str | None = None) -> str:
    """Create the Hub repo `repo_id` when missing (private if asked) and upload the model of `run`
    with its model card in one commit; returns the commit URL."""
    try:
        from huggingface_hub import HfApi, errors
    except ImportError:
        raise UserError(f"Pushing to the Hugging Face Hub needs huggingface_hub; {hub.INSTALL}.")
    with tempfile.TemporaryDirectory(prefix="md4-push-") as tmp:
        files = stage(run, repo_id, tmp, license)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=files,
                                     commit_message=message or f"md4: upload {Path(run).name}")
        except errors.LocalTokenNotFoundError:
            raise UserError("No Hugging Face token: log in with `hf auth login` or set HF_TOKEN.")
        except errors.HfHubHTTPError as e:
            raise UserError(f"The Hub refused the upload to {repo_id}: {str(e).splitlines()[0]}.")
    return str(getattr(info, "commit_url", info))
