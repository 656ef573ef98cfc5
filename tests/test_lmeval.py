"""Text log-likelihood bounds and generation (md4.textlm) and the lm-evaluation-harness adapter (md4.lmeval).

The adapter tests run the harness on local task YAMLs over local JSONL files (its hub datasets
are not reachable) in a fresh process, and are skipped when lm_eval is not installed."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import md4
from md4 import textlm
from md4.data import CharTokenizer, eval_chunks, normalize_text8
from md4.diffusion import MD4
from md4.errors import UserError
from md4.evaluate import sequence_nelbo

from conftest import english_like


@pytest.fixture(scope="module")
def model(trained_run):
    return md4.load(trained_run)


def text_of(n: int, seed: int = 0) -> str:
    """A normalized text of exactly n characters, without a space at either end."""
    t = normalize_text8(english_like(4 * n, seed))[:n]
    return t[:-1] + "a" if t.endswith(" ") else t


@pytest.mark.parametrize("length, start, size, expected", [
    (10, 0, 4, [(0, 4, 0), (4, 8, 4), (6, 10, 8)]),  # the harness's rolling windows
    (3, 0, 4, [(0, 3, 0)]),
    (6, 4, 4, [(2, 6, 4)]),  # context cut on the left
    (12, 2, 4, [(0, 4, 2), (4, 8, 4), (8, 12, 8)]),
    (20, 10, 4, [(8, 12, 10), (12, 16, 12), (16, 20, 16)]),  # long context and continuation: half a window of context
    (5, 5, 4, []),
])
def test_windows(length, start, size, expected):
    assert textlm.windows(length, start, size) == expected


def test_windows_score_each_position_once():
    rng = random.Random(0)
    for _ in range(300):
        size, start = rng.randint(1, 9), rng.randint(0, 30)
        length = start + rng.randint(0, 40)
        scored = []
        for lo, hi, first in textlm.windows(length, start, size):
            assert 0 <= lo <= first < hi <= length and hi - lo <= size
            scored += range(first, hi)
        assert scored == list(range(start, length))


@pytest.mark.parametrize("ctx, cont", [("the man said that it", " was not"), ("xq zv", " was not"),
                                       ("", "the man said that it was not")])
def test_nelbo_known_positions_exact_at_one_step(model, ctx, cont):
    """With T = 1 the conditional bound is w sum_{n in continuation} -log mu_n(context, masks) + the
    reconstruction term of the continuation: t = 1, where each position is masked but with
    probability alpha_1 = eps (none is kept for this seed), w = (alpha_0 - alpha_1) / (1 - alpha_1)."""
    assert model.config.schedule == "linear"
    got = textlm.loglikelihoods(model, [(ctx, cont)], timesteps=1)[0]
    ids = torch.tensor(CharTokenizer().encode(ctx + cont)).long()[None]
    x = ids.clone()
    x[:, len(ctx):] = model.method.mask_id
    logp = torch.log_softmax(model.net(x, torch.ones(1)).float(), -1)[0]  # float32, as masked_cross_entropy
    a0, a1 = (model.method.schedule.alpha(torch.tensor(v)).item() for v in (0.0, 1.0))
    want = (a0 - a1) / (1 - a1) * sum(logp[n, ids[0, n]].item() for n in range(len(ctx), ids.shape[1]))
    want -= len(cont) * (1 - a0) * math.log(27)
    assert got == pytest.approx(want, rel=1e-6)


def test_rolling_equals_md4_nelbo_of_the_chunks(model):
    """A text of 3 model lengths: the rolling bound is -(sum of md4's own per-chunk NELBOs), same seed and draws."""
    N = model.length
    text = text_of(3 * N, seed=5)
    got = textlm.loglikelihoods(model, [("", text)], mc_samples=4, seed=3)[0]
    chunks = eval_chunks(torch.tensor(CharTokenizer().encode(text)), N)
    want = -sequence_nelbo(model.method, model.net, chunks, mc_samples=4, seed=3).sum().item()
    assert got == pytest.approx(want, rel=1e-9)
    # the text is normalized as the training data was: case and punctuation do not change the number
    assert textlm.loglikelihoods(model, [("", text.upper().replace(" ", ", "))], mc_samples=4, seed=3)[0] == \
        pytest.approx(want, rel=1e-9)


def test_split_ids_keeps_the_boundary_space(model):
    tok = CharTokenizer()
    ctx, cont = textlm.split_ids(model, "Hello, ", "World!")
    assert tok.decode(ctx) == "hello" and tok.decode(cont) == " world"


def test_greedy_verdict(model):
    ctx = "the man said that it"
    x = torch.tensor(CharTokenizer().encode(ctx + "    ")).long()[None]
    x[:, len(ctx):] = model.method.mask_id
    best = model.net(x, torch.ones(1)).argmax(-1)[0, len(ctx):]
    cont = CharTokenizer().decode(best)
    other = CharTokenizer().decode((best + 1) % 27)
    (_, g1), (_, g2) = textlm.loglikelihoods(model, [(ctx, cont), (ctx, other)], with_greedy=True)
    assert (g1, g2) == (True, False)


def test_generate_keeps_prompt_and_stops(model):
    out = textlm.generate(model, ["the man said", "the man said"], until=[], max_tokens=10, steps=8, seed=1)
    assert out[0] == out[1] and len(out[0]) == 10 and set(out[0]) <= set(CharTokenizer.alphabet)
    stopped = textlm.generate(model, ["the man said"], until=[out[0][3:5]], max_tokens=10, steps=8, seed=1)[0]
    assert stopped == textlm.cut(out[0], [out[0][3:5]]) and len(stopped) <= 3
    assert textlm.cut("abc def\nghi", ["\n", " "]) == "abc"
    with pytest.raises(UserError, match="at least 1"):
        textlm.generate(model, ["x"], max_tokens=0)


def test_refuses_what_it_cannot_score(model):
    with pytest.raises(UserError, match="mc_samples must be at least 1"):
        textlm.loglikelihoods(model, [("a", "b")], mc_samples=0)
    assert isinstance(model.method, MD4)


HARNESS_SCRIPT = r"""
import json, sys
import lm_eval
import md4.lmeval  # registers the model type "md4"
from lm_eval.tasks import TaskManager

run, tasks_dir = sys.argv[1], sys.argv[2]
r = lm_eval.simple_evaluate(model="md4", model_args=f"pretrained={run},mc_samples=4,seed=3,batch_size=8",
                            tasks=["md4_rolling", "md4_choice", "md4_gen"], task_manager=TaskManager(include_path=tasks_dir),
                            log_samples=True)
out = {t: [s["resps"] for s in r["samples"][t]] for t in r["samples"]}
out["args"] = {t: [s["arguments"] for s in r["samples"][t]] for t in r["samples"]}
out["acc"] = r["results"]["md4_choice"]["acc,none"]
print("\nRESULT " + json.dumps(out))
"""


def write_tasks(folder: Path, rolling_text: str) -> None:
    """Three harness tasks over local JSONL files: rolling log-likelihood, multiple choice, generation."""
    folder.mkdir()
    (folder / "rolling.jsonl").write_text(json.dumps({"text": rolling_text}) + "\n")
    docs = [{"text": "the man said that it", "choices": [" was not", " xqzv qj"], "label": 0},
            {"text": "and they were", "choices": [" zzzz", " in the"], "label": 1}]
    (folder / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def task(name: str, data: str, **keys) -> None:
        spec = {"task": name, "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(folder / data)}}, **keys}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))

    task("md4_rolling", "rolling.jsonl", output_type="loglikelihood_rolling", doc_to_text="",
         doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
    task("md4_choice", "choice.jsonl", output_type="multiple_choice", doc_to_text="{{text}}",
         doc_to_choice="{{choices}}", doc_to_target="{{label}}", target_delimiter="", metric_list=[{"metric": "acc"}])
    task("md4_gen", "choice.jsonl", output_type="generate_until", doc_to_text="{{text}}", doc_to_target="{{label}}",
         generation_kwargs={"until": ["q"], "max_gen_toks": 12, "do_sample": False},
         metric_list=[{"metric": "exact_match"}])


def test_harness_on_local_tasks(trained_run, model, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'md4[lmeval]', ~600 MB)")
    N = model.length
    text = text_of(2 * N, seed=7)
    write_tasks(tmp_path / "tasks", text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", HARNESS_SCRIPT, str(trained_run), str(tmp_path / "tasks")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ")[-1])
    # rolling: md4's own NELBO of the two chunks, same seed and draws
    chunks = eval_chunks(torch.tensor(CharTokenizer().encode(text)), N)
    want = -sequence_nelbo(model.method, model.net, chunks, mc_samples=4, seed=3, batch_size=8).sum().item()
    assert out["md4_rolling"][0][0][0] == pytest.approx(want, rel=1e-6)
    # multiple choice: the harness's requests, scored by md4.textlm in the same order, give its numbers
    pairs = [tuple(a) for a in out["args"]["md4_choice"]]
    flat = [x for a in pairs for x in ([a] if isinstance(a[0], str) else a)]
    scores = textlm.loglikelihoods(model, flat, mc_samples=4, seed=3, batch_size=8, with_greedy=True)
    got = [r[0] for s in out["md4_choice"] for r in s]  # per request: [[loglikelihood, is_greedy]]
    assert [g[0] for g in got] == pytest.approx([s[0] for s in scores], rel=1e-6)
    assert [g[1] for g in got] == [s[1] for s in scores]
    acc = sum(scores[2 * i + d["label"]][0] > scores[2 * i + 1 - d["label"]][0]
              for i, d in enumerate([{"label": 0}, {"label": 1}])) / 2
    assert out["acc"] == acc
    # generation: greedy (do_sample: false), 12 tokens after the prompt, cut at a "q"
    gens = [s[0][0] for s in out["md4_gen"]]
    assert gens == textlm.generate(model, ["the man said that it", "and they were"], until=["q"], max_tokens=12,
                                   temperature=0.0, seed=3)
    assert all("q" not in g and len(g) <= 12 for g in gens) and len(gens[0] + gens[1]) > 0
