"""Crafted and malicious checkpoints for the tests of every reader (shared by several test files)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from napari_covidseg import checkpoint as ckpt


def craft(raw: dict, path, digest: str = "recompute") -> Path:
    """Write an edited checkpoint dict as a crafted file: with a digest that matches the edit (what
    someone who knows the format writes, ``"recompute"``), without one (a checkpoint written before
    digests existed, ``"drop"``), or with the old one (``"keep"``: an edit the digest must catch)."""
    raw = dict(raw)
    if digest == "recompute":
        raw[ckpt.DIGEST_KEY] = {"algorithm": "sha256", "value": ckpt.payload_digest(raw)}
    elif digest == "drop":
        raw.pop(ckpt.DIGEST_KEY, None)
    torch.save(raw, path)
    return Path(path)


class _Reduce:
    """Unpickles to ``function(*args)``: what a malicious pickle runs."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def malicious_payloads(marker: Path) -> dict:
    """Objects whose unpickling would create ``marker`` (each by another route), by name."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os_system": _Reduce(os.system, f"touch {marker}"),
        "builtins_exec": _Reduce(exec, code),
        "builtins_eval": _Reduce(eval, code),
        "open_for_writing": _Reduce(open, str(marker), "w"),
    }


def write_malicious(folder, marker: Path, network: str = "unet") -> dict:
    """Malicious checkpoint files (name -> path): a napari-covidseg-looking dict with a payload in
    a field, in the weights, at the top, and a legacy (non-zip) pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payloads = malicious_payloads(marker)
    base = {"format": ckpt.FORMAT_NAME, "format_version": 1, "network": network, "network_kwargs": {"base": 4, "depth": 2}}
    files = {}
    for name, payload in payloads.items():
        files[f"{name}_in_training"] = folder / f"{name}_in_training.pt"
        torch.save({**base, "state_dict": {}, "training": {"note": payload}}, files[f"{name}_in_training"])
    files["in_state_dict"] = folder / "in_state_dict.pt"
    torch.save({**base, "state_dict": {"inc.0.weight": payloads["os_system"]}}, files["in_state_dict"])
    files["top_level"] = folder / "top_level.pt"
    torch.save(payloads["builtins_exec"], files["top_level"])
    files["legacy_pickle"] = folder / "legacy_pickle.pt"
    with open(files["legacy_pickle"], "wb") as stream:
        pickle.dump({**base, "state_dict": {}, "extra": payloads["os_system"]}, stream)
    files["legacy_torch_format"] = folder / "legacy_torch_format.pt"
    torch.save({**base, "state_dict": {}, "extra": payloads["builtins_eval"]}, files["legacy_torch_format"],
               _use_new_zipfile_serialization=False)
    return files
