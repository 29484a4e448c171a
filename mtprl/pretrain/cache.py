"""The cache of pre-trained bases: one folder per weight-relevant config, written atomically.

The result of `mtprl.pretrain.loop.pretrain` is cached under `<root>/base/<key>`: root =
`cache_dir`, else $MTPRL_CACHE, else ~/.cache/mtprl; key = hash of every config field that
affects the weights, the code's FORMAT_VERSION and mtprl's version. It is written to a temporary
directory and renamed into place only when complete, so an interrupted run never leaves a
directory that looks finished. `ensure_base_model(cfg)` is what other commands call; when it has
to pre-train, it says so first (what, how long, where), since other commands call it implicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from mtprl import __version__
from mtprl.config import config_to_dict
from mtprl.pretrain.config import NOT_IN_KEY, PretrainConfig

FORMAT_VERSION = 2  # bump when the training code or the task generators change what a config produces (2: MiMo MTP layout)
# Pre-training speed measured with the defaults on one core of the 2-core reference machine (for the notice).
_STEPS_PER_S = 2800 / 323


def cache_key(cfg: PretrainConfig) -> str:
    """16 hex digits from the weight-relevant config fields, the code's format version and mtprl's version."""
    fields = {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_IN_KEY}
    payload = json.dumps({"fields": fields, "format": FORMAT_VERSION, "mtprl": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_root(cfg: PretrainConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MTPRL_CACHE") or Path.home() / ".cache" / "mtprl"
    return Path(root).expanduser()


def base_model_dir(cfg: PretrainConfig) -> Path:
    """Where the cached base for `cfg` lives (whether or not it exists yet)."""
    return cache_root(cfg) / "base" / cache_key(cfg)


def is_complete(directory: Path) -> bool:
    return (directory / "summary.json").is_file() and (directory / "config.json").is_file()


def pretraining_notice(cfg: PretrainConfig, target: Path) -> str:
    """What an implicit pre-training is about to do, how long it takes and where it goes."""
    minutes = cfg.steps / _STEPS_PER_S / 60
    return (f"pre-training the embedded base model ({cfg.steps} steps of NTP + MTP cross-entropy on generated "
            f"traces, about {minutes:.0f} min on one free CPU core, longer on a busy machine); it is cached in "
            f"{target} and re-used by later runs (`mtprl pretrain` does this step alone)")


def ensure_base_model(cfg: PretrainConfig, force: bool = False, announce: bool = True) -> Path:
    """The cached base checkpoint for `cfg`, pre-training it first if missing (or if `force`)."""
    from mtprl.pretrain import loop

    target = base_model_dir(cfg)
    if is_complete(target) and not force:
        return target
    if announce:
        print(pretraining_notice(cfg, target), file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        loop.pretrain(cfg, tmp, cache_key=cache_key(cfg))
        if target.exists():  # forced, or stale or half-written by an older version: replace it
            shutil.rmtree(target)
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):  # another process did not finish it for us either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_summary(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "summary.json").read_text())
