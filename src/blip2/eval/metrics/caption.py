"""Caption metrics as COCO reports them: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) (REFERENCE §7).

Two backends:
- "pycocoevalcap" (the reference): the PTB tokenizer (Stanford CoreNLP jar, needs Java) then the
  pycocoevalcap scorers. We call the tokenizer jar ourselves with the temporary file in a temporary
  folder, because `PTBTokenizer.tokenize` writes it next to the jar, which may be read-only (a system
  site-packages); the command line and the punctuation filter are the same.
- "fallback (pure python, approximate tokenizer)": no Java. A regex tokenizer that imitates PTB on
  ordinary captions, and our own BLEU, CIDEr-D and ROUGE-L that reproduce pycocoevalcap's BleuScorer
  ("closest" reference length, its 1e-9/1e-15 smoothing), CiderScorer (document frequency over the
  evaluated references, clipping, sigma = 6, x10) and Rouge (beta = 1.2). On the same tokens the
  scorers agree with pycocoevalcap to 1e-9 (float summation order only). End to end, the tokenizers
  agree exactly on clean text (lowercase words, periods, commas, 's, n't, hyphens); they differ on
  rare tokens (abbreviations like "mr.", "@", "rock'n'roll"), so fallback scores are approximate.

SPICE is never computed: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use
(and an 8 GB Java heap), which cannot happen offline.

Scores are on pycocoevalcap's scale (BLEU in [0, 1], CIDEr in [0, 10]); LAVIS's `agg_metrics` for
captioning is CIDEr + Bleu_4.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

BACKEND_COCO = "pycocoevalcap"
BACKEND_FALLBACK = "fallback (pure python, approximate tokenizer)"
BLEU_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
ALL_METRICS = (*BLEU_NAMES, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_REASON = (
    "not computed: SPICE needs Stanford CoreNLP 3.6.0 models that pycocoevalcap downloads on first use "
    "(no network here) and an 8 GB Java heap"
)
METEOR_FALLBACK_REASON = "needs Java (METEOR 1.5 jar with its paraphrase table); no pure-Python equivalent"

Ngram = tuple[str, ...]


@dataclass(frozen=True)
class CaptionResult:
    scores: dict[str, float]
    backend: str
    unavailable: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- backend selection


@lru_cache(maxsize=1)
def coco_unavailable_reason() -> str | None:
    """Why the pycocoevalcap backend cannot run here, or None when it can."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'blip2[eval]')"
    java = shutil.which("java")
    if java is None:
        return "no `java` on PATH (pycocoevalcap's PTB tokenizer and METEOR need Java 8 or newer)"
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`java -version` failed: {e}"
    return None


# ---------------------------------------------------------------- tokenizers

# pycocoevalcap drops these PTB tokens after tokenizing. Its "-LRB-" etc. are upper case but the
# tokenizer runs with -lowerCase, so brackets survive as "-lrb-": a quirk we keep.
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTB tokenization (Java), one call for all captions, same output format."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(
        os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    )
    keys = [k for k, caps in captions.items() for _ in caps]
    # One caption per line; "\r" would also end a line for Java and shift every caption after it.
    text = "\n".join(c.replace("\n", " ").replace("\r", " ") for caps in captions.values() for c in caps)
    with tempfile.TemporaryDirectory(prefix="blip2_ptb_") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as f:
            f.write(text.encode())
        cmd = [
            "java",
            "-cp",
            jar,
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            path,
        ]
        out = subprocess.run(cmd, capture_output=True, check=True).stdout.decode()
    lines = out.split("\n")
    if len(lines) < len(keys):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(keys)} captions.")
    result: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, lines):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS))
    return result


_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_SPLITS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
               "lemme": "lem me", "gimme": "gim me"}  # fmt: skip
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_SPLIT_RE = re.compile(r"\b(" + "|".join(_PTB_SPLITS) + r")\b")
_CLITIC_RE = re.compile(r"(\w)(n't|'(?:s|m|d|ll|re|ve))\b")
_TOKEN_RE = re.compile(
    r"-(?:lrb|rrb|lsb|rsb|lcb|rcb)-"  # brackets as PTB writes them (lower-cased)
    r"|n't|'(?:s|m|d|ll|re|ve)\b"  # clitics split off below
    r"|(?:[^\W\d_]\.){2,}"  # u.s. a.m. e.g. keep their periods
    r"|\w+(?:(?:[-'./]|(?<=\d)[,:](?=\d))\w+)*"  # t-shirt, o'clock, 3.5, 1,000, 9:30
    r"|\.\d+"  # .5
    r"|[^\w\s.,!?;:'\"`-]"  # other symbols stand alone: % $ # & * + = / ...; the rest is punctuation
)


def simple_tokenize(caption: str) -> str:
    """Pure-Python stand-in for PTB tokenization + pycocoevalcap's punctuation filter."""
    text = _BRACKET_RE.sub(lambda m: f" {_PTB_BRACKETS[m.group()]} ", caption.lower())
    text = _SPLIT_RE.sub(lambda m: _PTB_SPLITS[m.group()], text)
    text = _CLITIC_RE.sub(r"\1 \2", text)
    return " ".join(_TOKEN_RE.findall(text))


# ---------------------------------------------------------------- pure-Python scorers
# Inputs are tokenized captions (tokens joined by single spaces), one hypothesis and a list of
# references per image, as pycocoevalcap's scorers take them.


def _ngrams(words: Sequence[str], n: int) -> Counter[Ngram]:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n like pycocoevalcap's BleuScorer(option="closest")."""
    small, tiny = 1e-9, 1e-15  # its smoothing: a 0 precision gives ~0, not a division error
    correct, guess = [0] * n, [0] * n
    testlen = reflen = 0
    for hyp, rs in zip(hyps, refs, strict=True):
        words = hyp.split()
        counts = _ngrams(words, n)
        max_ref: Counter[Ngram] = Counter()
        for r in rs:
            max_ref |= _ngrams(r.split(), n)  # | keeps the max count per n-gram (clipping)
        testlen += len(words)
        # "closest": the reference length nearest the hypothesis, the shorter one on a tie.
        reflen += min((abs(len(r.split()) - len(words)), len(r.split())) for r in rs)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for g, c in counts.items():
            correct[len(g) - 1] += min(max_ref[g], c)
    scores, prod = [], 1.0
    for k in range(n):
        prod *= float(correct[k] + tiny) / (guess[k] + small)  # BLEU-k: geometric mean of p_1..p_k
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D like pycocoevalcap's CiderScorer: (corpus mean, per-image scores)."""
    ref_counts = [[_ngrams(r.split(), n) for r in rs] for rs in refs]
    # Document frequency: in how many images' reference sets an n-gram occurs (over this corpus only).
    df: Counter[Ngram] = Counter(g for rcs in ref_counts for g in set().union(*rcs))
    log_n_docs = math.log(float(len(ref_counts)))

    def tfidf(counts: Counter[Ngram]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        vec: list[dict[Ngram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = w = float(tf) * (log_n_docs - math.log(max(1.0, df[g])))
            norm[k] += w * w
            if k == 1:  # reference quirk: "length" counts bigrams; only length differences are used
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, rcs in zip(hyps, ref_counts, strict=True):
        vec_h, norm_h, len_h = tfidf(_ngrams(hyp.split(), n))
        total = [0.0] * n
        for rc in rcs:
            vec_r, norm_r, len_r = tfidf(rc)
            penalty = math.e ** (-(float(len_h - len_r) ** 2) / (2 * sigma**2))  # Gaussian length penalty
            for k in range(n):
                # "-D" clipping: a hypothesis n-gram counts at most as often as in the reference.
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
                if norm_h[k] != 0 and norm_r[k] != 0:
                    val /= norm_h[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(rcs) * 10.0)  # mean over n, mean over refs, x10
    return sum(scores) / len(scores), scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L like pycocoevalcap's Rouge: F-measure of max precision and max recall, image mean."""
    scores = []
    for hyp, rs in zip(hyps, refs, strict=True):
        h = hyp.split(" ")  # split(" ") as the reference does: an empty caption is one empty token
        lcs = [_lcs(r.split(" "), h) for r in rs]
        p = max(x / len(h) for x in lcs)
        r = max(x / len(ref.split(" ")) for x, ref in zip(lcs, rs))
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p != 0 and r != 0 else 0.0)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- entry point


def _coco_scores(gts: dict, res: dict, wanted: set[str]) -> tuple[dict[str, float], dict[str, str]]:
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if wanted & set(BLEU_NAMES):
        scorer = BleuScorer(n=4)
        for k, refs in gts.items():
            scorer += (res[k][0], refs)
        # Bleu.compute_score does exactly this, with verbose=1 printing; we keep stdout quiet.
        bleus, _ = scorer.compute_score(option="closest", verbose=0)
        scores.update({m: float(b) for m, b in zip(BLEU_NAMES, bleus) if m in wanted})
    if "METEOR" in wanted:
        try:
            meteor = Meteor()  # starts a Java process (2 GB heap) that loads the paraphrase table
            try:
                scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
            finally:
                del meteor  # its __del__ stops the Java process
        except Exception as e:  # noqa: BLE001  a METEOR failure (e.g. no 2 GB heap) must not lose the rest
            unavailable["METEOR"] = f"failed: {type(e).__name__}: {e}"
    if "ROUGE_L" in wanted:
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores, unavailable


def _fallback_scores(gts: dict, res: dict, wanted: set[str]) -> tuple[dict[str, float], dict[str, str]]:
    keys = list(gts)
    hyps, refs = [res[k][0] for k in keys], [gts[k] for k in keys]
    scores: dict[str, float] = {}
    if wanted & set(BLEU_NAMES):
        scores.update({m: b for m, b in zip(BLEU_NAMES, bleu(hyps, refs)) if m in wanted})
    if "ROUGE_L" in wanted:
        scores["ROUGE_L"] = rouge_l(hyps, refs)
    if "CIDEr" in wanted:
        scores["CIDEr"] = cider_d(hyps, refs)[0]
    unavailable = {"METEOR": METEOR_FALLBACK_REASON} if "METEOR" in wanted else {}
    return scores, unavailable


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    backend: str = "auto",
    metrics: Sequence[str] | None = None,
) -> CaptionResult:
    """Score one generated caption per image against its references.

    Only the predicted images are evaluated (extra references are ignored, as LAVIS restricts
    COCOEvalCap to the result's image ids); CIDEr's document frequency uses their references only.
    backend: "auto" (pycocoevalcap when Java works, else the fallback), "pycocoevalcap" or "fallback".
    metrics: names from ALL_METRICS (default: all); METEOR alone takes ~10 s to start Java.
    """
    wanted = set(ALL_METRICS if metrics is None else metrics)
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"Unknown caption metric(s) {sorted(unknown)}; choose from {list(ALL_METRICS)}.")
    if not predictions:
        raise ValueError("No captions to evaluate: `predictions` is empty.")
    missing = [k for k in predictions if k not in references or len(references[k]) == 0]
    if missing:
        raise ValueError(
            f"{len(missing)} predicted image(s) have no reference captions (e.g. {missing[:3]})."
        )
    if backend not in ("auto", "pycocoevalcap", "fallback"):
        raise ValueError(f"backend must be 'auto', 'pycocoevalcap' or 'fallback', got {backend!r}.")
    reason = coco_unavailable_reason() if backend != "fallback" else "fallback requested"
    if backend == "pycocoevalcap" and reason is not None:
        raise RuntimeError(f"The pycocoevalcap backend cannot run: {reason}. Use backend='fallback'.")

    refs = {k: list(references[k]) for k in predictions}
    if reason is None:
        gts = ptb_tokenize(refs)
        res = ptb_tokenize({k: [predictions[k]] for k in predictions})
        scores, unavailable = _coco_scores(gts, res, wanted)
        name = BACKEND_COCO
    else:
        gts = {k: [simple_tokenize(c) for c in cs] for k, cs in refs.items()}
        res = {k: [simple_tokenize(predictions[k])] for k in predictions}
        scores, unavailable = _fallback_scores(gts, res, wanted)
        name = BACKEND_FALLBACK
    if "SPICE" in wanted:
        unavailable["SPICE"] = SPICE_REASON
    ordered = {m: scores[m] for m in ALL_METRICS if m in scores}
    return CaptionResult(scores=ordered, backend=name, unavailable=unavailable)
