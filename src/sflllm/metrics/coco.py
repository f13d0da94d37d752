"""METEOR 1.5, ROUGE-L and CIDEr as the official E2E NLG Challenge scorer computes them.

e2e-metrics' ``measure_scores.py`` hands hypotheses and references to the MS-COCO caption-evaluation
code (pycocoevalcap), which:

1. tokenises every sentence with Stanford CoreNLP's ``PTBTokenizer`` (``-preserveLines
   -lowerCase``, the jar pycocoevalcap ships; Java), references in one run and hypotheses in
   another, then drops the punctuation tokens in :data:`PTB_PUNCTUATION`;
2. scores those token strings with METEOR 1.5 (pycocoevalcap's ``meteor-1.5.jar`` in ``-stdio -l en
   -norm`` mode: one ``SCORE`` line per MR, then one ``EVAL`` line whose aggregate is the corpus
   score), ROUGE-L (pycocoevalcap ``Rouge``: per MR the best LCS precision and the best LCS recall over
   its references, F with beta = 1.2, averaged over MRs) and CIDEr (pycocoevalcap ``Cider``: CIDEr-D,
   n <= 4, sigma = 6, document frequencies over the corpus's references).

Here steps 1 and 2 run the same jars in the same way; ROUGE-L and CIDEr are pycocoevalcap's own
classes. Without Java (no ``java`` on PATH) METEOR is omitted and the tokenisation falls back to
:func:`ptb_tokenize_approx`, a Python approximation of the PTB rules that matter for E2E text; the
scores then say so in their notes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pycocoevalcap
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

__all__ = [
    "PTB_PUNCTUATION",
    "MeteorScorer",
    "MetricsError",
    "cider",
    "coco_tokenize",
    "java_executable",
    "ptb_tokenize",
    "ptb_tokenize_approx",
    "rouge_l",
]

# pycocoevalcap's tokenizer/ptbtokenizer.py: tokens dropped after PTB tokenisation (lowercase run: -lrb- etc.)
PTB_PUNCTUATION = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
_PYCOCOEVALCAP_DIR = Path(next(iter(pycocoevalcap.__path__)))  # a namespace package: no __file__
PTB_JAR = _PYCOCOEVALCAP_DIR / "tokenizer" / "stanford-corenlp-3.4.1.jar"
METEOR_JAR = _PYCOCOEVALCAP_DIR / "meteor" / "meteor-1.5.jar"
METEOR_COMMAND = ("-jar", "-Xmx2G", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm")  # pycocoevalcap's
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # Java/Python line ends: one sentence, one line


class MetricsError(RuntimeError):
    """A metric's external tool (Java, a jar) failed; the message says which and how."""


def java_executable() -> str | None:
    """The ``java`` on PATH, or None when Java is not installed (METEOR is then omitted)."""
    return shutil.which("java")


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text)


def _drop_punctuation(line: str) -> str:
    return " ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION)


def _start_ptb(java: str) -> subprocess.Popen[bytes]:
    command = [java, "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish_ptb(process: subprocess.Popen[bytes], sentences: Sequence[str]) -> list[str]:
    text = "\n".join(_one_line(s) for s in sentences)  # pycocoevalcap's input: one sentence a line
    out, err = process.communicate(text.encode("utf-8"))
    lines = out.decode("utf-8").split("\n")
    if process.returncode != 0 or len(lines) < len(sentences):
        tail = " ".join(err.decode("utf-8", "replace").split())[-300:]
        raise MetricsError(f"Stanford PTBTokenizer ({PTB_JAR.name}) failed with exit code {process.returncode}: {tail}")
    return [_drop_punctuation(line) for line in lines[: len(sentences)]]


def ptb_tokenize(groups: Sequence[Sequence[str]], java: str) -> list[list[str]]:
    """Each group of sentences tokenised as pycocoevalcap does (one PTBTokenizer run per group,
    the runs concurrent), lowercased, punctuation dropped, tokens joined by single spaces."""
    processes = [_start_ptb(java) for _ in groups]
    try:
        return [_finish_ptb(p, group) for p, group in zip(processes, groups)]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SUFFIX_ONLY = re.compile(r"^'(s|re|ve|ll|d|m)$")
# PTB escapes brackets; with -lowerCase they come out lowercase, so pycocoevalcap's list (uppercase) keeps them
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_BRACKET_TOKENS = frozenset(_BRACKETS.values())


_FINAL_PERIODS = re.compile(r"(\S+?)(\.+)(?=\s|$)")  # a word's final period(s), whitespace after
# words whose one final period PTB keeps: initials (a.), dotted abbreviations (e.g., u.s.), and titles
_ABBREVIATION = re.compile(r"[a-z]|(?:[a-z]\.)+[a-z]|mr|mrs|ms|dr|prof|st|jr|sr|mt|ft|vs|inc|ltd|co|corp")


def _split_periods(match: re.Match[str]) -> str:
    word, periods = match.group(1), match.group(2)
    if periods == "." and _ABBREVIATION.fullmatch(word):
        return word + periods
    return word + " " + " ".join(periods)


def ptb_tokenize_approx(sentence: str) -> str:
    """A Python approximation of pycocoevalcap's tokenisation (PTB, lowercase, punctuation dropped).

    It follows the PTB rules that E2E text exercises: ``£`` becomes ``#`` and ``$`` a token; quotes,
    ``-`` at a word's edges, and ``. , ; : ! ? & *`` split off; brackets become ``-lrb-`` etc. (which,
    lowercased, pycocoevalcap keeps as words); a period splits off when whitespace follows it
    (``center.,`` keeps it, as PTB does) except after initials, dotted abbreviations and titles
    (``a.``, ``e.g.``, ``mr.``); ``...`` is one token; contractions
    split (``it's`` -> ``it 's``, ``isn't`` -> ``is n't``). On the 9,182 distinct references of the E2E
    dev and test sets it gives exactly the jar's tokens.
    """
    text = _one_line(sentence).lower().replace("£", " # ").replace("€", " $ ").replace("$", " $ ").replace('"', " '' ")
    text = re.sub(r"\.{3,}", " ... ", text)
    text = _FINAL_PERIODS.sub(_split_periods, text)
    text = re.sub(r"(^|\s)\.(?=\w)", r"\1. ", text)
    text = re.sub(r"([,;:!?&*])", r" \1 ", text)
    text = re.sub(r"[()\[\]{}]", lambda m: f" {_BRACKETS[m.group(0)]} ", text)
    tokens: list[str] = []
    for word in text.split():
        if word in _BRACKET_TOKENS:
            tokens.append(word)
            continue
        lead, trail = [], []
        while len(word) > 1 and word[0] == "-" and not word[1].isdigit():
            lead.append("-")
            word = word[1:]
        while len(word) > 1 and word[0] in "'`" and not _CONTRACTION.match(word):
            lead.append("'")
            word = word[1:]
            if _SUFFIX_ONLY.match(word):
                break
        while len(word) > 1 and word[-1] in "'-":
            trail.insert(0, word[-1])
            word = word[:-1]
        match = _CONTRACTION.match(word)
        tokens += lead + ([match.group(1), match.group(2)] if match else [word]) + trail
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def coco_tokenize(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], java: str | None
) -> tuple[list[str], list[list[str]]]:
    """(hypotheses, references) as pycocoevalcap's scorers see them: PTB-tokenised with the jar when
    ``java`` is given (references in one run, hypotheses in another), else :func:`ptb_tokenize_approx`."""
    flat = [r for refs in references for r in refs]
    if java is not None:
        refs_tok, hyps_tok = ptb_tokenize([flat, list(hypotheses)], java)
    else:
        refs_tok, hyps_tok = [ptb_tokenize_approx(r) for r in flat], [ptb_tokenize_approx(h) for h in hypotheses]
    grouped, start = [], 0
    for refs in references:
        grouped.append(refs_tok[start : start + len(refs)])
        start += len(refs)
    return hyps_tok, grouped


def _coco_dicts(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    return {i: list(refs) for i, refs in enumerate(references)}, {i: [h] for i, h in enumerate(hypotheses)}


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap ROUGE-L (0-1) of tokenised hypotheses (see :func:`coco_tokenize`)."""
    gts, res = _coco_dicts(hypotheses, references)
    return float(Rouge().compute_score(gts, res)[0])


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap CIDEr(-D) of tokenised hypotheses (see :func:`coco_tokenize`)."""
    gts, res = _coco_dicts(hypotheses, references)
    return float(Cider().compute_score(gts, res)[0])


class MeteorScorer:
    """A running METEOR 1.5 process (pycocoevalcap's jar and options), reusable across corpora.

    Starting it loads METEOR's English paraphrase table, which takes 10-30 s; a ``MeteorScorer`` keeps
    one process for any number of :meth:`score` calls. Use it as a context manager (the process is
    killed on exit), or call :meth:`close`.
    """

    def __init__(self, java: str) -> None:
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [java, *METEOR_COMMAND],
            cwd=METEOR_JAR.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the METEOR process (idempotent)."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()

    def _ask(self, line: str) -> str:
        process = self._process
        if process.stdin is None or process.stdout is None or process.poll() is not None:
            raise MetricsError(f"METEOR ({METEOR_JAR.name}) is not running{self._error_tail()}")
        try:
            process.stdin.write(line.encode("utf-8") + b"\n")
            process.stdin.flush()
        except BrokenPipeError:
            raise MetricsError(f"METEOR ({METEOR_JAR.name}) exited{self._error_tail()}") from None
        return self._read()

    def _read(self) -> str:
        assert self._process.stdout is not None
        answer = self._process.stdout.readline().decode("utf-8").strip()
        if not answer:
            raise MetricsError(f"METEOR ({METEOR_JAR.name}) exited without an answer{self._error_tail()}")
        return answer

    def _error_tail(self) -> str:
        self._stderr.seek(0)
        tail = " ".join(self._stderr.read().decode("utf-8", "replace").split())[-300:]
        return f": {tail}" if tail else ""

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus METEOR (0-1) of tokenised hypotheses (see :func:`coco_tokenize`): the statistics of
        every MR (``SCORE ||| ref 1 ||| ... ||| hyp``) aggregated by one ``EVAL`` line."""
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")

        def clean(text: str) -> str:  # '|||' separates the fields; pycocoevalcap removes it from the hypothesis
            return text.replace("|||", "").replace("  ", " ")

        stats = [
            self._ask(" ||| ".join(("SCORE", " ||| ".join(clean(r) for r in refs), clean(hyp))))
            for hyp, refs in zip(hypotheses, references)
        ]
        self._ask(" ||| ".join(("EVAL", *stats)))  # the first answer is MR 1's score; then one per MR
        for _ in range(len(stats) - 1):
            self._read()
        return float(self._read())  # the corpus aggregate
