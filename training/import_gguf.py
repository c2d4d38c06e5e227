"""Import a GGUF model (a ``FILE.gguf`` or a named source such as ``smollm2-135m``) into an HF safetensors dir.

    python -m training.import_gguf smollm2-135m              # into the cache; prints the dir
    python -m training.import_gguf model.Q4_K_M.gguf -o DIR  # into DIR (new or empty)

Every model argument of tunesmith (``model=`` of training, ``-t`` of preprocess, ``--base_model`` of merge and
inference, the benchmarks' ``--model``) already takes these forms and imports on first use; this CLI does the
import ahead of time (e.g. once, before launching many ranks) or into a dir of your choice. What was imported
and how is in ``DIR/tunesmith_source.json``; see :mod:`data_preprocess.model_source`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from data_preprocess.hub import exit_on_argument_error
from data_preprocess.model_source import (
    NAMED_SOURCES,
    RECORD,
    file_sha256,
    import_gguf,
    is_model_source,
    read_record,
    resolve_source,
    source_file,
)


@exit_on_argument_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help=f"a .gguf file or a named source ({', '.join(NAMED_SOURCES)})")
    ap.add_argument("-o", "--output_dir", help="import into this (new or empty) dir instead of the cache "
                                               "($TUNESMITH_CACHE/models, default ~/.cache/tunesmith/models)")
    a = ap.parse_args(argv)
    if not is_model_source(a.source):
        ap.error(f"{a.source}: not a .gguf file or a named source ({', '.join(NAMED_SOURCES)}); an HF dir needs "
                 "no import")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is only the dir (DeepSpeed's logger, imported by
        if a.output_dir:                         # transformers on the way, prints to stdout)
            path = source_file(a.source)
            out = str(import_gguf(path, a.output_dir, name=a.source, sha256=file_sha256(path)))
        else:
            out = resolve_source(a.source)
    rec = read_record(out) or {}
    print(f"{a.source}: {rec.get('architecture')} {rec.get('n_params', 0) / 1e6:.1f} M parameters, "
          f"{'/'.join(rec.get('quantization') or []) or 'float'} GGUF dequantised to {rec.get('dtype')}, sha256 "
          f"{str(rec.get('sha256'))[:12]} ({out}/{RECORD})", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
