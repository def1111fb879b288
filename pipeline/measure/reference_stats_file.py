"""The real data's reference statistics: `data/reference_stats/<split>.npz`, its writer beside its
reader.

What the reference side of FID and KID needs of a prepared split, through the study's feature
extractor, computed once (the `reference_stats` stage) and read by every evaluation, the
checkpoints' quick FIDs and the sweep's trials (EDM's `fid.py ref`, clean-fid's custom
statistics):

- `count`, `feature_sum` (D,) and `outer_sum` (D, D), float64: the split's `FeatureMoments`,
  merged from its feature chunks in chunk order, as the evaluate stage merged them;
- `kid_features` (K, D), float32 as the network gives them: the features of the split's
  `kid_subset`, the reference side of KID (`KernelReference`);
- `provenance`, a JSON object: the dataset, the split, N (its images), the extractor's name and
  the SHA-256 of its weights file (None: torch-fidelity's own), the SHA-256 of the prepared split,
  and, for the record, the device and torch version that computed them;
- `digest`: SHA-256 of the provenance and of every array (name, dtype, shape, bytes), checked on
  load, so a corrupt or edited file is refused.

The Inception Score has no reference side, so no logits are kept. A file made for another split,
extractor, N or prepared data, or whose digest does not match, is refused with one line that
names the file, what differs and the command that remakes it (`ReferenceStatsError`).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.io import file_digest, save_npz, sha256_hex
from pipeline.measure.stats import FeatureMoments, KernelReference

FORMAT = 1
REMAKE = "dvc repro reference_stats"
ARRAYS = ("count", "feature_sum", "outer_sum", "kid_features")
# What a file must match to stand for a study's reference side, and how a line names each.
CHECKED = {"format": "format", "dataset": "dataset", "split": "split", "num_images": "N",
           "extractor": "extractor", "extractor_weights": "extractor weights (sha256)",
           "prepared": "prepared data (sha256)"}


class ReferenceStatsError(UserError, ValueError):
    """A missing, corrupt or mismatched reference statistics file."""


def reference_stats_path(folder: str | Path, split: str = "train") -> Path:
    """data/reference_stats/<split>.npz."""
    return Path(folder) / f"{split}.npz"


def provenance(dataset: str, split: str, num_images: int, extractor: str,
               weights: Optional[str | Path], prepared: str | Path) -> dict[str, Any]:
    """The checked provenance of the statistics of `num_images` images of prepared split file
    `prepared` through `extractor` with weights file `weights`."""
    return {"format": FORMAT, "dataset": dataset, "split": split, "num_images": int(num_images),
            "extractor": extractor,
            "extractor_weights": file_digest(weights) if weights else None,
            "prepared": file_digest(prepared)}


@dataclass(frozen=True)
class ReferenceStats:
    """A split's reference side: its feature sums, its KID features, where they came from."""

    moments: FeatureMoments
    kid_features: np.ndarray  # float32 (K, D)
    provenance: dict[str, Any]

    def kernel(self) -> KernelReference:
        return KernelReference(self.kid_features)


def _arrays(stats: ReferenceStats) -> dict[str, np.ndarray]:
    m = stats.moments
    return {"count": np.asarray(m.count, dtype=np.int64),
            "feature_sum": np.asarray(m.feature_sum, dtype=np.float64),
            "outer_sum": np.asarray(m.outer_sum, dtype=np.float64),
            "kid_features": np.asarray(stats.kid_features, dtype=np.float32)}


def _digest(arrays: Mapping[str, np.ndarray], provenance_json: str) -> str:
    parts: list[bytes | str] = [provenance_json]
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        parts += [name, a.dtype.str, json.dumps(list(a.shape)), a.tobytes()]
    return sha256_hex(*parts)


def save_reference_stats(path: str | Path, stats: ReferenceStats) -> None:
    """Write `stats` to `path` (atomically), with its digest inside."""
    arrays = _arrays(stats)
    text = json.dumps(stats.provenance, sort_keys=True)
    save_npz(path, **arrays, provenance=np.asarray(text), digest=np.asarray(_digest(arrays, text)))


def _short(value: Any) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)


def load_reference_stats(path: str | Path,
                         expected: Optional[Mapping[str, Any]] = None) -> ReferenceStats:
    """Read and verify `path`: its digest, and with `expected` (`provenance`) every checked
    field; `ReferenceStatsError` naming the file, what differs and the fix otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceStatsError(f"{path}: reference statistics not found; make them with "
                                  f"`{REMAKE}`")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in ARRAYS}
            text, digest = str(f["provenance"]), str(f["digest"])
        found = json.loads(text)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ReferenceStatsError(f"{path}: unreadable reference statistics "
                                  f"({type(exc).__name__}); remake them with `{REMAKE}`") from None
    if _digest(arrays, text) != digest:
        raise ReferenceStatsError(f"{path}: its arrays do not match the digest written with "
                                  f"them (corrupt or edited); remake them with `{REMAKE}`")
    if expected is not None:
        differ = [f"{label} {_short(found.get(key))}, this study's is {_short(expected[key])}"
                  for key, label in CHECKED.items()
                  if key in expected and found.get(key) != expected[key]]
        if differ:
            raise ReferenceStatsError(f"{path}: made for another study's reference side ("
                                      f"{'; '.join(differ)}); remake them with `{REMAKE}`")
    moments = FeatureMoments(int(arrays["count"]), arrays["feature_sum"], arrays["outer_sum"])
    return ReferenceStats(moments, arrays["kid_features"], found)
