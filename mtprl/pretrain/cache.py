"""The shipped base and the cache of pre-trained bases (one folder per weight-relevant config).

The base of the default config ships with the package (`mtprl/pretrain/base/`, a few MB of
safetensors with its summary), so every machine starts RL from the same weights: pre-training is
deterministic for a seed and thread count on one machine, but not bit for bit across machines
and thread counts. Its weights hash (`weights_hash`: SHA-256 over every tensor's name, dtype,
shape and bytes, so it does not depend on how the file was serialised) is recorded in its
summary and checked whenever it is used; `mtprl pretrain --force` re-creates it in the cache and
says whether the hash matches.

Any other config is pre-trained on first use and cached under `<root>/base/<key>`: root =
`cache_dir`, else $MTPRL_CACHE, else ~/.cache/mtprl; key = hash of every config field that
affects the weights and the code's FORMAT_VERSION. It is written to a temporary directory and
renamed into place only when complete, so an interrupted run never leaves a directory that looks
finished. `ensure_base_model(cfg)` is what other commands call; when it has to pre-train, it says
so first (what, how long, where), since other commands call it implicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from mtprl.config import ConfigError, config_to_dict
from mtprl.pretrain.config import NOT_IN_KEY, PretrainConfig

# Bump when the training code or the task generators change what a config produces
# (2: MiMo MTP layout; 3: shortcut traces in the pre-training mixture).
FORMAT_VERSION = 3
SHIPPED_DIR = Path(__file__).parent / "base"  # the base of the default config, shipped with the package
# Pre-training speed of the defaults on one core of the 2-core reference machine: 10,000 steps in 1,255 s of CPU.
_STEPS_PER_S = 10000 / 1255


def cache_key(cfg: PretrainConfig) -> str:
    """16 hex digits from the weight-relevant config fields and the code's format version."""
    fields = {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_IN_KEY}
    payload = json.dumps({"fields": fields, "format": FORMAT_VERSION}, sort_keys=True)
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


def weights_hash(directory: str | Path) -> str:
    """16 hex digits of SHA-256 over every tensor (name, dtype, shape, bytes) of the directory's safetensors."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in '{directory}'")
    digest = hashlib.sha256()
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for name in sorted(handle.keys()):
                array = handle.get_tensor(name)
                digest.update(f"{name}|{array.dtype}|{list(array.shape)}|".encode())
                digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def check_weights(directory: str | Path, expected: str) -> str:
    """The weights hash of `directory`, after checking that it is `expected` (ConfigError naming both if not)."""
    found = weights_hash(directory)
    if found != expected:
        raise ConfigError(f"the base model in '{directory}' has weights hash {found}, but its summary.json records "
                          f"{expected}: the weights were changed or damaged. Restore them (git checkout "
                          f"{directory}) or re-create them with `mtprl pretrain --force`")
    return found


def shipped_base(cfg: PretrainConfig) -> Path | None:
    """The shipped base directory when it was trained with `cfg`'s weight-relevant settings, else None."""
    if not is_complete(SHIPPED_DIR):
        return None
    return SHIPPED_DIR if load_summary(SHIPPED_DIR).get("cache_key") == cache_key(cfg) else None


def ensure_base_model(cfg: PretrainConfig, force: bool = False, announce: bool = True) -> Path:
    """The base checkpoint for `cfg`: the shipped one (hash checked), the cached one, or pre-trained now.

    `force` skips both and pre-trains into the cache (replacing a cached copy).
    """
    from mtprl.pretrain import loop

    shipped = None if force else shipped_base(cfg)
    if shipped is not None:
        check_weights(shipped, load_summary(shipped)["weights_hash"])
        return shipped
    target = base_model_dir(cfg)
    if is_complete(target) and not force:
        return target
    if announce:
        print(pretraining_notice(cfg, target), file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        loop.pretrain(cfg, tmp)
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
