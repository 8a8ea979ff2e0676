"""Caption metrics: BLEU-1..4, ROUGE-L, CIDEr(-D), optional METEOR, and TF-IDF cosine similarity.

BLEU, ROUGE-L and CIDEr come from pycocoevalcap's scorers. Text goes through `tokenize` below
instead of pycocoevalcap's PTBTokenizer: that one runs Stanford CoreNLP under Java on every call
(seconds of JVM start-up, and BLEU/CIDEr would then need Java). Ours is pure Python and identical
for references and hypotheses, so scores are comparable across capjax runs; they can differ from
the official COCO server by a little (e.g. PTB keeps "'s" and "t-shirt" as tokens, we give
"s" and "t shirt").

METEOR needs Java. We drive pycocoevalcap's meteor-1.5.jar ourselves (same command line and
protocol as its wrapper) because the wrapper blocks forever on a dead or stuck JVM and can
deadlock in `__del__`; here a watchdog kills the JVM after `meteor_timeout_s`, and any failure
logs a warning and leaves 'meteor' out of the result.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.rouge.rouge import Rouge

_WORD = re.compile(r'[^\W_]+')  # a run of unicode letters/digits
_log = logging.getLogger(__name__)
_METEOR_JAR = 'meteor-1.5.jar'


def tokenize(caption: str) -> str:
  """Lower-cases and keeps only runs of letters/digits, joined by single spaces.

  "A man's T-shirt, red." -> "a man s t shirt red". Punctuation never becomes a token, so it
  cannot earn n-gram matches (the COCO evaluation also drops punctuation).
  """
  return ' '.join(_WORD.findall(caption.lower()))


def _tokenized(references: Mapping[Hashable, Sequence[str]],
               hypotheses: Mapping[Hashable, str]):
  """Checks the inputs; returns (refs, hyps) as {id: [tokenized, ...]} over the hypothesis ids.

  References without a hypothesis are ignored, so a subset of a split can be scored.
  """
  if not hypotheses:
    raise ValueError('No hypotheses to evaluate; generate captions first.')
  missing = [i for i in hypotheses if i not in references]
  if missing:
    raise ValueError(f'{len(missing)} hypothesis ids have no references (e.g. {missing[0]!r}); '
                     'pass the references of every captioned image.')
  refs, hyps = {}, {}
  for i, hyp in hypotheses.items():
    if not isinstance(hyp, str):
      raise ValueError(f'Hypothesis {i!r} must be one string, got {type(hyp).__name__}.')
    ref_list = references[i]
    if isinstance(ref_list, str) or not ref_list:
      raise ValueError(f'References of {i!r} must be a non-empty list of strings.')
    refs[i] = [tokenize(r) for r in ref_list]
    hyps[i] = [tokenize(hyp)]
  return refs, hyps


def caption_metrics(references: Mapping[Hashable, Sequence[str]],
                    hypotheses: Mapping[Hashable, str], *,
                    meteor: bool | None = None,
                    meteor_timeout_s: float | None = None) -> dict[str, float]:
  """Corpus-level caption metrics over the images in `hypotheses`.

  Args:
    references: {image id: [reference caption, ...]}; may hold more ids than `hypotheses`.
    hypotheses: {image id: generated caption}.
    meteor: None (default) computes METEOR when `java` is on PATH; True also warns when it is
      not; False skips it (saves ~10 s of JVM start-up plus ~6 ms per image).
    meteor_timeout_s: the JVM is killed after this long and METEOR is left out; by default
      120 s plus 50 ms per image (about 5x what it needs on a busy 2-core machine).

  Returns:
    {'bleu_1'..'bleu_4', 'rouge_l', 'cider'} and 'meteor' when it was computed; floats.
  """
  refs, hyps = _tokenized(references, hypotheses)
  # pycocoevalcap prints its internals to stdout; keep logs clean.
  with contextlib.redirect_stdout(io.StringIO()):
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    rouge, _ = Rouge().compute_score(refs, hyps)
    cider, _ = Cider().compute_score(refs, hyps)
  out = {f'bleu_{n + 1}': float(b) for n, b in enumerate(bleu)}
  out['rouge_l'] = float(rouge)
  out['cider'] = float(cider)
  if meteor is not False:
    java = shutil.which('java')
    if java is None:
      if meteor:
        _log.warning('METEOR skipped: no `java` on PATH; install a JRE to get it.')
    else:
      try:
        timeout_s = 120.0 + 0.05 * len(hyps) if meteor_timeout_s is None else meteor_timeout_s
        out['meteor'] = _meteor(java, refs, hyps, timeout_s)
      except Exception as e:  # pylint: disable=broad-except
        # One optional metric must not cost the whole evaluation.
        _log.warning('METEOR skipped: %s', e)
  return out


def _meteor(java: str, refs: dict, hyps: dict, timeout_s: float) -> float:
  """Corpus METEOR 1.5 (`-l en -norm`, as pycocoevalcap) for tokenized refs/hyps."""
  jar_dir = os.path.dirname(os.path.abspath(meteor_module.__file__))
  cmd = [java, '-jar', '-Xmx2G', _METEOR_JAR, '-', '-', '-stdio', '-l', 'en', '-norm']
  # Tokenized text has no '|' and no newline, so it cannot break the ' ||| ' line protocol.
  score_lines = [' ||| '.join(['SCORE', *refs[i], hyps[i][0]]) + '\n' for i in hyps]
  with tempfile.TemporaryFile() as stderr:  # a file, not a pipe, so the JVM never blocks on it
    proc = subprocess.Popen(cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr)
    timed_out = threading.Event()

    def kill():
      timed_out.set()
      proc.kill()

    watchdog = threading.Timer(timeout_s, kill)
    watchdog.daemon = True
    watchdog.start()

    def read_line() -> str:
      line = proc.stdout.readline()
      if not line:
        if timed_out.is_set():
          raise TimeoutError(f'METEOR took longer than {timeout_s:.0f} s')
        stderr.seek(0)
        tail = stderr.read()[-300:].decode(errors='replace').strip()
        raise RuntimeError(f'METEOR exited early (code {proc.poll()}): {tail}')
      return line.decode().strip()

    def write_all(lines):
      try:
        for line in lines:
          proc.stdin.write(line.encode())
        proc.stdin.flush()
      except (BrokenPipeError, ValueError, OSError):
        pass  # the JVM died; read_line reports why

    try:
      # Written from a thread while we read: writing everything first could fill both pipes.
      writer = threading.Thread(target=write_all, args=(score_lines,), daemon=True)
      writer.start()
      stats = [read_line() for _ in score_lines]
      writer.join()
      write_all(['EVAL ||| ' + ' ||| '.join(stats) + '\n'])
      for _ in score_lines:  # per-segment scores, unused
        read_line()
      return float(read_line())
    finally:
      watchdog.cancel()
      proc.kill()
      proc.wait()
      for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
          pipe.close()


def cosine_similarity(references: Mapping[Hashable, Sequence[str]],
                      hypotheses: Mapping[Hashable, str]) -> float:
  """Mean over images of the mean TF-IDF cosine between the hypothesis and each reference.

  Definition: tokens come from `tokenize`. Each image's reference set is one document of the
  corpus (as CIDEr does), over the images being scored; idf(w) = ln((1 + D) / (1 + df(w))) + 1
  with D documents (the smoothed form, so a word found in every image still weighs 1 rather than
  0, and a word in no reference weighs the most). A caption's vector is count(w) * idf(w). The
  cosine with an empty vector is 0. Identical captions give 1; captions without a shared word 0.
  """
  refs, hyps = _tokenized(references, hypotheses)
  doc_freq = collections.Counter()
  for ref_list in refs.values():
    doc_freq.update({w for r in ref_list for w in r.split()})
  num_docs = len(refs)

  def vector(text: str) -> dict[str, float]:
    counts = collections.Counter(text.split())
    return {w: n * (math.log((1 + num_docs) / (1 + doc_freq[w])) + 1) for w, n in counts.items()}

  def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    norm = math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))
    return sum(v * b.get(w, 0.0) for w, v in a.items()) / norm if norm > 0 else 0.0

  per_image = []
  for i, (hyp,) in hyps.items():
    hyp_vec = vector(hyp)
    per_image.append(sum(cosine(hyp_vec, vector(r)) for r in refs[i]) / len(refs[i]))
  return float(sum(per_image) / len(per_image))
