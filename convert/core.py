"""Convert upstream VAR / VQVAE .pth files into a varjax checkpoint directory.

Steps, each failing with one ConvertError line that names the file and the keys:
load (weights_only) -> find the state_dict -> detect the config from shapes -> map every
key by the rule (convert/mapping.py) -> check against the Flax tree (convert/verify.py)
-> cast to float32 and transform -> write atomically (varjax/checkpoint.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import math
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flax.traverse_util import unflatten_dict

from convert.detect import detect_var, detect_vqvae
from convert.errors import ConvertError
from convert.load import find_state_dict, load_pth, to_array
from convert.mapping import IGNORED, Entry, plan
from convert.verify import abstract_params, check
from varjax.checkpoint import CheckpointError, check_target, write_converted
from varjax.config import PATCH_NUMS_256, ModelConfig, VARConfig, VQVAEConfig

_VERSIONED = ("varjax", "jax", "jaxlib", "flax", "orbax-checkpoint", "torch", "numpy")


@dataclasses.dataclass
class Source:
    """One input file, loaded and mapped (its tensors are converted later)."""

    part: str  # 'var' or 'vqvae'
    path: Path
    state_dict: dict[str, torch.Tensor]
    where: str  # where the state_dict sat in the file ('' at the top)
    mmapped: bool  # tensors are backed by the file
    shapes: dict[str, tuple[int, ...]]  # torch key -> shape, of every key
    dtypes: dict[str, int]  # how many tensors of each dtype
    entries: dict[str, Entry]  # params: torch key -> Entry
    ignored: list[str]  # buffers left out

    @property
    def num_params(self) -> int:
        return sum(math.prod(self.shapes[k]) for k in self.entries)


def read_source(part: str, path: Path) -> Source:
    """Loads one file and maps its keys (no tensor data is converted yet)."""
    checkpoint, mmapped = load_pth(path)
    sd, where = find_state_dict(checkpoint, part)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    dtypes = collections.Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    entries, ignored = plan(shapes)
    for key in ignored:
        # Ignoring is only right if the buffer holds what the model recomputes: upstream's
        # attention has no key bias, and a file with a non-zero one is some other model.
        if key.endswith("zero_k_bias") and torch.count_nonzero(sd[key]):
            raise ConvertError(f"{key} is not all zeros: a key bias that varjax's attention does not have")
    return Source(part, path, sd, where, mmapped, shapes, dict(dtypes), entries, ignored)


def convert_checkpoints(
    var_path: str | Path | None,
    vae_path: str | Path | None,
    out_dir: str | Path,
    force: bool = False,
    *,
    patch_nums: tuple[int, ...] | None = None,
    log: Callable[[str], None] | None = print,
) -> ModelConfig:
    """Converts a VAR and/or a VQVAE checkpoint into `out_dir`.

    Args:
      var_path, vae_path: upstream .pth files (plain or trainer-wrapped state_dicts); at
        least one.
      out_dir: the directory to create (refused if it exists, unless force).
      patch_nums: the scale pyramid, if not one of the known ones (detect.KNOWN_PATCH_NUMS);
        for a VQVAE alone it defaults to the 256-px pyramid.
      log: called with each progress line (None: silent).
    Returns:
      The detected ModelConfig (also written to out_dir/config.json).
    Raises:
      ConvertError: with a one-line message naming the file and keys at fault.
    """
    say = log or (lambda _: None)
    t0 = time.perf_counter()
    if var_path is None and vae_path is None:
        raise ConvertError("nothing to convert: give --var and/or --vae")
    out = Path(out_dir)
    try:
        check_target(out, force)  # before the work; checked again before writing
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    paths = {part: Path(p) for part, p in (("var", var_path), ("vqvae", vae_path)) if p is not None}
    hashes = {part: _Hasher(path) for part, path in paths.items()}  # overlaps with the rest
    try:
        return _run(paths, out, force, patch_nums, hashes, say, t0)
    finally:
        for h in hashes.values():
            h.cancel()  # only matters when the conversion failed


def _run(paths, out: Path, force: bool, patch_nums, hashes, say, t0: float) -> ModelConfig:
    sources, config = _read_and_detect(paths, patch_nums, say)
    for part, src in sources.items():
        with _blame(src.path):
            check(src.entries, src.shapes, abstract_params(part, config))
        say(f"{part}: {_describe(getattr(config, part))}: {src.num_params / 1e6:.1f}M params")

    params = {}
    for part, src in sources.items():
        t = time.perf_counter()
        with _blame(src.path):
            params[part] = _convert(src)
        say(f"{part}: converted {len(src.entries)} tensors in {time.perf_counter() - t:.1f} s")

    with _blame(", ".join(map(str, paths.values()))):
        digests = {part: h.result() for part, h in hashes.items()}
    manifest = _manifest(sources, digests, config, time.perf_counter() - t0)
    say(f"writing {out}")
    try:
        written = write_converted(out, config, params, manifest, force=force)
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    except OSError as err:
        raise ConvertError(f"cannot write {out}: {err.strerror or err}") from None
    say(f"done: {written} in {time.perf_counter() - t0:.1f} s")
    return config


def _read_and_detect(paths: dict[str, Path], patch_nums, say) -> tuple[dict[str, Source], ModelConfig]:
    sources: dict[str, Source] = {}
    configs: dict[str, VARConfig | VQVAEConfig] = {}
    for part, path in paths.items():
        with _blame(path):
            say(f"{part}: reading {path} ({_size(path)})")
            src = sources[part] = read_source(part, path)
            if src.where:
                say(f"{part}: state_dict found at {src.where}")
            if part == "var":
                configs[part] = detect_var(src.shapes, patch_nums)
            else:
                configs[part] = detect_vqvae(src.shapes)
    return sources, _combine(configs.get("var"), configs.get("vqvae"), patch_nums)


def _convert(src: Source) -> dict:
    """The Flax param tree of one source; its tensors are dropped as they are converted."""
    flat = {}
    for key, e in src.entries.items():
        array = to_array(src.state_dict.pop(key), key, e.axes, src.mmapped)
        flat[e.path] = _on_host(array)
    return unflatten_dict(flat)


class _Hasher(threading.Thread):
    """sha256 of a file in the background (hashlib releases the GIL on large updates)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)  # an interrupted conversion does not wait for it
        self.path = path
        self.digest: str | None = None
        self.error: OSError | None = None
        self._cancelled = threading.Event()
        self.start()

    def run(self):
        try:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while (chunk := f.read(1 << 23)) and not self._cancelled.is_set():
                    h.update(chunk)
            if not self._cancelled.is_set():
                self.digest = h.hexdigest()
        except OSError as err:
            self.error = err

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self) -> str:
        self.join()
        if self.digest is None:
            raise ConvertError(f"cannot hash {self.path}: {self.error}")
        return self.digest


@contextlib.contextmanager
def _blame(path: Path):
    """Prefixes a ConvertError raised inside with the file it concerns."""
    try:
        yield
    except ConvertError as err:
        raise ConvertError(f"{path}: {err}") from None


def _on_host(array):
    """A host (CPU) jax array, which orbax writes without another full copy (numpy
    arrays cost one); the numpy array itself where jax has no CPU backend."""
    import jax

    try:
        return jax.device_put(array, jax.devices("cpu")[0])
    except RuntimeError:
        return array


def _combine(var: VARConfig | None, vqvae: VQVAEConfig | None, patch_nums) -> ModelConfig:
    if var is not None and vqvae is not None:
        if (var.vocab_size, var.z_channels) != (vqvae.vocab_size, vqvae.z_channels):
            raise ConvertError(
                f"the VAR (V={var.vocab_size}, Cvae={var.z_channels}) and the VQVAE "
                f"(V={vqvae.vocab_size}, Cvae={vqvae.z_channels}) do not belong together"
            )
    pns = var.patch_nums if var is not None else tuple(patch_nums or PATCH_NUMS_256)
    return ModelConfig(patch_nums=pns, vqvae=vqvae, var=var)


def _describe(cfg: VARConfig | VQVAEConfig) -> str:
    if isinstance(cfg, VARConfig):
        return (f"VAR-d{cfg.depth} (depth {cfg.depth}, width {cfg.embed_dim}, {cfg.num_heads} heads, "
                f"shared_aln {'on' if cfg.shared_aln else 'off'}, {len(cfg.patch_nums)} scales, "
                f"V {cfg.vocab_size})")
    mult = ",".join(map(str, cfg.ch_mult))
    return (f"VQVAE ch{cfg.ch} (ch_mult {mult}, {cfg.num_res_blocks} res blocks, z {cfg.z_channels}, "
            f"V {cfg.vocab_size}, {cfg.share_quant_resi} Phi)")


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size / 2**20:.1f} MiB"
    except OSError:
        return "unreadable"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _manifest(sources: dict[str, Source], digests: dict[str, str], config: ModelConfig, seconds: float) -> dict:
    out = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "convert_seconds": round(seconds, 2),
        "sources": {},
        "config": dataclasses.asdict(config),
        "ignored_patterns": list(IGNORED),
        "versions": {"python": platform.python_version(), **{d: _version(d) for d in _VERSIONED}},
    }
    for part, src in sources.items():
        out["sources"][part] = {
            "path": str(src.path.absolute()),
            "sha256": digests[part],
            "bytes": src.path.stat().st_size,
            "state_dict_at": src.where or "top level",
            "num_keys": len(src.entries) + len(src.ignored),
            "num_param_keys": len(src.entries),
            "num_params": src.num_params,
            "ignored_keys": src.ignored,
            "dtypes": src.dtypes,
        }
    return out
