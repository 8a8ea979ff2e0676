"""What every reader of a user's data files shares: its errors, its report, its split names.

`DataError` is raised for anything a user can fix in their files or config (a missing path, a file
that is not an image, a split whose images are absent); its message is one sentence that names the
file or the command-line flag and says what to do, so `launch.py` can print it without a
traceback.

`ReadReport` collects the problems a reader tolerated (skipped lines, missing images, images with
no captions), so a partial download or a messy caption file is visible in the logs instead of
silently shrinking a split. `CaptionSplit` and `ClassifySplit` are what the readers return, and
`finish_split` is how every reader ends: drop (or refuse) missing images, fill in the report's
sizes, log it, return the split.

`SPLITS` are the split names every data set is read as; `canonical_split` turns a user's name
('val', 'dev', ...) into one of them, and `split_by_fraction` cuts a data set without split
files into them. The small helpers the readers need: `read_lines` (UTF-8 line by line, counting
bad lines), `list_dir` and `clean_caption`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Mapping, NamedTuple, Sequence

from absl import logging

from capjax.errors import UserError

SPLITS = ('train', 'validation', 'test')
# The other names a user may give a split, in every reader (a reader may add its own).
SPLIT_ALIASES = {'val': 'validation', 'dev': 'validation'}
# The flag that sets the caption readers' `skip_missing` (caption_tfds.reader_args reads it).
CAPTION_SKIP_FLAG = '--config.data.skip_missing_images'


class DataError(UserError):
  """A problem with the user's data or data config; the message says what to do about it."""


# Problems a reader may count, with the words used for them in log lines.
_PROBLEMS = {
    'missing_images': 'images listed but not on disk',
    'images_without_captions': 'images with no captions (dropped)',
    'empty_captions': 'empty caption lines (dropped)',
    'undecodable_lines': 'lines that are not UTF-8 (dropped)',
    'malformed_lines': 'lines in an unexpected format (dropped)',
    'unlisted_images': 'captioned images that are in no split (ignored)',
}
# Expected in intact official releases (Flickr8k's token file names 92 such images), so they
# are logged at info level rather than as a warning on every run.
_INFO_ONLY = frozenset({'unlisted_images'})


@dataclasses.dataclass
class ReadReport:
  """What a reader found while reading one split: sizes, and problems with one example each.

  Attributes:
    source: which dataset, layout, split and root this report is about.
    images: number of records returned.
    captions: number of captions in the returned records.
    missing_images ... unlisted_images: counts of each kind of problem.
    examples: one example (a path or a line) per problem kind that occurred.
  """
  source: str
  images: int = 0
  captions: int = 0
  missing_images: int = 0
  images_without_captions: int = 0
  empty_captions: int = 0
  undecodable_lines: int = 0
  malformed_lines: int = 0
  unlisted_images: int = 0
  examples: dict[str, str] = dataclasses.field(default_factory=dict)

  def count(self, problem: str, example: str, n: int = 1) -> None:
    """Adds `n` occurrences of `problem` (a field name above), keeping the first example."""
    if problem not in _PROBLEMS:
      raise KeyError(f'unknown problem kind {problem!r}; expected one of {sorted(_PROBLEMS)}')
    setattr(self, problem, getattr(self, problem) + n)
    self.examples.setdefault(problem, example)

  def problems(self) -> dict[str, int]:
    """The non-zero problem counts, by field name."""
    return {k: getattr(self, k) for k in _PROBLEMS if getattr(self, k)}

  def summary(self) -> str:
    """One line: sizes, then each problem with its count and example."""
    sizes = f'{self.images} images' + (f', {self.captions} captions' if self.captions else '')
    parts = [f'{self.source}: {sizes}']
    for k, n in self.problems().items():
      parts.append(f'{n} {_PROBLEMS[k]} (e.g. {self.examples.get(k, "?")!r})')
    return '; '.join(parts)

  def log(self) -> None:
    """Logs the summary with absl: a warning when anything was dropped or missing."""
    if set(self.problems()) - _INFO_ONLY:
      logging.warning('%s', self.summary())
    else:
      logging.info('%s', self.summary())


class CaptionSplit(NamedTuple):
  """One split of a caption dataset: records {'id', 'image_path', 'captions'} and a report."""
  records: list[dict]
  report: ReadReport


class ClassifySplit(NamedTuple):
  """One split of a classification dataset: records {'id', 'image_path', 'label'}."""
  records: list[dict]
  class_names: list[str]
  report: ReadReport


def canonical_split(split: str, dataset: str = '',
                    aliases: Mapping[str, str] | None = None) -> str:
  """The reader's name for a user's split name: one of SPLITS, or what `aliases` maps it to.

  Args:
    split: as the user gave it, e.g. 'val'.
    dataset: names the data set in the error, e.g. 'COCO'.
    aliases: the reader's own names, added to (and overriding) SPLIT_ALIASES; Flickr8k maps
      'validation', 'val' and 'dev' to its own 'dev'.
  """
  names = {**{s: s for s in SPLITS}, **SPLIT_ALIASES, **(aliases or {})}
  if split not in names:
    # A reader's own name is shown with the standard one it stands for: 'dev (validation)'.
    shown = [names[s] if names[s] == s else f'{names[s]} ({s})' for s in SPLITS]
    raise DataError(f'Unknown {dataset + " " if dataset else ""}split {split!r}; use one of '
                    f'{", ".join(shown)}.')
  return names[split]


def check_fractions(fractions: Sequence[float], flag: str) -> None:
  """Raises DataError unless `fractions` has one share per split; `flag` sets them."""
  if len(fractions) != len(SPLITS):
    raise DataError(f'Split fractions {tuple(fractions)!r} need one share each for train, '
                    f'validation and test; fix {flag}.')


def split_by_fraction(names: Sequence[str], fractions: Sequence[float], seed: int = 0, *,
                      flag: str) -> list[list[str]]:
  """Splits names into len(fractions) groups in a fixed hash order.

  Args:
    names: distinct item names (duplicates are merged).
    fractions: non-negative shares, e.g. (0.8, 0.1, 0.1); normalised to sum to 1. Group sizes
      are rounded cumulatively, so they always add up to len(names).
    seed: changes the order, for a different but still reproducible split.
    flag: the command-line flag that sets `fractions`, named in the error when they are bad.

  Returns:
    One sorted list of names per fraction.
  """
  if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
    raise DataError(f'Split fractions {tuple(fractions)!r} must be non-negative and sum to more '
                    f'than 0; fix {flag}.')
  # sha1 rather than hash(): Python salts str hashes per process, which would change the split.
  order = sorted(set(names), key=lambda n: (hashlib.sha1(f'{seed}:{n}'.encode()).digest(), n))
  total = float(sum(fractions))
  groups, start, cum = [], 0, 0.0
  for f in fractions:
    cum += f
    end = round(len(order) * cum / total)
    groups.append(sorted(order[start:end]))
    start = end
  return groups


def _drop_missing(records: list[dict], present: Callable[[str], bool], report: ReadReport, *,
                  what: str, skip_missing: bool, skip_flag: str) -> list[dict]:
  """Returns `records` whose 'image_path' is present, or raises DataError if any are missing."""
  kept = [r for r in records if present(r['image_path'])]
  missing = [r['image_path'] for r in records if not present(r['image_path'])]
  if missing:
    report.count('missing_images', missing[0], n=len(missing))
    if not skip_missing:
      raise DataError(
          f'{what}: {len(missing)} of {len(records)} images are missing '
          f'(e.g. {missing[0]}); put the images there, or set {skip_flag}=True to skip them.')
  return kept


def finish_split(records: list[dict], report: ReadReport, *,
                 present: Callable[[str], bool] | None = None, what: str = '',
                 skip_missing: bool = False, skip_flag: str = CAPTION_SKIP_FLAG,
                 class_names: list[str] | None = None) -> CaptionSplit | ClassifySplit:
  """How every reader ends: drops missing images, completes and logs the report, returns the split.

  Args:
    records: the split's records, each with an 'image_path'.
    report: the split's report; its sizes are set from the records that are kept.
    present: `present(path) -> bool`, e.g. a set lookup over a directory listing (much faster
      than one stat per image on network filesystems). When given, records whose image is
      absent are counted as missing and raise DataError, unless `skip_missing`.
    what: names the split in that error, e.g. "Flickr8k split 'test' (images in ...)".
    skip_missing: skip and count missing images instead of raising.
    skip_flag: the command-line flag that sets `skip_missing`, which the error suggests.
    class_names: for a classification split: returns a ClassifySplit with them.

  Returns:
    CaptionSplit(records, report), or ClassifySplit(records, class_names, report).
  """
  if present is not None:
    records = _drop_missing(records, present, report, what=what, skip_missing=skip_missing,
                            skip_flag=skip_flag)
  report.images = len(records)
  report.captions = sum(len(r.get('captions', ())) for r in records)
  report.log()
  if class_names is not None:
    return ClassifySplit(records, class_names, report)
  return CaptionSplit(records, report)


def list_dir(folder: str) -> set[str]:
  """Names in `folder`, or an empty set if it is absent: one listing is much faster than a stat
  per image on network filesystems, and an absent folder just means every image is missing."""
  try:
    return set(os.listdir(folder))
  except OSError:
    return set()


def read_lines(path: str, report: ReadReport) -> list[str]:
  """The lines of a text file, decoded as UTF-8 one line at a time.

  A line that is not UTF-8 is dropped and counted in `report` instead of failing the whole file:
  one bad byte in a 40k-line caption file should not stop training. A UTF-8 BOM and CRLF line
  endings (files saved on Windows) are tolerated.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'Cannot read {path} ({e.strerror or e}); check that it exists and is '
                    f'readable.') from e
  if data.startswith(b'\xef\xbb\xbf'):
    data = data[3:]
  lines = []
  for i, raw in enumerate(data.split(b'\n'), start=1):
    try:
      lines.append(raw.decode('utf-8').rstrip('\r'))
    except UnicodeDecodeError:
      report.count('undecodable_lines', f'{path}:{i}')
  return lines


def clean_caption(text: str) -> str:
  """Collapses runs of whitespace (newlines inside COCO captions, tabs) to single spaces."""
  return ' '.join(text.split())
