"""Several training folders in one run: what each contributes and how much of each epoch it gets.

A source is written on the command line as ``--data PATH`` and may carry options after commas::

    --data ../shared/data/covid19ctseg_dstaroff
    --data ../shared/data/covidsemiseg_infnet,labels=infection,weight=0.25
    --data phantom,cases=6

* ``labels=lung+infection`` / ``labels=infection``: which of the folder's masks are trusted.  A
  label left out is treated as *missing* (its loss channel is masked out), e.g. an approximate
  lung mask.  Default: every mask the folder has.
* ``weight=W``: the share of training samples drawn from this source (0 < W <= 1).  Sources
  without a weight share the rest in proportion to their number of slices.  Default: every
  source in proportion to its slices (each training slice equally likely).
* ``cases=N`` (phantom only): number of phantom cases; ``healthy=K``: the last K have no lesion.
* ``layout=NAME``: force a layout instead of detecting it.

In a JSON config file, ``data`` may be a string, a list of such strings, or a list of objects
``{"path": ..., "labels": [...], "weight": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from napari_covidseg.errors import DataFolderError
from napari_covidseg.models.registry import CLASS_NAMES

PHANTOM = "phantom"
OPTION_NAMES = ("labels", "weight", "cases", "healthy", "layout")


@dataclass
class DataSource:
    path: str
    labels: Optional[Tuple[str, ...]] = None  # None: every mask the folder holds
    weight: Optional[float] = None  # share of samples; None: in proportion to slices
    cases: Optional[int] = None  # phantom only
    healthy: Optional[int] = None  # phantom only: how many of the cases have no lesion
    layout: str = "auto"
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if self.labels is not None:
            labels = tuple(self.labels)
            unknown = [n for n in labels if n not in CLASS_NAMES]
            if unknown or not labels:
                raise DataFolderError(f"--data {self.path}: labels must be one or more of {', '.join(CLASS_NAMES)} "
                                      f"(joined with '+'), not {'+'.join(labels) or 'nothing'}")
            self.labels = labels
        if self.weight is not None and not 0.0 < float(self.weight) <= 1.0:
            raise DataFolderError(f"--data {self.path}: weight must be in (0, 1], not {self.weight}")
        if not self.name:
            self.name = PHANTOM if self.is_phantom else (Path(self.path).name or str(self.path))

    @property
    def is_phantom(self) -> bool:
        return str(self.path) == PHANTOM

    def to_text(self) -> str:
        parts = [str(self.path)]
        if self.labels is not None:
            parts.append("labels=" + "+".join(self.labels))
        for key in ("weight", "cases", "healthy"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key):g}")
        if self.layout != "auto":
            parts.append(f"layout={self.layout}")
        return ",".join(parts)


def parse_source(text: str) -> DataSource:
    """A :class:`DataSource` from ``PATH[,key=value...]``."""
    path, *options = str(text).split(",")
    values = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in OPTION_NAMES:
            raise DataFolderError(f"--data {text}: unknown option {option!r}; options are "
                                  f"{', '.join(k + '=...' for k in OPTION_NAMES)} after the folder, separated by commas")
        values[key] = value.strip()
    try:
        labels = tuple(v for v in values["labels"].split("+") if v) if "labels" in values else None
        weight = float(values["weight"]) if "weight" in values else None
        cases = int(values["cases"]) if "cases" in values else None
        healthy = int(values["healthy"]) if "healthy" in values else None
    except ValueError as exc:
        raise DataFolderError(f"--data {text}: {exc}") from None
    return DataSource(path.strip(), labels=labels, weight=weight, cases=cases, healthy=healthy,
                      layout=values.get("layout", "auto"))


def as_sources(data: Union[str, dict, Sequence]) -> List[DataSource]:
    """Sources from a ``--data`` string, a config's list of strings / objects, or sources."""
    items = [data] if isinstance(data, (str, dict, DataSource)) else list(data or [])
    if not items:
        raise DataFolderError("no training data given; pass --data FOLDER (several times for several folders) or --data phantom")
    out = []
    for item in items:
        if isinstance(item, DataSource):
            out.append(item)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - set(OPTION_NAMES) - {"path"})
            if unknown or "path" not in item:
                raise DataFolderError(f"a data source needs 'path' and may have {', '.join(OPTION_NAMES)}; got {sorted(item)}")
            labels = item.get("labels")
            out.append(DataSource(str(item["path"]), labels=tuple(labels) if labels is not None else None,
                                  weight=item.get("weight"), cases=item.get("cases"), healthy=item.get("healthy"),
                                  layout=item.get("layout", "auto")))
        else:
            out.append(parse_source(str(item)))
    names = [s.name for s in out]
    for k, source in enumerate(out):  # two folders called "images" stay apart
        if names.count(source.name) > 1:
            source.name = f"{source.name}{k + 1}"
    return out


def sampling_shares(sources: Sequence[DataSource], slices: Sequence[int]) -> List[float]:
    """Share of training samples per source (sums to 1): given weights, the rest by slice count."""
    given = sum(float(s.weight) for s in sources if s.weight is not None)
    free_slices = sum(n for s, n in zip(sources, slices) if s.weight is None)
    if given > 1.0 + 1e-9:
        raise DataFolderError(f"the data source weights add up to {given:g}; they are shares of the samples and must add up to at most 1")
    if free_slices == 0:
        if given <= 0:
            raise DataFolderError("the training data holds no slices")
        return [float(s.weight or 0.0) / given for s in sources]
    rest = 1.0 - given
    return [float(s.weight) if s.weight is not None else rest * n / free_slices for s, n in zip(sources, slices)]
