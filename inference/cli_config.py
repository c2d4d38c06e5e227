"""``--config FILE`` for the inference CLIs: a YAML or JSON mapping whose keys are the CLI's option names
(``temperature: 0.7``); flags given on the command line override it. Unknown keys are an error that
names the file and the key, so a typo never silently does nothing (a ConfigError: the CLI prints it as one line)."""
from __future__ import annotations

import argparse
from pathlib import Path

from data_preprocess.config import ConfigError, load_file


def load_mapping(path: str | Path) -> dict:
    """A YAML/JSON mapping of option -> value (one clear line on a missing or malformed file)."""
    return load_file(str(path))


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses ``argv``; when ``--config FILE`` is given its values become the defaults first."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        data = load_mapping(known.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(k for k in data if k.replace("-", "_") not in dests)
        if unknown:
            raise ConfigError(f"{known.config}: unknown option(s) {unknown}. Fix: use the CLI's option names: "
                              f"{sorted(dests - {'help'})}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in data.items()})
        for a in parser._actions:  # a value from the file satisfies required=True
            if a.dest in data or a.dest.replace("_", "-") in data:
                a.required = False
    return parser.parse_args(argv)
