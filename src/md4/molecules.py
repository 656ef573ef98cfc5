"""Molecules as SMILES records: RDKit metrics of samples, and infilling around a fixed scaffold.

    m = molecule_metrics(samples, reference=train_smiles)
    # {"samples", "valid", "unique", "novel", "int_div", ... with standard errors}

Metrics (following MOSES, Polykovskiy et al. 2020, recomputed here with RDKit):
    valid     fraction of samples RDKit parses (binomial SE)
    unique    distinct canonical SMILES / valid samples
    novel     fraction of the distinct valid molecules whose canonical SMILES is not in the
              reference set (MOSES compares with its training SMILES as given; they are RDKit
              canonical; pass canonicalize_reference=True for a set that is not)
    int_div   internal diversity 1 - mean Tanimoto similarity over pairs i != j of the distinct
              valid molecules (Morgan fingerprints, radius 2, 1024 bits; MOSES's IntDiv1 also
              averages the diagonal, which lowers it by about 1/n)
    fcd       Frechet ChemNet Distance to the reference, only when the `fcd` package (which ships
              the ChemNet weights, 5 MB) is installed; otherwise reported as missing

RDKit is optional (pip install rdkit, a 32 MB wheel): without it `molecule_metrics` is a
UserError naming the package.

Scaffold infilling. A masked diffusion model keeps each position's index, so a scaffold is given
as a SMILES *template*: the scaffold's characters where they are, "_" for one character to
generate, and "*" for a gap of any length up to `max_gap` characters. `fill_template` expands
each "*" into every gap length in turn (the samples are spread evenly over the lengths, not
weighted by the model's probability of each length: the limitation of fixed positions), and the
record's end is fixed after the template. The scaffold survives in a sample when the sample's
molecule contains it as a substructure (`scaffold_kept`).
"""

from __future__ import annotations

import itertools
import math

from md4.errors import UserError


def rdkit():
    """The rdkit.Chem module, with RDKit's parse warnings silenced, or a UserError."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError:
        raise UserError("Molecule metrics need RDKit: pip install rdkit (or md4[molecules]).") from None
    RDLogger.DisableLog("rdApp.*")
    return Chem


def canonical(smiles: str) -> str | None:
    """RDKit's canonical SMILES, or None when the string is not a valid molecule (or is empty)."""
    Chem = rdkit()
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    return Chem.MolToSmiles(mol) if mol is not None and mol.GetNumAtoms() else None


def fingerprints(smiles: list[str]):
    """Morgan fingerprints (radius 2, 1024 bits) of valid SMILES."""
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    Chem = rdkit()
    return [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]


def internal_diversity(smiles: list[str]) -> float:
    """1 - mean Tanimoto similarity over the pairs i != j (nan for fewer than two molecules)."""
    from rdkit import DataStructs

    fps = fingerprints(smiles)
    if len(fps) < 2:
        return float("nan")
    total = sum(sum(DataStructs.BulkTanimotoSimilarity(fp, fps[i + 1:])) for i, fp in enumerate(fps[:-1]))
    return 1 - total / (len(fps) * (len(fps) - 1) / 2)


def frechet_chemnet(smiles: list[str], reference: list[str]) -> float | None:
    """FCD between two sets of valid SMILES when the `fcd` package is installed, else None."""
    try:
        from fcd import get_fcd
    except ImportError:
        return None
    return float(get_fcd(smiles, reference))


def _proportion(k: int, n: int) -> tuple[float, float]:
    p = k / n if n else float("nan")
    return p, math.sqrt(p * (1 - p) / n) if n else float("nan")


def molecule_metrics(samples: list[str], reference=None, canonicalize_reference: bool = False,
                     fcd_reference: list[str] | None = None) -> dict:
    """Validity, uniqueness, novelty against `reference` (an iterable of SMILES; None: not
    computed), internal diversity, and FCD against `fcd_reference` when possible."""
    canon = [canonical(s) for s in samples]
    valid = [c for c in canon if c is not None]
    distinct = sorted(set(valid))
    out = {"samples": len(samples)}
    out["valid"], out["valid_se"] = _proportion(len(valid), len(samples))
    out["unique"], out["unique_se"] = _proportion(len(distinct), len(valid))
    if reference is not None:
        ref = {canonical(r) for r in reference} if canonicalize_reference else set(reference)
        out["novel"], out["novel_se"] = _proportion(sum(c not in ref for c in distinct), len(distinct))
    out["int_div"] = internal_diversity(distinct)
    out["fcd"] = frechet_chemnet(valid, fcd_reference) if fcd_reference and valid else None
    if fcd_reference and out["fcd"] is None:
        out["fcd_missing"] = "the fcd package (ChemNet weights) is not installed"
    return out


# ----------------------------------------------------------------------------- scaffolds
def expand_template(template: str, max_gap: int) -> list[str]:
    """Every pattern of `template` with each "*" replaced by 1..max_gap blanks "_"."""
    parts = template.split("*")
    if len(parts) == 1:
        return [template]
    if max_gap < 1:
        raise UserError("A template with '*' gaps needs max_gap of at least 1.")
    out = []
    for gaps in itertools.product(range(1, max_gap + 1), repeat=len(parts) - 1):
        out.append(parts[0] + "".join("_" * g + p for g, p in zip(gaps, parts[1:])))
    return out


def fill_template(model, template: str, num: int, max_gap: int = 6, steps: int | None = None,
                  seed: int = 0) -> list[str]:
    """`num` molecules completing the SMILES `template` ("_": one character, "*": a gap of
    1..max_gap characters) with a trained records model; patterns longer than the model's
    records are skipped. Returns the decoded samples (kept characters unchanged)."""
    tok = model.tokenizer
    patterns = [p for p in expand_template(template, max_gap) if len(tok.split(p)) < model.length]
    if not patterns:
        raise UserError(f"The template {template!r} does not fit in records of {model.length - 1} symbols.")
    per = [num // len(patterns) + (i < num % len(patterns)) for i in range(len(patterns))]
    out = []
    for i, (pattern, k) in enumerate(zip(patterns, per)):
        if not k:
            continue
        known, known_mask = tok.condition(pattern)
        x = model.sample(k, steps=steps, known=known, known_mask=known_mask, seed=seed + i)
        out += model.decode(x)
    return out


def scaffold_kept(samples: list[str], scaffold: str) -> float:
    """Fraction of the valid samples that contain `scaffold` (SMILES or SMARTS) as a substructure."""
    Chem = rdkit()
    query = Chem.MolFromSmarts(scaffold) or Chem.MolFromSmiles(scaffold)
    if query is None:
        raise UserError(f"The scaffold {scaffold!r} is neither SMILES nor SMARTS.")
    mols = [m for m in (Chem.MolFromSmiles(s) for s in samples if s) if m is not None]
    return sum(m.HasSubstructMatch(query) for m in mols) / len(mols) if mols else float("nan")

