"""How capjax reports problems in a user's data files.

`DataError` is raised for anything a user can fix in their files or config (a missing path, a file
that is not an image, a split whose images are absent); its message is one sentence that names the
file or field and says what to do, so `launch.py` can print it without a traceback.

`ReadReport` collects the problems a reader tolerated (skipped lines, missing images, images with
no captions), so a partial download or a messy caption file is visible in the logs instead of
silently shrinking a split.

The few helpers every reader needs to honour that contract live here too: `drop_missing` (raise
or skip-and-count missing images), `read_lines` (UTF-8 line by line, counting bad lines),
`list_dir` and `clean_caption`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple

from absl import logging

from capjax.errors import UserError


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


def drop_missing(records: list[dict], present: Callable[[str], bool], report: ReadReport, *,
                 what: str, skip_missing: bool) -> list[dict]:
  """Returns `records` whose 'image_path' exists, or raises DataError if any are missing.

  Args:
    records: dicts with an 'image_path' key.
    present: `present(path) -> bool`, e.g. a set lookup over a directory listing (much faster
      than one stat per image on network filesystems).
    report: counts the missing images, with the first as example.
    what: names the split in the error, e.g. "Flickr8k split 'test'".
    skip_missing: skip and count missing images instead of raising.
  """
  kept = [r for r in records if present(r['image_path'])]
  missing = [r['image_path'] for r in records if not present(r['image_path'])]
  if missing:
    report.count('missing_images', missing[0], n=len(missing))
    if not skip_missing:
      raise DataError(
          f'{what}: {len(missing)} of {len(records)} images are missing '
          f'(e.g. {missing[0]}); put the images there, or set the config field '
          f'skip_missing_images=True to skip them.')
  return kept


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
